"""Buffers of the compiled train step, before and after each step option of issue 16.

    PYTHONPATH=.:tasks python benchmarks/step_hlo_bytes.py \\
        --gin_file=gin/models/t5_1_1/large.gin --batch_size=32 [--topology=v5e:2x2]

Compiles `t5lite train`'s step (`make_setup(...).train_step`, lowered on abstract arguments as
`t5lite plan` does: nothing is allocated) in bfloat16 compute for a packed 512/114 batch, once
per variant, each variant adding one option to the previous one:

  baseline          the defaults
  shared_bias       ModelConfig.shared_relative_bias=True
  cast_once         + ModelConfig.cast_params_once=True
  vocab_chunk       + LossConfig.vocab_chunk=4096
  save_projections  + ModelConfig.remat_policy="save_projections"
  unroll2           + ModelConfig.scan_unroll=2           (only when asked for: --variants)

and reads from the optimized HLO (per device) and the compiler's `memory_analysis()`:

  residual_bytes  arrays stacked over the layers ([layers, ..., a sequence length, ...], or
                  [layers / u, u, ...] with scan_unroll u) in
                  the state of the `while` loops (the layer scans: what the forward pass saves
                  for the backward pass, and the backward pass's copies); every loop counted
  bias_bytes      self-attention-bias-shaped arrays [B|1, heads, T, T] (or [B|1, kv, groups,
                  T, T]) outside the loop bodies: the relative position bias, its gradient,
                  masks broadcast over the heads (pred) and the loops' copies of them (not: broadcasts of a non-zero constant, such
                  as the -1e9 fill of masked logits that XLA:CPU hoists out of the layer loop)
  layer_param_bytes  the other [layers, ...] arrays in the loops' state: the stacked
                  parameters, their copies and their gradients (float32 or compute dtype)
  logits_bytes    the largest materialised array with a vocabulary dimension and a target-token
                  dimension (the float32 logits and their gradient)
  temp_bytes      memory_analysis().temp_size_in_bytes (all temporaries of the step)

`--topology=v5e:2x2` compiles for a TPU slice with the TPU compiler (libtpu, compile-only
devices, data parallel over the slice: per-device batch = batch / devices); the default is
this machine's CPU (one device). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

VARIANTS = {  # name -> (ModelConfig changes, LossConfig changes), cumulative in this order
    "baseline": ({}, {}),
    "shared_bias": ({"shared_relative_bias": True}, {}),
    "cast_once": ({"cast_params_once": True}, {}),
    "vocab_chunk": ({}, {"vocab_chunk": 4096}),
    "save_projections": ({"remat_policy": "save_projections"}, {}),
    "unroll2": ({"scan_unroll": 2}, {}),
}
DEFAULT_VARIANTS = ("baseline", "shared_bias", "cast_once", "vocab_chunk", "save_projections")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[suf](?:8|16|32|64)|bf16)\[([0-9,]*)\]")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_FUSION_CALLS = re.compile(r"calls=%?([\w.\-]+)")


@dataclasses.dataclass
class Instr:
    computation: str
    opcode: str
    shape_text: str
    rest: str
    name: str = ""


def parse_hlo(text: str) -> tuple[list[Instr], set[str], str]:
    """(instructions, names of fused computations, name of the entry computation)."""
    instrs, fused, entry, current = [], set(), "", ""
    for line in text.splitlines():
        if line.rstrip().endswith("{") and "=" not in line.split("{")[0].split("(")[0]:
            m = _COMP.match(line)
            if m:
                current = m.group(1)
                if line.lstrip().startswith("ENTRY"):
                    entry = current
                continue
        m = _INSTR.match(line)
        if not m:
            continue
        ins = Instr(current, m.group(3), m.group(2), m.group(4), m.group(1))
        instrs.append(ins)
        if ins.opcode == "fusion":
            fused.update(_FUSION_CALLS.findall(ins.rest))
    return instrs, fused, entry


def arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _ARRAY.findall(shape_text)]


def nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    n = _BYTES[dtype]
    for d in dims:
        n *= d
    return n


_CONSTANT = re.compile(r"^([^)]*)\)")


def _fill_producers(instrs: list[Instr]) -> set[str]:
    """Names of the instructions that broadcast a non-zero scalar constant (e.g. the -1e9 that
    `jnp.where(mask, logits, -1e9)` fills masked logits with, which XLA:CPU hoists out of the
    layer loop as a full [B, heads, T, S] array): not a bias, so not counted as one."""
    constants = {}
    for ins in instrs:
        if ins.opcode == "constant" and not arrays(ins.shape_text)[0][1]:
            m = _CONSTANT.match(ins.rest)
            constants[ins.name] = m.group(1) if m else ""
    fills = set()
    for ins in instrs:
        if ins.opcode in ("broadcast", "fusion") and \
                (ins.opcode == "broadcast" or ins.name.startswith("wrapped_broadcast")):
            operands = re.findall(r"%([\w.\-]+)", ins.rest.split(")")[0])
            if len(operands) == 1 and operands[0] in constants and \
                    constants[operands[0]] not in ("0", "-0", "false"):
                fills.add(ins.name)
    return fills


def _while_producers(instrs: list[Instr]) -> dict[str, list[str]]:
    """For each `while`, the names of the instructions that produce its initial tuple, in
    element order (one name per array)."""
    by_name = {ins.name: ins for ins in instrs}
    out = {}
    for ins in instrs:
        if ins.opcode != "while":
            continue
        operand = re.findall(r"%([\w.\-]+)", ins.rest.split(")")[0])
        tup = by_name.get(operand[0]) if operand else None
        if tup is not None and tup.opcode == "tuple":
            out[ins.name] = re.findall(r"%([\w.\-]+)", tup.rest.split(")")[0])
    return out


def _stacked(dims: tuple[int, ...], layers: set[tuple[int, ...]]) -> int:
    """Length of the leading layers prefix of `dims` ((L,), or (L/u, u) for a scan unrolled
    u times), 0 if none."""
    for prefix in layers:
        if dims[:len(prefix)] == prefix:
            return len(prefix)
    return 0


def measure_hlo(text: str, *, layers: set[tuple[int, ...]], heads: int, lengths: set[int], vocab: int,
                target_tokens: set[int]) -> dict:
    """The byte counts of the module docstring from optimized HLO text."""
    instrs, fused, entry = parse_hlo(text)
    residual = 0
    residual_arrays = 0
    layer_params = 0
    bias = 0
    bias_largest = 0
    logits_largest = 0
    logits_count = 0
    fills = _fill_producers(instrs)
    producers = _while_producers(instrs)
    loop_bodies = set()
    for ins in instrs:
        if ins.opcode == "while":
            m = re.search(r"body=%?([\w.\-]+)", ins.rest)
            if m:
                loop_bodies.add(m.group(1))
    for ins in instrs:
        if ins.computation in fused:
            continue
        shapes = arrays(ins.shape_text)
        if ins.opcode == "while":
            for dt, dims in shapes:
                n = _stacked(dims, layers)
                if n and len(dims) >= n + 2 and any(d in lengths for d in dims[n:]):
                    residual += nbytes(dt, dims)
                    residual_arrays += 1
                elif n and len(dims) > n:
                    layer_params += nbytes(dt, dims)
        outside_loops = ins.computation not in loop_bodies
        sources = producers.get(ins.name, []) if ins.opcode == "while" else []
        for i, (dt, dims) in enumerate(shapes):
            if ins.name in fills or (i < len(sources) and sources[i] in fills):
                continue
            is_bias = ((len(dims) == 4 and dims[1] == heads) or
                       (len(dims) == 5 and dims[1] * dims[2] == heads)) and \
                dims[-1] == dims[-2] and dims[-1] in lengths
            if is_bias and (outside_loops or ins.opcode == "while") and \
                    ins.opcode not in ("parameter", "get-tuple-element", "tuple"):
                bias += nbytes(dt, dims)
                bias_largest = max(bias_largest, nbytes(dt, dims))
            if vocab in dims and any(d in target_tokens for d in dims) and \
                    ins.opcode not in ("parameter", "get-tuple-element", "tuple", "while"):
                logits_count += 1
                logits_largest = max(logits_largest, nbytes(dt, dims))
    return {"residual_bytes": residual, "residual_arrays": residual_arrays,
            "layer_param_bytes": layer_params,
            "bias_bytes": bias, "bias_largest_bytes": bias_largest,
            "logits_bytes": logits_largest, "logits_buffers": logits_count}


def variant_configs(base_model, base_loss, names: list[str]):
    """[(name, ModelConfig, LossConfig)] with the options added cumulatively."""
    out, model_changes, loss_changes = [], {}, {}
    for name in names:
        m, lo = VARIANTS[name]
        model_changes.update(m)
        loss_changes.update(lo)
        out.append((name, base_model.replace(**model_changes),
                    dataclasses.replace(base_loss, **loss_changes)))
    return out


def compile_variant(model_config, loss_config, *, batch_size: int, inputs_length: int,
                    targets_length: int, devices: list, compile_only: bool) -> dict:
    from t5lite.models.target import compile_target
    from t5lite.parallel.mesh import MeshConfig, make_mesh
    from t5lite.plan.train import abstract_batch
    from t5lite.train.config import TrainConfig
    from t5lite.train.setup import make_setup

    train_config = TrainConfig(train_steps=1000, batch_size=batch_size, loss=loss_config)
    mesh = make_mesh(MeshConfig(data=len(devices)), devices=devices)
    setup = make_setup(model_config, train_config, mesh, compile_only=compile_only)
    lengths = {"encoder_input_tokens": inputs_length, "encoder_segment_ids": inputs_length,
               "encoder_positions": inputs_length, "decoder_input_tokens": targets_length,
               "decoder_target_tokens": targets_length, "decoder_loss_weights": targets_length,
               "decoder_segment_ids": targets_length, "decoder_positions": targets_length}
    batch = abstract_batch(lengths, batch_size, setup.batch_sharding)
    t0 = time.perf_counter()
    with compile_target(devices[0].platform):  # the TPU paths when compiling for a TPU slice
        lowered = setup.train_step.lower(setup.abstract_state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    per_device_batch = batch_size // len(devices)
    hlo = measure_hlo(
        compiled.as_text(),
        layers={prefix for n in (model_config.num_encoder_layers,
                                  model_config.num_decoder_layers)
                for prefix in ((n,), (n // model_config.scan_unroll, model_config.scan_unroll))
                if model_config.scan_unroll == 1 or len(prefix) == 2},
        heads=model_config.num_heads, lengths={inputs_length, targets_length},
        vocab=model_config.vocab_size,
        target_tokens={targets_length, per_device_batch * targets_length})
    return {**hlo, "temp_bytes": int(stats.temp_size_in_bytes),
            "argument_bytes": int(stats.argument_size_in_bytes),
            "compile_s": round(compile_s, 1)}


def table(rows: list[dict]) -> str:
    mb = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["| variant (cumulative) | stacked residuals MiB (arrays) | stacked params/grads MiB "
             "| bias/mask MiB (largest) | logits MiB (largest) | temp MiB | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {mb(r['residual_bytes'])} ({r['residual_arrays']}) | "
                     f"{mb(r['layer_param_bytes'])} | "
                     f"{mb(r['bias_bytes'])} ({mb(r['bias_largest_bytes'])}) | "
                     f"{mb(r['logits_bytes'])} | {mb(r['temp_bytes'])} | {r['compile_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", action="append", default=None)
    parser.add_argument("--gin", action="append", default=[])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--attention_impl", default="einsum")
    parser.add_argument("--topology", default=None, help="e.g. v5e:2x2 (TPU compiler); "
                        "default: this machine's CPU")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, cumulative, from {list(VARIANTS)}")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; use names from {list(VARIANTS)}",
              file=sys.stderr)
        sys.exit(2)

    import jax

    from t5lite.train.losses import LossConfig
    from train_step import model_config_from_gin

    files = args.gin_file or ["gin/models/t5_1_1/large.gin"]
    cfg = model_config_from_gin(files, args.gin).replace(
        dtype="bfloat16", attention_impl=args.attention_impl)
    if args.topology:
        from t5lite.plan.topologies import parse_topology, target_devices

        devices = target_devices(parse_topology(args.topology))
        compile_only = True
    else:
        devices = jax.devices()[:1]
        compile_only = False
    target = f"{args.topology or 'cpu'} ({len(devices)} x {devices[0].device_kind})"
    print(f"{files[-1]} bf16, batch {args.batch_size}, packed {args.inputs_length}/"
          f"{args.targets_length}, {cfg.attention_impl} attention, target {target}", flush=True)
    rows = []
    for name, model_config, loss_config in variant_configs(cfg, LossConfig(), names):
        r = compile_variant(model_config, loss_config, batch_size=args.batch_size,
                            inputs_length=args.inputs_length,
                            targets_length=args.targets_length, devices=devices,
                            compile_only=compile_only)
        r["variant"] = name
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(table(rows))
    record = {"benchmark": "step_hlo_bytes", "gin_files": files, "target": target,
              "batch_size": args.batch_size, "inputs_length": args.inputs_length,
              "targets_length": args.targets_length, "attention_impl": cfg.attention_impl,
              "jax": jax.__version__, "machine": platform.processor() or platform.machine(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/step_hlo_bytes.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
