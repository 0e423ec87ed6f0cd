"""Basic building blocks: parameters with logical axes, RMSNorm, embeddings, dropout.

Every parameter is an `nnx.Param` whose metadata `out_sharding` holds its *logical* axis names
(the names are listed in `t5lite.parallel.rules`). `eager_sharding=False` keeps flax from
interpreting those names as mesh axes at creation: `t5lite.train.setup` and `t5lite.inference`
map them to mesh axes with `t5lite.parallel.rules` and initialise / restore the model under
`jax.jit(out_shardings=...)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from t5lite.models.matmul import einsum
from t5lite.models.target import target_backend

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def normal(stddev: float) -> Initializer:
    """Initialiser drawing from N(0, stddev**2)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
        return (jax.random.normal(key, tuple(shape), jnp.float32) * stddev).astype(dtype)

    return init


def ones(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.ones(tuple(shape), dtype)


def make_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
               axes: Sequence[str], dtype: jnp.dtype) -> nnx.Param:
    """An `nnx.Param` of `shape` carrying the logical axis names `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes),
                     eager_sharding=False)


class RMSNorm(nnx.Module):
    """T5 layer norm: scale * x / sqrt(mean(x**2) + eps), no mean subtraction, no bias.

    The statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, *,
                 rngs: nnx.Rngs):
        self.scale = make_param(rngs, ones, (dim,), ("embed",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(variance + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` uses it as the tied output projection."""

    def __init__(self, vocab_size: int, dim: int, dtype: jnp.dtype, param_dtype: jnp.dtype, *,
                 rngs: nnx.Rngs):
        self.embedding = make_param(rngs, normal(1.0), (vocab_size, dim), ("vocab", "embed"),
                                    param_dtype)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        from t5lite.models.quant import embed_lookup, is_quantized

        if is_quantized(self, "embedding"):
            return embed_lookup(self, tokens, self.dtype)
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits [..., vocab] in float32 against the embedding table."""
        from t5lite.models.quant import dense, kernel

        return dense("...d,vd->...v", x, kernel(self, "embedding", self.dtype),
                     preferred_element_type=jnp.float32)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `key` is None (deterministic) or `rate` is 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """`n` independent keys from `key`, or `n` Nones when `key` is None (no dropout)."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU (T5 v1.1's gelu_new), with a hand-written backward pass.

    Computed in float32 and rounded once to x's dtype: with bfloat16 x, JAX's per-op semantics
    would round after each of the formula's ~10 elementwise ops, which XLA:CPU emits as a
    bf16 -> f32 -> bf16 round trip per op (in a profile of T5 v1.1-small's bfloat16 encoder,
    batch 8 x 512, the gated-GELU fusion took 5.6 ms per layer that way, ~3 ms computed in
    float32), and is less exact.
    Same values as `jax.nn.gelu(x, approximate=True)` for float32 x.

    The backward keeps only `x` (in its own dtype) as residual and recomputes tanh, where
    autodiff of the forward formula saves ~6 intermediate [batch, length, d_ff] tensors per
    layer: on CPU that halved the FFN backward time (profile of T5 v1.1-small,
    benchmarks/train_step.py).

    d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2),  t = tanh(c (x + a x^3)).
    """
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


def _gelu_tanh_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    xf = x.astype(jnp.float32)
    x2 = xf * xf
    t = jnp.tanh(_GELU_C * (xf + _GELU_A * x2 * xf))
    d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * x2)
    return ((g.astype(jnp.float32) * d).astype(g.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


@jax.custom_vjp
def silu(x: jax.Array) -> jax.Array:
    """x * sigmoid(x) (SwiGLU's activation), computed in float32 and rounded once to x's dtype
    (see `gelu_tanh`); the backward keeps only `x`: d/dx = s (1 + x (1 - s)), s = sigmoid(x)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def _silu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return silu(x), x


def _silu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    xf = x.astype(jnp.float32)
    s = jax.nn.sigmoid(xf)
    return ((g.astype(jnp.float32) * s * (1.0 + xf * (1.0 - s))).astype(g.dtype),)


silu.defvjp(_silu_fwd, _silu_bwd)


def _shared_input_dense_fwd(x: jax.Array, kernels: tuple[jax.Array, ...]):
    return _shared_input_dense(x, kernels), (x, kernels)


def _shared_input_dense_bwd(res, grads):
    x, kernels = res
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    rows = x2.shape[0]
    # One materialised x^T [d, rows] serves every kernel's weight gradient as a plain
    # (non-transposed) matmul. Left to itself XLA:CPU transposes each [rows, d_ff] output
    # gradient instead (2x the bytes per kernel, and strided): 11 % of the T5-small step.
    xt = jax.lax.optimization_barrier(x2.T)
    dx = None
    d_kernels = []
    for g, w in zip(grads, kernels):
        g2 = g.reshape(rows, -1).astype(w.dtype)
        # float32 results: bfloat16 dots take XLA:CPU's fast path (t5lite.models.matmul), and
        # the kernels' input-gradient parts are summed before the one rounding
        part = einsum("rf,fd->rd", g2, w.T, preferred_element_type=jnp.float32)
        dx = part if dx is None else dx + part
        d_kernels.append(einsum("dr,rf->df", xt, g2, preferred_element_type=jnp.float32)
                         .astype(w.dtype))
    return dx.reshape(x.shape).astype(x.dtype), tuple(d_kernels)


@jax.custom_vjp
def _shared_input_dense(x: jax.Array, kernels: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return tuple(einsum("...d,df->...f", x, w) for w in kernels)


_shared_input_dense.defvjp(_shared_input_dense_fwd, _shared_input_dense_bwd)


def shared_input_dense(x: jax.Array, *kernels: jax.Array) -> tuple[jax.Array, ...]:
    """`x [..., d] @ w [d, f]` for several kernels that read the same input (e.g. the gated
    MLP's wi_0 and wi_1). Same values and gradients as separate einsums; on CPU the backward
    pass computes the weight gradients from one shared transposed copy of `x` (see
    `_shared_input_dense_bwd`). Other backends use plain einsums (their GEMMs take transposed
    operands for free)."""
    if target_backend() != "cpu":
        return tuple(jnp.einsum("...d,df->...f", x, w) for w in kernels)
    return _shared_input_dense(x, tuple(kernels))


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """gelu (tanh approximation = T5 v1.1's gelu_new), silu or relu."""
    if name == "gelu":
        return gelu_tanh
    if name == "silu":
        return silu
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {name!r}")
