"""Compile the inference step of `t5lite infer` (`Generator`'s jitted decoding function) for a
target device set: weights + decoding caches + temporaries per device.

The model is built abstractly; its parameters become ShapeDtypeStructs sharded by their logical
axes under the recipe (as `t5lite.inference.load_model` places restored weights), and
`Generator._run` — encoder, cross-attention K/V, the decoding loop with its caches — is lowered on
a batch of `batch_size` inputs of `input_length` tokens decoding `max_decode_len` tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from t5lite.config import ModelConfig
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.parallel.rules import get_rules, logical_to_sharding
from t5lite.plan.topologies import Topology
from t5lite.plan.train import PlanResult, compile_and_measure, hlo_file_name, sharded_bytes


def plan_decode(model_config: ModelConfig, partitioning: str, mesh_config: MeshConfig,
                topo: Topology, devices: list, hbm_bytes: int | None, *, batch_size: int,
                input_length: int, max_decode_len: int, method: str = "greedy",
                beam_size: int = 4, hlo_dir: str | None = None,
                usable_hbm_bytes: int | None = None, usable_hbm_source: str = "") -> PlanResult:
    """Compile the inference step `Generator` runs for `devices` and measure it; `hlo_dir`:
    also write the compiled HLO there. The verdict compares the peak with `usable_hbm_bytes`
    (default: `hbm_bytes`, the nominal size)."""
    import os

    from t5lite.inference import Generator, _decode_cache
    from t5lite.models import build_model, param_logical_axes
    from t5lite.models.decoding import DecodeConfig
    from t5lite.parallel.rules import axes_to_pure, tree_shardings

    usable = hbm_bytes if usable_hbm_bytes is None else usable_hbm_bytes
    cfg = model_config.replace(dropout_rate=0.0)
    mesh = make_mesh(mesh_config, devices=devices)
    rules = get_rules(partitioning)

    def build():
        return build_model(cfg, rngs=nnx.Rngs(params=0))

    graphdef, abs_params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    axes = axes_to_pure(param_logical_axes(abs_params))
    pure = nnx.to_pure_dict(abs_params)
    shardings = tree_shardings(axes, pure, mesh, rules)
    sds = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       pure, shardings)
    nnx.replace_by_pure_dict(abs_params, sds)
    with jax.default_device(jax.devices("cpu")[0]):
        rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
    model = nnx.merge(graphdef, abs_params, rest)
    config = DecodeConfig(method=method, max_decode_len=max_decode_len,
                          beam_size=beam_size if method == "beam" else 4)
    gen = Generator(model, None, max_input_len=input_length, batch_size=batch_size, mesh=mesh,
                    rules=rules)
    decoder_only = cfg.architecture == "decoder_only"
    width = input_length + (1 if decoder_only else 0)
    row = logical_to_sharding(("batch", None), mesh, rules, (batch_size, width))
    tokens = jax.ShapeDtypeStruct((batch_size, width), jnp.int32, sharding=row)
    lengths = jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                   sharding=logical_to_sharding(("batch",), mesh, rules,
                                                                (batch_size,)))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    rows = beam_size if method == "beam" else 1
    cache_len = max_decode_len + (width if decoder_only else 0)
    abs_cache = jax.eval_shape(lambda: _decode_cache(build(), batch_size, cache_len, config,
                                                     rows)[0])
    split = math.prod(mesh.shape[a] for a in _axes_of(row.spec))
    cache_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abs_cache))

    def lower():
        with jax.set_mesh(mesh):
            from t5lite.parallel.rules import axis_rules

            with axis_rules(mesh, rules):
                return gen._jitted.lower(gen._state, tokens, lengths, rng, config=config)

    per_device: dict[str, int | None] = {
        "params_bytes": sharded_bytes(sds), "optimizer_bytes": 0,
        "cache_bytes": -(-cache_bytes // split), "batch_bytes": sharded_bytes([tokens, lengths])}
    memory, fits, flops, collectives, lower_s, compile_s, note = compile_and_measure(
        lower, usable, per_device["params_bytes"] + per_device["batch_bytes"],
        hlo_path=hlo_dir and os.path.join(hlo_dir, hlo_file_name(topo, partitioning, mesh.shape,
                                                                 "decode")),
        platform=mesh.devices.flat[0].platform)
    per_device.update(memory)
    per_device["hbm_bytes"] = hbm_bytes
    per_device["usable_hbm_bytes"] = usable
    from t5lite.train.flops import forward_flops_per_example

    if decoder_only:
        fwd = forward_flops_per_example(cfg, 0, width + max_decode_len)
    else:
        fwd = forward_flops_per_example(cfg, input_length, max_decode_len)
    return PlanResult(
        topology=topo.name if topo.num_slices == 1 else f"{topo.name} x{topo.num_slices}",
        num_devices=len(devices), device_kind=devices[0].device_kind,
        approximate=not topo.is_tpu, mode="decode", partitioning=partitioning,
        mesh={k: int(v) for k, v in mesh.shape.items()}, batch_size=batch_size, microbatches=1,
        remat_policy=cfg.remat_policy, per_device=per_device, fits=fits,
        headroom_bytes=(None if usable is None or per_device["peak_bytes"] is None
                        else usable - per_device["peak_bytes"]),
        model_flops_per_step=fwd * batch_size * rows, compiler_flops_per_device=flops,
        collective_bytes=collectives, lower_seconds=round(lower_s, 2),
        compile_seconds=round(compile_s[0], 2), compile_cpu_seconds=round(compile_s[1], 2),
        note=note or (f"decode {method}: {batch_size} inputs x {input_length} tokens -> "
                      f"{max_decode_len} tokens; model FLOPs = one teacher-forced forward pass"),
        usable_hbm_source=usable_hbm_source if usable is not None else "")


def _axes_of(spec) -> tuple[str, ...]:
    first = tuple(spec)[0] if len(spec) else None
    if first is None:
        return ()
    return (first,) if isinstance(first, str) else tuple(first)
