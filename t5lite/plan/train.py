"""Compile the train step of `t5lite train` for a target device set and measure it.

`plan_train` builds the run exactly as `t5lite.train.loop.train` does — `make_setup` (born-sharded
state from `eval_shape`, the recipe's logical rules, the mesh from `MeshConfig` and
`make_mesh`, microbatches, remat policy, scanned layers, donated state) — but with
`compile_only=True`, then lowers `setup.train_step` on abstract arguments (the state's
ShapeDtypeStructs with their shardings and a batch of the feature converter's shapes) and
compiles it for the target devices. Nothing is allocated on the target.

Per-device bytes of parameters, optimiser state and batch are computed from the shardings
(exact: the same numbers the real born-sharded state has on each device); argument / output /
alias / temp / generated-code bytes come from the compiler's `memory_analysis()`; the peak is
`argument + output - alias + temp + generated code`. When the TPU compiler itself refuses the
program for lack of HBM, the peak it reports ("Used X of Y hbm") is taken and the plan does not
fit.

The verdict (`fits`, headroom) compares the peak with the HBM a program may use on the chip
(`usable_hbm_bytes`, what the TPU compiler reports as available: v4 30.75 GiB of its nominal
32 GiB; see `t5lite.plan.hbm`), not with the nominal size (`hbm_bytes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from t5lite.config import ModelConfig
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.config import TrainConfig
from t5lite.plan.hbm import parse_hbm_oom
from t5lite.plan.hlo import collective_bytes
from t5lite.plan.topologies import Topology


@dataclasses.dataclass
class PlanResult:
    """One compiled configuration (one row of a plan table / one JSON object)."""

    topology: str
    num_devices: int
    device_kind: str
    approximate: bool  # cpu:N planning (not the target's compiler)
    mode: str  # train | decode
    partitioning: str
    mesh: dict[str, int]
    batch_size: int
    microbatches: int
    remat_policy: str
    per_device: dict[str, int | None]
    fits: bool | None
    headroom_bytes: int | None
    model_flops_per_step: float
    compiler_flops_per_device: float | None
    collective_bytes: dict[str, int]
    lower_seconds: float
    compile_seconds: float  # wall clock of the compile
    compile_cpu_seconds: float = 0.0  # CPU time of this process during the compile (all threads)
    note: str = ""
    usable_hbm_source: str = ""  # where per_device["usable_hbm_bytes"] (the verdict's) came from

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sharded_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of arrays / ShapeDtypeStructs with shardings (the
    largest shard of each leaf: shards are equal or, when uneven, the first is largest)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(feature_lengths: dict[str, int], batch_size: int, batch_sharding) -> dict:
    """The batch `t5lite train` feeds: int32 [batch, length] per feature, batch-sharded."""
    from jax.sharding import NamedSharding, PartitionSpec

    spec = tuple(batch_sharding.spec)[:1]
    sharding = NamedSharding(batch_sharding.mesh, PartitionSpec(*(spec + (None,))))
    return {name: jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=sharding)
            for name, length in feature_lengths.items()}


def hlo_file_name(topo: Topology, recipe: str, mesh_shape, mode: str) -> str:
    """`v4-256_fsdp_fsdp128_train.hlo.txt.gz`: one file per target, recipe and mesh split."""
    split = "".join(f"{k}{v}" for k, v in mesh_shape.items() if v > 1) or "1"
    slices = f"x{topo.num_slices}" if topo.num_slices > 1 else ""
    name = re.sub(r"[^A-Za-z0-9.-]", "-", topo.name)
    return f"{name}{slices}_{recipe}_{split}_{mode}.hlo.txt.gz"


def model_flops(model_config: ModelConfig, feature_lengths: dict[str, int],
                batch_size: int) -> float:
    from t5lite.train.flops import train_flops_per_step

    if "encoder_input_tokens" in feature_lengths:
        return train_flops_per_step(model_config, batch_size,
                                    feature_lengths["encoder_input_tokens"],
                                    feature_lengths["decoder_target_tokens"])
    return train_flops_per_step(model_config, batch_size, 0,
                                feature_lengths["decoder_target_tokens"])


def save_hlo(text: str, path: str) -> None:
    """Write a compiled module's HLO text to `path` (gzip-compressed when it ends in .gz)."""
    import gzip
    import os

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write(text)


def compile_and_measure(lower_fn, usable_hbm_bytes: int | None, argument_bytes: int = 0,
                        hlo_path: str | None = None, platform: str | None = None):
    """(memory dict, fits, flops, collectives, lower s, (compile s, compile CPU s), note) of one
    compile; `fits` compares the peak with `usable_hbm_bytes`. `argument_bytes` (what the
    arguments hold per device, from their shardings) completes the peak when the compiler only
    reports the temporaries that did not fit. `hlo_path`: also write the compiled HLO text there
    (see `save_hlo`). `platform`: the devices' platform ("tpu"), so that the model is traced
    with that backend's code paths rather than the host's (`t5lite.models.target`)."""
    from t5lite.models.target import compile_target

    t0 = time.perf_counter()
    with compile_target(platform) if platform else contextlib.nullcontext():
        lowered = lower_fn()
    t1 = time.perf_counter()
    c1 = time.process_time()
    note = ""
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs that exceed HBM
        t2 = time.perf_counter()
        cpu = time.process_time() - c1
        oom = parse_hbm_oom(str(e))
        if oom is None:
            raise
        first = next((ln for ln in str(e).splitlines() if "hbm" in ln.lower()), str(e))
        temp = oom.get("temp")
        peak = oom["used"] if "used" in oom else argument_bytes + temp
        memory = {"argument_bytes": None, "output_bytes": None, "alias_bytes": None,
                  "temp_bytes": temp, "generated_code_bytes": None, "peak_bytes": peak}
        return (memory, False, None, {}, t1 - t0, (t2 - t1, cpu),
                f"the TPU compiler ran out of HBM: {first.strip()[:300]}")
    t2 = time.perf_counter()
    cpu = time.process_time() - c1
    stats = compiled.memory_analysis()
    memory = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "generated_code_bytes": int(stats.generated_code_size_in_bytes),
    }
    memory["peak_bytes"] = (memory["argument_bytes"] + memory["output_bytes"]
                            - memory["alias_bytes"] + memory["temp_bytes"]
                            + memory["generated_code_bytes"])
    fits = None if usable_hbm_bytes is None else memory["peak_bytes"] <= usable_hbm_bytes
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    text = compiled.as_text()
    if hlo_path:
        save_hlo(text, hlo_path)
    collectives = collective_bytes(text)
    return memory, fits, flops, collectives, t1 - t0, (t2 - t1, cpu), note


def plan_train(model_config: ModelConfig, train_config: TrainConfig, mesh_config: MeshConfig,
               feature_lengths: dict[str, int], topo: Topology, devices: list,
               hbm_bytes: int | None, hlo_dir: str | None = None,
               skip_if_arguments_exceed_hbm: bool = False, usable_hbm_bytes: int | None = None,
               usable_hbm_source: str = "") -> PlanResult:
    """Compile `t5lite train`'s step for `devices` and measure it (see module doc).
    `hlo_dir`: also write the compiled HLO there (`hlo_file_name`).
    `skip_if_arguments_exceed_hbm`: when the state and batch a device must hold (exact, from the
    shardings) already exceed `hbm_bytes`, answer "does not fit" without compiling (their sum is
    then the peak given, a lower bound; the compiler's fields are None).
    `hbm_bytes`: the chip's nominal HBM; `usable_hbm_bytes` (default: `hbm_bytes`): what one
    program may use, which the verdict compares with."""
    from t5lite.train.setup import make_setup

    usable = hbm_bytes if usable_hbm_bytes is None else usable_hbm_bytes
    mesh = make_mesh(mesh_config, devices=devices)
    setup = make_setup(model_config, train_config, mesh, compile_only=True)
    state = setup.abstract_state
    batch = abstract_batch(feature_lengths, train_config.batch_size, setup.batch_sharding)
    per_device: dict[str, int | None] = {
        "params_bytes": sharded_bytes(state.params),
        "optimizer_bytes": sharded_bytes(state.opt_state),
        "batch_bytes": sharded_bytes(batch),
    }
    held = sum(per_device.values())
    if skip_if_arguments_exceed_hbm and usable is not None and held > usable:
        memory = {"argument_bytes": None, "output_bytes": None, "alias_bytes": None,
                  "temp_bytes": None, "generated_code_bytes": None, "peak_bytes": held}
        fits, flops, collectives, lower_s, compile_s = False, None, {}, 0.0, (0.0, 0.0)
        note = ("not compiled: the parameters, optimiser state and batch a device holds "
                "already exceed its HBM (peak given = their sum, a lower bound)")
    else:
        memory, fits, flops, collectives, lower_s, compile_s, note = compile_and_measure(
            lambda: setup.train_step.lower(state, batch), usable, held,
            hlo_path=hlo_dir and os.path.join(hlo_dir, hlo_file_name(
                topo, train_config.partitioning, mesh.shape, "train")),
            platform=mesh.devices.flat[0].platform)
    per_device.update(memory)
    per_device["hbm_bytes"] = hbm_bytes
    per_device["usable_hbm_bytes"] = usable
    return PlanResult(
        topology=topo.name if topo.num_slices == 1 else f"{topo.name} x{topo.num_slices}",
        num_devices=len(devices), device_kind=devices[0].device_kind,
        approximate=not topo.is_tpu, mode="train",
        partitioning=train_config.partitioning, mesh={k: int(v) for k, v in mesh.shape.items()},
        batch_size=train_config.batch_size, microbatches=train_config.microbatches,
        remat_policy=model_config.remat_policy, per_device=per_device, fits=fits,
        headroom_bytes=(None if usable is None or per_device["peak_bytes"] is None
                        else usable - per_device["peak_bytes"]),
        model_flops_per_step=model_flops(model_config, feature_lengths, train_config.batch_size),
        compiler_flops_per_device=flops, collective_bytes=collectives,
        lower_seconds=round(lower_s, 2), compile_seconds=round(compile_s[0], 2),
        compile_cpu_seconds=round(compile_s[1], 2), note=note,
        usable_hbm_source=usable_hbm_source if usable is not None else "")
