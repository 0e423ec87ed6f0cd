"""Parameter introspection: logical axes of every parameter and the `model_info` report."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from t5lite.config import ModelConfig


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_logical_axes(state: Any) -> Any:
    """Same-structure tree whose leaves are tuples of logical axis names.

    Works on an `nnx.State` (concrete, or abstract from `nnx.eval_shape`) or a module.
    Variables without names (e.g. RNG counters) get `(None,) * ndim` (replicated).
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state)

    def axes(v: Any) -> tuple:
        names = v.get_metadata().get("out_sharding") if _is_var(v) else None
        if names:
            return tuple(names)
        return (None,) * len(getattr(v, "shape", ()))

    return jax.tree.map(axes, state, is_leaf=_is_var)


def abstract_model(cfg: ModelConfig):
    """The model with ShapeDtypeStruct parameters (no memory, no compute)."""
    from t5lite.models import build_model

    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1)))


def _path_str(path: tuple) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def param_table(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], tuple, int]]:
    """(path, shape, logical axes, count) of every parameter."""
    model = abstract_model(cfg)
    params = nnx.state(model, nnx.Param)
    rows = []
    for path, var in nnx.to_flat_state(params):
        shape = tuple(var.shape)
        names = tuple(var.get_metadata().get("out_sharding") or (None,) * len(shape))
        rows.append((_path_str(path), shape, names, math.prod(shape)))
    return rows


def param_count(cfg: ModelConfig) -> int:
    return sum(r[3] for r in param_table(cfg))


def _group(path: str) -> str:
    if path.startswith(("embed.", "lm_head")):
        return "embedding"
    return path.split(".", 1)[0]


def model_info(cfg: ModelConfig, mesh: Any = None, rules: Any = None) -> str:
    """Text report: every parameter's shape and logical axes (and mesh axes when `mesh` and
    `rules` are given), totals, and the encoder / decoder / embedding split in percent."""
    from t5lite.parallel.rules import get_rules, logical_to_spec

    rows = param_table(cfg)
    total = sum(r[3] for r in rows)
    width = max(len(r[0]) for r in rows)
    lines = [f"t5lite model: {cfg.architecture}, d_model={cfg.d_model}, heads={cfg.num_heads}"
             f" (kv {cfg.kv_heads}) x {cfg.head_dim}, d_ff={cfg.d_ff}, layers="
             f"{cfg.num_encoder_layers}+{cfg.num_decoder_layers}, vocab={cfg.vocab_size}, "
             f"{'gated ' if cfg.gated else ''}{cfg.activation}, positions={cfg.position_scheme}, "
             f"experts={cfg.num_experts}, tied={cfg.tie_embeddings}, scan={cfg.scan_layers}",
             ""]
    header = f"{'parameter':<{width}}  {'shape':<22} {'logical axes':<40}"
    if mesh is not None:
        header += f" {'mesh axes':<30}"
    lines.append(header + f" {'count':>12}")
    resolved = get_rules(rules) if rules is not None else None
    for path, shape, names, count in rows:
        line = f"{path:<{width}}  {str(shape):<22} {str(names):<40}"
        if mesh is not None and resolved is not None:
            line += f" {str(logical_to_spec(names, resolved, mesh, shape)):<30}"
        lines.append(line + f" {count:>12,}")
    groups: dict[str, int] = {}
    for path, _, _, count in rows:
        groups[_group(path)] = groups.get(_group(path), 0) + count
    lines.append("")
    lines.append(f"total parameters: {total:,} ({total / 1e6:.1f}M)")
    for name in ("embedding", "encoder", "decoder"):
        if name in groups:
            lines.append(f"  {name:<10} {groups[name]:>14,}  {100 * groups[name] / total:5.1f}%")
    non_embed = total - groups.get("embedding", 0)
    if non_embed and "encoder" in groups:
        lines.append(f"  encoder share of non-embedding parameters: "
                     f"{100 * groups['encoder'] / non_embed:.1f}% (decoder "
                     f"{100 * groups.get('decoder', 0) / non_embed:.1f}%)")
    return "\n".join(lines)


