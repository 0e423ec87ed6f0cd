"""Adafactor (Shazeer & Stern, 2018) with T5's defaults, factored along *logical* axes.

Which dimensions a parameter's second-moment statistics are factored over is decided by the
parameter's logical axis names, not by its shape alone (as in T5X):

- ROW    dims: `embed`
- COLUMN dims: `mlp`, `heads`, `kv_heads`, `kv`, `vocab`
- BATCH  dims: `layers` (a scanned stack), `expert` — statistics, update clipping and parameter
  scale are kept separately per layer / per expert, so a scanned model trains exactly like an
  unscanned one;
- any other name (e.g. `relpos_buckets`) is kept whole, like a batch dim.

A parameter is factored when it has ROW and COLUMN dims, each group at least
`min_dim_size_to_factor` elements. Otherwise (norm scales, relative-position tables, small
matrices) the full second moment is kept. Without logical names the two largest dims are used.

Example: the attention query kernel `[layers=6, embed=512, heads=8, kv=64]` keeps
`v_row` of shape `[6, 512, 1, 1]` and `v_col` of shape `[6, 1, 8, 64]` instead of a full
`[6, 512, 8, 64]` moment.

Statistics are stored with `keepdims=True` (reduced dims have size 1) so that they can be sharded
with their parameter's logical axes (a size-1 dim is simply not split). Unused statistics are
arrays of shape `(1,) * ndim`.

Update of one parameter `p` with gradient `g` at step `t` (0-based), T5 defaults in brackets:
    decay = 1 - (t + 1) ** -decay_exponent                             [0.8]
    v     = decay * v + (1 - decay) * (g**2 + epsilon1)                [1e-30]  (factored: rows/cols)
    u     = g / sqrt(v)
    u     = u / max(1, rms(u) / clipping_threshold)                    [1.0]
    u     = u * max(rms(p), epsilon2)   (multiply_by_parameter_scale)  [True, 1e-3]
    p     = p - lr(t) * u - lr(t) * weight_decay * p  (decay only where mask is True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

ROW_NAMES = frozenset({"embed"})
COLUMN_NAMES = frozenset({"mlp", "heads", "kv_heads", "kv", "vocab"})
BATCH_NAMES = frozenset({"layers", "expert"})


class FactorSpec(NamedTuple):
    """Dimension roles of one parameter. Factored iff `row` and `col` are both non-empty."""

    row: tuple[int, ...]
    col: tuple[int, ...]
    batch: tuple[int, ...]  # dims never reduced over (stack / expert dims)

    @property
    def factored(self) -> bool:
        return bool(self.row) and bool(self.col)


def factor_spec(shape: Sequence[int], logical_axes: Sequence[str | None] | None,
                min_dim_size_to_factor: int = 128, factored: bool = True) -> FactorSpec:
    """How the second moment of a parameter of `shape` with `logical_axes` is factored."""
    ndim = len(shape)
    if logical_axes is None:
        batch: tuple[int, ...] = ()
        if not factored or ndim < 2:
            return FactorSpec((), (), batch)
        order = sorted(range(ndim), key=lambda d: (shape[d], d))
        col_dim, row_dim = order[-1], order[-2]
        if shape[row_dim] < min_dim_size_to_factor:
            return FactorSpec((), (), batch)
        return FactorSpec((row_dim,), (col_dim,), batch)
    if len(logical_axes) != ndim:
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    row = tuple(d for d, n in enumerate(logical_axes) if n in ROW_NAMES)
    col = tuple(d for d, n in enumerate(logical_axes) if n in COLUMN_NAMES)
    batch = tuple(d for d, n in enumerate(logical_axes) if n in BATCH_NAMES)
    big_enough = (math.prod(shape[d] for d in row) >= min_dim_size_to_factor
                  and math.prod(shape[d] for d in col) >= min_dim_size_to_factor)
    if not (factored and row and col and big_enough):
        return FactorSpec((), (), batch)
    return FactorSpec(row, col, batch)


class AdafactorState(NamedTuple):
    count: jax.Array  # int32 number of updates done
    v_row: Any  # tree like params: row statistics (keepdims) or (1,)*ndim placeholders
    v_col: Any
    v: Any  # full second moment of unfactored params, or placeholders
    m: Any  # first moment (only with momentum), or placeholders


def _placeholder(p: jax.Array) -> jax.Array:
    return jnp.zeros((1,) * p.ndim, jnp.float32)


def adafactor(learning_rate: Callable[[jax.Array], jax.Array] | float,
              specs: Any,
              decay_exponent: float = 0.8,
              epsilon1: float = 1e-30,
              epsilon2: float = 1e-3,
              clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True,
              momentum: float | None = None,
              weight_decay: float = 0.0,
              weight_decay_mask: Any = None) -> optax.GradientTransformation:
    """Adafactor as an optax transformation. `specs` is a tree (like params) of FactorSpec.

    `weight_decay_mask` is a tree of bools like params (None = decay every parameter when
    `weight_decay` > 0).
    """
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    is_spec = lambda x: isinstance(x, FactorSpec)  # noqa: E731

    def init_fn(params):
        def v_row(p, s):
            if not s.factored:
                return _placeholder(p)
            return jnp.zeros(tuple(1 if d in s.col else n for d, n in enumerate(p.shape)),
                             jnp.float32)

        def v_col(p, s):
            if not s.factored:
                return _placeholder(p)
            return jnp.zeros(tuple(1 if d in s.row else n for d, n in enumerate(p.shape)),
                             jnp.float32)

        def v_full(p, s):
            return _placeholder(p) if s.factored else jnp.zeros(p.shape, jnp.float32)

        def m(p, s):
            return jnp.zeros(p.shape, jnp.float32) if momentum is not None else _placeholder(p)

        def over(fn):
            return jax.tree.map(lambda s, p: fn(p, s), specs, params, is_leaf=is_spec)

        return AdafactorState(jnp.zeros((), jnp.int32), over(v_row), over(v_col), over(v_full),
                              over(m))

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError("adafactor needs the parameters (multiply_by_parameter_scale)")
        t = state.count.astype(jnp.float32)
        decay = 1.0 - (t + 1.0) ** (-decay_exponent)
        lr = schedule(state.count)

        def one(s: FactorSpec, g, p, vr, vc, v, m):
            g = g.astype(jnp.float32)
            reduce = tuple(d for d in range(g.ndim) if d not in s.batch)
            g2 = g * g + epsilon1
            if s.factored:
                vr = decay * vr + (1.0 - decay) * jnp.mean(g2, axis=s.col, keepdims=True)
                vc = decay * vc + (1.0 - decay) * jnp.mean(g2, axis=s.row, keepdims=True)
                row_mean = jnp.mean(vr, axis=s.row, keepdims=True)
                u = g * jax.lax.rsqrt(vr / row_mean) * jax.lax.rsqrt(vc)
            else:
                v = decay * v + (1.0 - decay) * g2
                u = g * jax.lax.rsqrt(v)
            if clipping_threshold is not None:
                rms = jnp.sqrt(jnp.mean(u * u, axis=reduce, keepdims=True))
                u = u / jnp.maximum(1.0, rms / clipping_threshold)
            if momentum is not None:
                m = momentum * m + (1.0 - momentum) * u
                u = m
            if multiply_by_parameter_scale:
                p32 = p.astype(jnp.float32)
                scale = jnp.sqrt(jnp.mean(p32 * p32, axis=reduce, keepdims=True))
                u = u * jnp.maximum(scale, epsilon2)
            return -lr * u, vr, vc, v, m

        out = jax.tree.map(one, specs, grads, params, state.v_row, state.v_col, state.v,
                           state.m, is_leaf=is_spec)
        treedef = jax.tree.structure(specs, is_leaf=is_spec)
        flat = treedef.flatten_up_to(out)
        updates, vr, vc, v, m = (treedef.unflatten([o[i] for o in flat]) for i in range(5))
        if weight_decay:
            mask = weight_decay_mask if weight_decay_mask is not None else jax.tree.map(
                lambda _: True, params)
            updates = jax.tree.map(
                lambda u, p, keep: u - lr * weight_decay * p.astype(jnp.float32) if keep else u,
                updates, params, mask)
        updates = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params)
        return updates, AdafactorState(state.count + 1, vr, vc, v, m)

    return optax.GradientTransformation(init_fn, update_fn)
