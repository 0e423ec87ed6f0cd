"""The model's matmuls: `einsum`, which puts low-precision dots on XLA:CPU's fast path.

XLA:CPU (jaxlib 0.10) sends a bfloat16 x bfloat16 dot to its AMX / AVX512-BF16 kernels only
when the dot's *result* is float32. Asking for a bfloat16 result takes a generic path about 7x
slower, slower even than float32 (jitted `jnp.dot` of [4096, 512] x [512, 1024] on a 2-vCPU
Intel Xeon with AMX, 2026-12-06: float32 ~300 GFLOP/s, bfloat16 -> bfloat16 ~270, bfloat16 ->
float32 ~1,900; README "Performance"). So on CPU `einsum` asks for a float32 result and rounds
it once to the operands' dtype, which is the same function: both accumulate in float32 and round
at the end.

`einsum` does this for the einsums that are one 2D matmul after reshapes (every weight matmul
of the model: projections, MLP, output layer), with its own backward pass: autodiff of a
float32-result dot would give the backward mixed float32 x bfloat16 dots, which run at float32
speed, so the cotangent is rounded to the operands' dtype (what a bfloat16 dot's cotangent is
anyway) and both gradient dots are 2D float32-result dots too. `accumulated_einsum` does the
forward part for attention's batched probabilities x values dot. On other backends, and for
float32 operands, both are `jnp.einsum`.

Example::

    >>> x = jnp.ones((8, 512, 512), jnp.bfloat16); w = jnp.ones((512, 1024), jnp.bfloat16)
    >>> einsum("btd,df->btf", x, w).dtype                     # bf16, accumulated in f32
    dtype(bfloat16)
    >>> einsum("btd,df->btf", x, w, preferred_element_type=jnp.float32).dtype
    dtype('float32')
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from t5lite.models.target import target_backend

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def expand_ellipsis(eqn: str, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
    """(lhs, rhs, out) letters of a two-operand einsum with any `...` spelled out.

    >>> expand_ellipsis("...d,df->...f", 3, 2)
    ('ABd', 'df', 'ABf')
    """
    ins, out = eqn.replace(" ", "").split("->")
    lhs, rhs = ins.split(",")
    used = set(eqn)
    free = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used)
    if "..." in lhs or "..." in rhs:
        n = (lhs_ndim - len(lhs.replace("...", ""))) if "..." in lhs else \
            (rhs_ndim - len(rhs.replace("...", "")))
        dots = "".join(next(free) for _ in range(n))
        lhs, rhs, out = (s.replace("...", dots) for s in (lhs, rhs, out))
    return lhs, rhs, out


def _as_matmul(lhs: str, rhs: str, out: str) -> tuple[int, bool] | None:
    """How the einsum is one 2D matmul [M, K] x [K, N] (or x [N, K]^T) by reshapes alone:
    (number of contracted axes, rhs is [N..., K...]) -- or None.

    That holds for the model's weight matmuls: lhs = free + contracted letters, rhs = contracted
    + free (or free + contracted), out = lhs free + rhs free, no batch letters. Only this form
    takes the fast path: a 2D float32-result dot is always one XLA:CPU supports (some batched
    bfloat16 dots with a float32 result compile to a dot XLA:CPU 0.10 cannot run, "Unsupported
    element type for DotThunk::Execute: BF16 x BF16 = F32", depending on shapes and layouts).
    """
    if any(len(set(s)) != len(s) for s in (lhs, rhs, out)):
        return None
    contracted = [c for c in lhs if c in rhs and c not in out]
    k = len(contracted)
    if k == 0 or k == len(lhs) or k == len(rhs):
        return None
    lhs_free, rhs_free = lhs[:-k], None
    if lhs[-k:] != "".join(contracted) or set(lhs_free) & set(rhs):
        return None
    if rhs[:k] == lhs[-k:]:
        rhs_free, transposed = rhs[k:], False
    elif rhs[-k:] == lhs[-k:]:
        rhs_free, transposed = rhs[:-k], True
    else:
        return None
    if out != lhs_free + rhs_free:
        return None
    return k, transposed


def uses_fast_accumulation(a: jax.Array, b: jax.Array) -> bool:
    """True where `einsum` takes the float32-result path: on CPU, both operands in the same
    16-bit float dtype."""
    return (target_backend() == "cpu" and a.dtype == b.dtype
            and jnp.dtype(a.dtype) in LOW_PRECISION)


def _dot2d(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    """x [M, K] @ w [K, N] (or w [N, K] with transposed), float32 result."""
    dims = (((1,), (1 if transposed else 0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fast_matmul(k: int, transposed: bool, out_dtype: Any, a: jax.Array,
                 b: jax.Array) -> jax.Array:
    """a [free_a..., K...] x b (as `_as_matmul` describes) as one 2D float32-result dot."""
    kdim = math.prod(a.shape[a.ndim - k:])
    x = a.reshape(-1, kdim)
    w = b.reshape(-1, kdim) if transposed else b.reshape(kdim, -1)
    free_b = b.shape[:b.ndim - k] if transposed else b.shape[k:]
    y = _dot2d(x, w, transposed)
    return y.reshape(*a.shape[:a.ndim - k], *free_b).astype(out_dtype)


def _fast_fwd(k, transposed, out_dtype, a, b):
    return _fast_matmul(k, transposed, out_dtype, a, b), (a, b)


def _fast_bwd(k, transposed, out_dtype, residuals, g):
    """With x = a as [M, K], w = b as [K, N] and g as [M, N] (rounded to the operands' dtype,
    as a 16-bit dot's cotangent is): d x = g w^T, d w = x^T g (or g^T x for w [N, K])."""
    del out_dtype
    a, b = residuals
    kdim = math.prod(a.shape[a.ndim - k:])
    x = a.reshape(-1, kdim)
    g2 = g.astype(a.dtype).reshape(x.shape[0], -1)
    w = b.reshape(-1, kdim) if transposed else b.reshape(kdim, -1)
    dx = _dot2d(g2, w, not transposed)
    contract_rows = (((0,), (0,)), ((), ()))
    if transposed:
        dw = jax.lax.dot_general(g2, x, contract_rows, preferred_element_type=jnp.float32)
    else:
        dw = jax.lax.dot_general(x, g2, contract_rows, preferred_element_type=jnp.float32)
    return dx.astype(a.dtype).reshape(a.shape), dw.astype(b.dtype).reshape(b.shape)


_fast_matmul.defvjp(_fast_fwd, _fast_bwd)


def einsum(eqn: str, a: jax.Array, b: jax.Array,
           preferred_element_type: Any = None) -> jax.Array:
    """`jnp.einsum(eqn, a, b, preferred_element_type=...)`; on CPU, with 16-bit float operands
    and an einsum that is one 2D matmul (see `_as_matmul`), computed as a float32-result dot
    (module doc). The result dtype is `preferred_element_type` if given, else the operands'
    dtype, as with `jnp.einsum`."""
    if uses_fast_accumulation(a, b):
        form = _as_matmul(*expand_ellipsis(eqn, a.ndim, b.ndim))
        if form is not None:
            return _fast_matmul(*form, jnp.dtype(preferred_element_type or a.dtype), a, b)
    return jnp.einsum(eqn, a, b, preferred_element_type=preferred_element_type)


def accumulated_einsum(eqn: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(eqn, a, b)` in the operands' dtype computed as a float32-result dot on CPU
    (module doc), for batched forms `einsum` leaves alone (attention's probabilities x values).
    Forward only: autodiff gives the backward pass the usual mixed-precision dots."""
    if uses_fast_accumulation(a, b):
        return jnp.einsum(eqn, a, b, preferred_element_type=jnp.float32).astype(a.dtype)
    return jnp.einsum(eqn, a, b)
