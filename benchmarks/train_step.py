"""Train-step throughput and MFU of the real t5lite train step.

    .venv/bin/python benchmarks/train_step.py --gin_file=gin/models/t5_1_1/small.gin \\
        --batch_size=8 --inputs_length=512 --targets_length=114 --steps=5 --dtype=float32

The step is the one `t5lite train` runs: `t5lite.train.setup.make_setup` builds the optimiser,
shardings and train state exactly as the trainer does, and the benchmark compiles the same step
function (`make_train_step` over `make_apply_fn`, state donated) ahead of time so that compile
time is reported on its own. Reported (and written as JSON to benchmarks/results/):

  compile_s          lowering + XLA compilation of the step
  step_s             median wall time of --steps timed steps (after --warmup steps)
  tokens_per_s       batch * (inputs_length + targets_length) / step_s (padding counts)
  model_flops        matmul FLOPs of one step from `t5lite.train.flops` (fwd + bwd = 3x fwd)
  xla_flops          XLA's `cost_analysis()["flops"]` of the compiled step (everything XLA
                     counts, optimiser and elementwise ops included)
  mfu                model_flops / step_s / peak, where peak is the device's dense bf16 peak
                     (`PEAK_FLOPS`) on accelerators, and on CPU the best `jnp.dot` FLOP/s
                     measured in this run (the higher of float32 and bfloat16)

`--packed` gives every row two examples (segment ids and restarting positions), the layout of a
packed pre-training batch; the default is one full-length example per row.
`--profile_dir=DIR` writes a `jax.profiler` trace of two timed steps (open with TensorBoard or
Perfetto); set XLA_FLAGS=--xla_dump_to=DIR for HLO dumps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

if __name__ == "__main__":  # the allocator the `t5lite` command runs with (t5lite/host_malloc.py)
    from t5lite.host_malloc import reexec_with_chosen_malloc

    reexec_with_chosen_malloc()

import jax  # noqa: E402
from cpu_info import cpu_model  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from t5lite.config import ModelConfig  # noqa: E402
from t5lite.train.config import TrainConfig  # noqa: E402
from t5lite.train.flops import device_peak_flops, train_flops_per_step  # noqa: E402
from t5lite.train.losses import LossConfig  # noqa: E402
from t5lite.train.optim import OptimizerConfig  # noqa: E402
from t5lite.train.schedules import ScheduleConfig  # noqa: E402

PRESETS = {  # --model NAME -> gin file
    "t5_1_1_tiny": "gin/models/t5_1_1/tiny.gin",
    "t5_1_1_small": "gin/models/t5_1_1/small.gin",
    "t5_1_1_base": "gin/models/t5_1_1/base.gin",
    "t5_1_1_large": "gin/models/t5_1_1/large.gin",
    "t5_1_1_xl": "gin/models/t5_1_1/xl.gin",
    "modern_small": "gin/models/modern/small.gin",
    "modern_base": "gin/models/modern/base.gin",
    "modern_large": "gin/models/modern/large.gin",
}


def model_config_from_gin(gin_files: list[str], bindings: list[str] | None = None
                          ) -> ModelConfig:
    """The ModelConfig a `t5lite train --gin_file=...` run would build from these files.

    Uses the CLI's gin edge when the data stack (seqio, TensorFlow) is installed; otherwise
    (e.g. a bare accelerator image with only JAX) registers `ModelConfig` alone, which is all
    the model gin files bind.
    """
    try:
        from t5lite.commands import gin_setup

        gin_setup.register_configurables()
    except ImportError:
        import gin

        try:
            gin.external_configurable(ModelConfig, name="ModelConfig")
        except ValueError:
            pass  # already registered in this process
        gin.clear_config()
        for path in gin_files:
            gin.parse_config_file(path if os.path.exists(path) else os.path.join(ROOT, path))
        for binding in bindings or []:
            gin.parse_config(binding)
        return gin.get_configurable("ModelConfig")()
    gin_setup.parse_gin(gin_files, bindings or [])
    return gin_setup.build("ModelConfig")


def adamw_config(learning_rate: float = 1e-4) -> OptimizerConfig:
    """AdamW as `torch.optim.AdamW(lr, weight_decay=0)` defaults: b2 0.999, eps 1e-8, constant."""
    return OptimizerConfig(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                           schedule=ScheduleConfig(name="constant",
                                                   base_learning_rate=learning_rate,
                                                   warmup_steps=0))


def synthetic_batch(batch_size: int, inputs_length: int, targets_length: int, vocab_size: int,
                    packed: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length random token batch (int32 numpy), SeqIO EncDecFeatureConverter layout.

    packed=True: two examples per row (lengths split in halves), with `*_segment_ids` 1 then 2
    and `*_positions` restarting at 0; decoder inputs start every segment with token 0.
    """
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab_size, size=(batch_size, inputs_length), dtype=np.int32)
    tgt = rng.integers(2, vocab_size, size=(batch_size, targets_length), dtype=np.int32)
    batch = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
             "decoder_loss_weights": np.ones_like(tgt)}
    if not packed:
        batch["decoder_input_tokens"] = np.concatenate(
            [np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], axis=1)
        return batch

    def segments(length: int) -> tuple[np.ndarray, np.ndarray]:
        half = length // 2
        seg = np.where(np.arange(length) < half, 1, 2).astype(np.int32)
        pos = np.where(np.arange(length) < half, np.arange(length),
                       np.arange(length) - half).astype(np.int32)
        return (np.broadcast_to(seg, (batch_size, length)).copy(),
                np.broadcast_to(pos, (batch_size, length)).copy())

    batch["encoder_segment_ids"], batch["encoder_positions"] = segments(inputs_length)
    batch["decoder_segment_ids"], batch["decoder_positions"] = segments(targets_length)
    dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], axis=1)
    dec_in[batch["decoder_positions"] == 0] = 0
    batch["decoder_input_tokens"] = dec_in
    return batch


def xla_flops(compiled: Any) -> float | None:
    """`cost_analysis()["flops"]` of a compiled executable (None when XLA gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


class TrainStepBench:
    """The trainer's setup and step for one model/batch shape, compiled ahead of time.

        bench = TrainStepBench(cfg, batch_size=8, inputs_length=512, targets_length=114)
        bench.compile()          # seconds
        bench.step()             # one step (blocks), returns the loss
    """

    def __init__(self, model_config: ModelConfig, *, batch_size: int, inputs_length: int,
                 targets_length: int, optimizer: OptimizerConfig | None = None,
                 loss: LossConfig | None = None, packed: bool = False, seed: int = 0,
                 partitioning: str = "dp", mesh=None):
        from t5lite.parallel.mesh import MeshConfig, make_mesh
        from t5lite.train.setup import make_setup
        from t5lite.train.steps import make_apply_fn, make_train_step
        from t5lite.models.compute_cast import step_param_cast

        self.model_config = model_config
        self.train_config = TrainConfig(
            train_steps=1_000_000, batch_size=batch_size, seed=seed, partitioning=partitioning,
            optimizer=optimizer or OptimizerConfig(), loss=loss or LossConfig())
        self.mesh = mesh if mesh is not None else make_mesh(MeshConfig())
        self.setup = make_setup(model_config, self.train_config, self.mesh)
        s = self.setup
        # The same step function and jit arguments as make_setup's `train_step`; built here
        # again (identically) so it can be lowered and compiled ahead of time.
        step_fn = make_train_step(make_apply_fn(s.graphdef, s.rest), s.tx, s.schedule,
                                  self.train_config.loss, self.train_config.microbatches,
                                  param_cast=step_param_cast(model_config))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._jitted = jax.jit(step_fn, in_shardings=(s.state_shardings, None),
                               out_shardings=(s.state_shardings, replicated),
                               donate_argnums=(0,))
        host = synthetic_batch(batch_size, inputs_length, targets_length,
                               model_config.vocab_size, packed=packed, seed=seed)
        self.batch = {k: jax.device_put(v, s.batch_sharding) for k, v in host.items()}
        self.state = s.fresh_state()
        self.compiled = None
        self.last_loss = float("nan")
        self.tokens_per_step = batch_size * (inputs_length + targets_length)
        self.model_flops = train_flops_per_step(model_config, batch_size, inputs_length,
                                                targets_length)

    def compile(self) -> float:
        return sum(self.lower_and_compile())

    def lower_and_compile(self) -> tuple[float, float]:
        """Seconds of (tracing + lowering to StableHLO, XLA compilation or loading the
        executable from the persistent compilation cache)."""
        start = time.perf_counter()
        with self.setup.traced():
            lowered = self._jitted.lower(self.state, self.batch)
            mid = time.perf_counter()
            self.compiled = lowered.compile()
        return mid - start, time.perf_counter() - mid

    def step(self) -> float:
        if self.compiled is None:
            self.compile()
        self.state, metrics = self.compiled(self.state, self.batch)
        return float(jax.device_get(metrics["loss"]))

    def time_steps(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.last_loss = self.step()
            times.append(time.perf_counter() - start)
        return times


def cpu_matmul_peak(sizes=(512, 1024, 2048), repeats: int = 5) -> dict:
    """Best measured jnp.dot FLOP/s over float32 and bfloat16 (the CPU MFU reference)."""
    from matmul_peak import matmul_peak

    results = {dt: matmul_peak(dt, sizes=sizes, repeats=repeats)
               for dt in ("float32", "bfloat16")}
    best = max(results.values(), key=lambda r: r["flops_per_sec"])
    return {"flops_per_sec": best["flops_per_sec"], "dtype": best["dtype"],
            "by_dtype": {dt: r["flops_per_sec"] for dt, r in results.items()},
            "best_size": best["best_size"]}


def peak_flops(measure_cpu: bool = True, sizes=(512, 1024, 2048),
               measure_device: bool = False) -> dict:
    """{"flops_per_sec", "source", ...}: published device peak, or measured matmul on CPU.

    measure_device=True also times bf16 `jnp.dot` (4096^2 and 8192^2) on an accelerator and
    returns it as "measured_flops_per_sec" (per device), the ceiling the chip really reaches.
    """
    peak = device_peak_flops()
    if peak is not None:
        result = {"flops_per_sec": peak * jax.device_count(),
                  "source": "published dense bf16 peak "
                            f"x {jax.device_count()} {jax.devices()[0].device_kind}"}
        if measure_device:
            from matmul_peak import matmul_peak

            measured = matmul_peak("bfloat16", sizes=(4096, 8192), repeats=20)
            result["measured_flops_per_sec"] = measured["flops_per_sec"] * jax.device_count()
        return result
    if not measure_cpu:
        return {"flops_per_sec": None, "source": "not measured"}
    measured = cpu_matmul_peak(sizes)
    return {**measured, "source": f"measured jnp.dot peak ({measured['dtype']}, "
                                  f"{measured['best_size']}^2) in this run"}


def machine() -> dict:
    """Where a figure came from: device, CPU model, and the load average when it was taken."""
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "devices": jax.device_count(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "host": platform.platform(), "jax": jax.__version__,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            # which T5LITE_MALLOC choice the re-exec made ("" where none: as started)
            "malloc_chosen": os.environ.get("T5LITE_MALLOC_CHOSEN", "")}


def run(model_config: ModelConfig, *, batch_size: int, inputs_length: int, targets_length: int,
        steps: int, warmup: int, optimizer: OptimizerConfig | None = None, packed: bool = False,
        measure_peak: bool = True, peak_sizes=(512, 1024, 2048), profile_dir: str | None = None,
        mesh=None, measure_device_peak: bool = False, log=print,
        loss: LossConfig | None = None) -> dict:
    """Build, compile and time the train step; returns the result record (see module doc)."""
    bench = TrainStepBench(model_config, batch_size=batch_size, inputs_length=inputs_length,
                           targets_length=targets_length, optimizer=optimizer, packed=packed,
                           mesh=mesh, loss=loss)
    compile_s = bench.compile()
    log(f"compiled in {compile_s:.1f} s")
    bench.time_steps(warmup)
    times = bench.time_steps(steps)
    loss = bench.last_loss
    if profile_dir:
        jax.profiler.start_trace(profile_dir)
        bench.time_steps(2)
        jax.profiler.stop_trace()
    step_s = statistics.median(times)
    peak = peak_flops(measure_peak, peak_sizes, measure_device=measure_device_peak)
    result = {
        "benchmark": "train_step",
        "model": {k: getattr(model_config, k) for k in (
            "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
            "num_decoder_layers", "vocab_size", "dtype", "scan_layers", "remat_policy",
            "attention_impl", "scan_unroll", "shared_relative_bias", "cast_params_once")},
        "loss_vocab_chunk": bench.train_config.loss.vocab_chunk,
        "params": int(sum(np.prod(x.shape) for x in
                          jax.tree.leaves(bench.setup.abstract_state.params))),
        "optimizer": bench.train_config.optimizer.name,
        "batch_size": batch_size, "inputs_length": inputs_length,
        "targets_length": targets_length, "packed": packed,
        "compile_s": compile_s, "step_times_s": times, "step_s": step_s,
        "tokens_per_s": bench.tokens_per_step / step_s,
        "model_flops": bench.model_flops, "xla_flops": xla_flops(bench.compiled),
        "model_flops_per_s": bench.model_flops / step_s,
        "peak_flops_per_s": peak["flops_per_sec"], "peak_source": peak["source"],
        "mfu": (bench.model_flops / step_s / peak["flops_per_sec"]
                if peak["flops_per_sec"] else None),
        "last_loss": loss,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if "measured_flops_per_sec" in peak:
        result["measured_matmul_flops_per_s"] = peak["measured_flops_per_sec"]
        result["mfu_vs_measured_matmul"] = (bench.model_flops / step_s
                                            / peak["measured_flops_per_sec"])
    if "by_dtype" in peak:
        result["matmul_peak_by_dtype"] = peak["by_dtype"]
    return result


def summary(result: dict) -> str:
    mfu = f"{100 * result['mfu']:.1f} %" if result["mfu"] is not None else "n/a"
    xla = (f"{result['xla_flops'] / 1e12:.3f} TFLOP" if result["xla_flops"] is not None
           else "n/a")
    measured = ""
    if result.get("mfu_vs_measured_matmul") is not None:
        measured = (f"; {100 * result['mfu_vs_measured_matmul']:.1f} % of the bf16 jnp.dot "
                    f"measured here ({result['measured_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s)")
    return (f"step {result['step_s']:.3f} s (median of {len(result['step_times_s'])}), "
            f"compile {result['compile_s']:.1f} s, {result['tokens_per_s']:.0f} tokens/s, "
            f"model {result['model_flops'] / 1e12:.3f} TFLOP/step (XLA {xla}), "
            f"{result['model_flops_per_s'] / 1e9:.1f} GFLOP/s, MFU {mfu} of "
            f"{(result['peak_flops_per_s'] or 0) / 1e9:.1f} GFLOP/s ({result['peak_source']})"
            f"{measured}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", action="append", default=None,
                        help="model gin file(s), as for `t5lite train` (repeatable)")
    parser.add_argument("--model", default=None, choices=sorted(PRESETS),
                        help="a preset instead of --gin_file")
    parser.add_argument("--gin", action="append", default=[],
                        help="extra gin binding, e.g. --gin='ModelConfig.remat_policy=\"dots\"'")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="compute dtype (default: the gin file's)")
    parser.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"])
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--vocab_chunk", type=int, default=0,
                        help="LossConfig.vocab_chunk: loss over this many vocabulary entries "
                             "at a time, no float32 [B, T, V] logits (0: from the logits)")
    parser.add_argument("--no_peak", action="store_true", help="skip the CPU matmul peak")
    parser.add_argument("--measure_device_peak", action="store_true",
                        help="on accelerators, also time a bf16 jnp.dot and report MFU "
                             "against it beside the published peak")
    parser.add_argument("--profile_dir", default=None)
    parser.add_argument("--out", default=None, help="JSON result path (default: "
                        "benchmarks/results/train_step_<model>_<dtype>_<platform>.json)")
    args = parser.parse_args(argv)

    files = args.gin_file or [PRESETS[args.model or "t5_1_1_small"]]
    cfg = model_config_from_gin(files, args.gin)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    optimizer = adamw_config() if args.optimizer == "adamw" else OptimizerConfig()
    print(f"{os.path.basename(files[-1])} dtype={cfg.dtype} batch {args.batch_size} "
          f"{args.inputs_length}/{args.targets_length}{' packed' if args.packed else ''}, "
          f"{args.optimizer}; {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
    result = run(cfg, batch_size=args.batch_size, inputs_length=args.inputs_length,
                 targets_length=args.targets_length, steps=args.steps, warmup=args.warmup,
                 optimizer=optimizer, packed=args.packed, measure_peak=not args.no_peak,
                 profile_dir=args.profile_dir, measure_device_peak=args.measure_device_peak,
                 loss=LossConfig(vocab_chunk=args.vocab_chunk))
    result["command"] = "python benchmarks/train_step.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    result["gin_files"] = files
    print(summary(result))
    out = args.out or os.path.join(
        ROOT, "benchmarks", "results",
        f"train_step_{os.path.splitext(os.path.basename(files[-1]))[0]}_{cfg.dtype}_"
        f"{jax.devices()[0].platform}.json")
    write_result(result, out)
    return result


def write_result(result: dict, path: str) -> None:
    """Write a benchmark result as indented JSON (creating the folder) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
