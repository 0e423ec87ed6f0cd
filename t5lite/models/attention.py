"""Multi-head attention (MHA / GQA / MQA) with T5 maths: no 1/sqrt(head_dim) scaling.

Layouts (chosen so that no transposes are needed around the projections):
  q kernel [embed, heads, kv], k/v kernels [embed, kv_heads, kv], o kernel [heads, kv, embed];
  activations q [B, T, heads, kv], k/v [B, S, kv_heads, kv].

Masks are boolean, True = may attend, shaped [B|1, 1, T, S]; the bias (T5 relative positions)
is float32 [B|1, heads, T, S]. Both are built once per stack and shared by all layers.

Two implementations of the core (`attention_impl` in ModelConfig):
  "einsum": grouped einsums + float32 softmax, written so that XLA fuses mask, bias and softmax;
    on CPU (one device, no probability dropout) the same function runs block by block
    (`t5lite.models.blocked_attention`: each (row, kv head) block's logits stay in cache, and
    the backward pass recomputes them instead of keeping the probabilities);
  "xla" / "cudnn" / "auto": `jax.nn.dot_product_attention` with that implementation (None for auto).
Attention-probability dropout needs the probabilities, so training with dropout always uses the
einsum core. "cudnn" on a backend without cuDNN (a CPU or TPU, e.g. evaluating or decoding a
model trained on GPUs) also uses the einsum core: the two compute the same function.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5lite.config import ModelConfig
from t5lite.models.blocked_attention import NEG_LOGIT, blocked_attention_core
from t5lite.models.layers import dropout, make_param, normal
from t5lite.models.matmul import accumulated_einsum
from t5lite.models.quant import QTensor, dense, kernel
from t5lite.models.target import target_backend
from t5lite.parallel.rules import constrain, tracing_on_one_device

# CPU: below this many logits per (row, head) the einsum core's arrays are small enough to stay
# in cache anyway, and a loop of tiny blocks would only add per-iteration overhead
_BLOCKED_MIN_LOGITS = 64 * 64


def _sum_leading(x: jax.Array) -> jax.Array:
    """Sum over axis 0 (kept, size 1) as a tree of slice adds.

    XLA:CPU lowers a reduction over the outermost dimension very slowly: for the relative-bias
    gradient [8, 6, 1, 512, 512] -> [1, ...] a plain `jnp.sum(axis=0)` took ~160 ms per layer
    where these fused adds take ~2 ms (benchmarks/train_step.py profile, T5 v1.1-small).
    """
    while x.shape[0] > 1:
        n = x.shape[0]
        half = n // 2
        y = x[:half] + x[half:2 * half]
        if n % 2:
            y = jnp.concatenate([y[:1] + x[2 * half:], y[1:]], axis=0)
        x = y
    return x


@jax.custom_vjp
def add_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """`logits + bias` where bias broadcasts over dimensions of size 1 (float32 logits)."""
    return logits + bias


def _add_bias_fwd(logits: jax.Array, bias: jax.Array):
    # the residual only carries the bias's shape and dtype (zero elements: nothing is stored,
    # also when the layer is scanned)
    return logits + bias, jnp.zeros((0,) + bias.shape, bias.dtype)


def _add_bias_bwd(like: jax.Array, g: jax.Array):
    bias_shape = like.shape[1:]
    d_bias = g
    if bias_shape[0] == 1 and g.shape[0] > 1:
        d_bias = _sum_leading(d_bias)
    others = tuple(i for i in range(1, g.ndim) if bias_shape[i] == 1 and g.shape[i] > 1)
    if others:
        d_bias = jnp.sum(d_bias, axis=others, keepdims=True)
    return g, d_bias.astype(like.dtype).reshape(bias_shape)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None,
                   mask: jax.Array | None, impl: str = "einsum", dropout_rate: float = 0.0,
                   dropout_key: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T + bias, masked) v for q [B,T,N,H], k/v [B,S,K,H] (N % K == 0).

    Returns [B, T, N, H] in q's dtype. `impl` as in the module doc; "einsum" is computed by
    `blocked_attention_core` where `takes_blocks` says so, else by `einsum_attention_core`.
    """
    use_probs_dropout = dropout_key is not None and dropout_rate > 0.0
    if impl == "cudnn" and target_backend() != "gpu":
        impl = "einsum"
    if impl != "einsum" and not use_probs_dropout:
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=1.0,
            implementation=None if impl == "auto" else impl)
    if not use_probs_dropout and takes_blocks(q.shape[1], k.shape[1]):
        return blocked_attention_core(q, k, v, bias=bias, mask=mask)
    return einsum_attention_core(q, k, v, bias=bias, mask=mask, dropout_rate=dropout_rate,
                                 dropout_key=dropout_key)


def takes_blocks(q_len: int, k_len: int) -> bool:
    """Whether the einsum core runs block by block: on CPU, traced for one device, with at
    least `_BLOCKED_MIN_LOGITS` logits per (row, head)."""
    return (target_backend() == "cpu" and q_len * k_len >= _BLOCKED_MIN_LOGITS
            and tracing_on_one_device())


def einsum_attention_core(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None,
                          mask: jax.Array | None, dropout_rate: float = 0.0,
                          dropout_key: jax.Array | None = None) -> jax.Array:
    """The "einsum" core as whole-tensor einsums: float32 logits and probabilities
    [B, kv heads, groups, T, S], which XLA fuses with the bias, mask and softmax."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = num_heads // kv_heads
    qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    if bias is not None:
        heads = (kv_heads, groups) if bias.shape[1] > 1 else (1, 1)
        logits = add_bias(logits, bias.reshape(bias.shape[0], *heads, *bias.shape[2:]))
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, NEG_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = dropout(probs, dropout_rate, dropout_key)
    out = accumulated_einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


def fold_mask_into_bias(bias: jax.Array | None, mask: jax.Array, dtype) -> jax.Array:
    """One additive bias: `bias` (float32 [B|1, heads, T, S] or None) plus 0 where `mask`
    (bool [B|1, 1, T, S]) allows and cuDNN's large negative (-2**41) where it does not.

    It is what `jax.nn.dot_product_attention(implementation="cudnn")` builds from a bias and a
    mask inside every call (jax's `combine_bias_and_mask`, same values and dtypes): built once
    per stack and passed as the bias with no mask, every layer's attention reads it instead of
    building its own [B, heads, T, S] array.
    """
    additive = jnp.where(mask, jnp.asarray(0, dtype), jnp.asarray(-2 << 40, dtype))
    return additive if bias is None else bias + additive


class Attention(nnx.Module):
    """Projections + core. Used for self-attention (keys from x) and cross-attention (keys
    from the encoder output, possibly precomputed once per request)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, kvh, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
        pd = cfg.params_dtype
        # T5 initialisation (the missing 1/sqrt(head_dim) of the logits lives in q's init)
        self.q = make_param(rngs, normal((d * h) ** -0.5), (d, n, h), ("embed", "heads", "kv"), pd)
        self.k = make_param(rngs, normal(d ** -0.5), (d, kvh, h), ("embed", "kv_heads", "kv"), pd)
        self.v = make_param(rngs, normal(d ** -0.5), (d, kvh, h), ("embed", "kv_heads", "kv"), pd)
        self.o = make_param(rngs, normal((n * h) ** -0.5), (n, h, d), ("heads", "kv", "embed"), pd)
        self.dtype = cfg.compute_dtype
        self.impl = cfg.attention_impl
        self.dropout_rate = cfg.dropout_rate

    def query(self, x: jax.Array) -> jax.Array:
        q = dense("btd,dnh->btnh", x, kernel(self, "q", self.dtype))
        return constrain(q, ("batch", "length", "heads", "kv"))

    def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        k = dense("bsd,dkh->bskh", x, kernel(self, "k", self.dtype))
        v = dense("bsd,dkh->bskh", x, kernel(self, "v", self.dtype))
        return (constrain(k, ("batch", "length", "heads", "kv")),
                constrain(v, ("batch", "length", "heads", "kv")))

    def output(self, attended: jax.Array) -> jax.Array:
        out = dense("btnh,nhd->btd", attended, kernel(self, "o", self.dtype))
        return constrain(out, ("batch", "length", "embed"))

    def decode_output(self, attended: jax.Array) -> jax.Array:
        """`output` for incremental decoding: one 2-D matmul [N*T, heads*kv] x [heads*kv, embed].
        (With the einsum form XLA:CPU transposed the [heads, kv, embed] kernel on every
        decoding step to match the attention output's layout.)"""
        n, t, heads, kv = attended.shape
        w = kernel(self, "o", self.dtype)
        if isinstance(w, QTensor):  # int8: contracted axes lead, so the same 2-D form works
            w2 = QTensor(w.value.reshape(heads * kv, -1), w.scale.reshape(1, -1),
                         w.activations, w.dtype)
            out = dense("nk,kd->nd", attended.reshape(n * t, heads * kv), w2).reshape(n, t, -1)
        else:
            out = (attended.reshape(n * t, heads * kv) @ w.reshape(heads * kv, -1)
                   ).reshape(n, t, -1)
        return constrain(out, ("batch", "length", "embed"))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
               mask: jax.Array | None, dropout_key: jax.Array | None = None) -> jax.Array:
        """Core attention then output projection: [B, T, embed]."""
        attended = attention_core(q, k, v, bias=bias, mask=mask, impl=self.impl,
                                  dropout_rate=self.dropout_rate, dropout_key=dropout_key)
        return self.output(checkpoint_name(attended, "attended"))


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None,
                     mask: jax.Array | None) -> jax.Array:
    """Attention for incremental decoding, with keys/values in the *cache layout* [B, K, S, H].

    q [N, T, heads, H] with N = B * R: the R consecutive query rows b*R .. b*R+R-1 all read
    key/value row b (R = 1 for a self-attention cache; R = beams or samples for cross-attention
    K/V computed once per input, so they are never copied per beam). The R rows become extra
    query positions of one attention call. bias is float32 [B|1, heads, T', S] and mask bool
    [B|1, 1, T', S] (True = may attend) with T' = 1 (shared by all queries of a row b) or
    T' = R * T (one per regrouped query, in row order).

    [B, K, S, H] puts the dot products' batch dimensions (b, k) outermost, so on CPU the keys
    and values are read in place every step (the [B, S, K, H] training layout made XLA
    transpose every layer's cross K/V on every step). Returns [N, T, heads, H] in q's dtype.

    Example: 2 inputs x 3 beams, one new position: q [6, 1, heads, H], cross k/v
    [2, K, S, H] -> queries regrouped as [2, 3, heads, H] -> output [6, 1, heads, H].
    """
    n, q_len, num_heads, head_dim = q.shape
    batch, kv_heads = k.shape[0], k.shape[1]
    if n % batch:
        raise ValueError(f"{n} query rows cannot share {batch} key/value rows.")
    reps = n // batch
    groups = num_heads // kv_heads
    # keys/values stored narrower than q (a bfloat16 cross K/V cache): the dots run in their
    # dtype, so the cache is read as it is, never widened per step
    qg = q.reshape(batch, reps * q_len, kv_heads, groups, head_dim).astype(k.dtype)
    logits = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.reshape(bias.shape[0], kv_heads, groups, *bias.shape[2:])
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, NEG_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    # Output [b, k, g, t, h], then the (small) transpose: asking the dot for "btkgh" directly
    # made XLA:CPU run it about 10x slower once t > 1 (beams sharing cross K/V).
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v).astype(q.dtype)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(n, q_len, num_heads, head_dim)


class AbsorbedCross(NamedTuple):
    """What one decoder layer's cross-attention reads per step when its key and value
    projections are absorbed into the query and output sides (`absorbed_decode_attention`):
    wk [kv_heads, head_dim, embed] and wv [kv_heads, embed, head_dim] (the layer's k / v
    kernels rearranged once per request; int8 `QTensor`s for a quantized model, read as int8
    by the steps), encoded [B, S, embed] and encoded_t [B, embed, S] (the encoder output,
    shared by every layer)."""
    wk: jax.Array | QTensor
    wv: jax.Array | QTensor
    encoded: jax.Array
    encoded_t: jax.Array


def _absorbed_query(qk: jax.Array, wk: jax.Array | QTensor) -> jax.Array:
    """q moved into embed space, [kv_heads, M, head_dim] x wk [kv_heads, head_dim, embed]. An
    int8 wk's scales sit on the contracted head_dim axis, so they scale q first and the dot
    reads the int8 values as they are (`t5lite.models.quant.dense`)."""
    if not isinstance(wk, QTensor):
        return accumulated_einsum("kmh,khd->kmd", qk.astype(wk.dtype), wk)
    kv_heads, _, head_dim = qk.shape
    scaled = qk.astype(jnp.float32) * wk.scale.reshape(kv_heads, 1, head_dim)
    if wk.activations == "float":  # weight-only: the dot runs in the compute dtype
        scaled = scaled.astype(wk.dtype)
    unit = dataclasses.replace(wk, scale=jnp.ones((kv_heads, 1, 1), jnp.float32))
    return dense("kmh,khd->kmd", scaled, unit)


def absorbed_decode_attention(q: jax.Array, cross: AbsorbedCross,
                              mask: jax.Array | None) -> jax.Array:
    """Cross-attention for incremental decoding without cross K/V: the same function as
    `decode_attention(q, E Wk, E Wv)`, computed as

        logits[b, n, s] = (q[b, n] . Wk[kv(n)]^T) . E[b, s]      (q moved into embed space)
        out[b, n]       = (sum_s p[b, n, s] E[b, s]) . Wv[kv(n)]  (V applied after the sum)

    Linear algebra only (cross-attention has no RoPE, bias or key norm), so nothing per layer
    is stored but the encoder output E, shared by all layers: a step reads E (B*S*embed, in
    cache) twice per layer instead of the layer's K and V (2*B*kv_heads*S*head_dim, streamed
    from memory), and a request skips computing and transposing every layer's K/V. It costs
    embed/head_dim times the FLOPs of the K/V form (8x for T5 v1.1-small), which pays where
    a decode step is bound by memory, not FLOPs (CPUs).

    q [N, T, heads, H] with N = B * R rows (R beams / samples per input, sharing E as in
    `decode_attention`); mask bool [B, 1, 1, S] (one per input). Returns [N, T, heads, H].

    Example: T5 v1.1-small, batch 8, 512 inputs: the K/V form streams 2 x 8 x 6 x 512 x 64
    floats per layer (12.6 MB in float32) every step; this form reads the 8 x 512 x 512
    encoder output (4 MB in bfloat16) from cache and the layer's two 512 x 384 kernels.
    """
    n, q_len, num_heads, head_dim = q.shape
    batch, _, embed = cross.encoded.shape
    kv_heads = cross.wk.shape[0]
    if n % batch:
        raise ValueError(f"{n} query rows cannot share {batch} encoder rows.")
    if mask is not None and mask.shape[2] != 1:
        raise ValueError(f"the cross-attention mask must be one per input, got {mask.shape}.")
    reps, groups = n // batch, num_heads // kv_heads
    dt = cross.encoded.dtype
    # [kv_heads, B * R*T * groups, head_dim]: one small batched dot per kv head
    qk = q.reshape(batch, reps * q_len, kv_heads, groups, head_dim)
    qk = jnp.transpose(qk, (2, 0, 1, 3, 4)).reshape(kv_heads, -1, head_dim)
    qd = _absorbed_query(qk, cross.wk).astype(dt)
    # [B, kv_heads * R*T * groups, embed]
    qd = jnp.swapaxes(qd.reshape(kv_heads, batch, -1, embed), 0, 1).reshape(batch, -1, embed)
    logits = jnp.einsum("bmd,bds->bms", qd, cross.encoded_t, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, 0], logits, NEG_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    ctx = accumulated_einsum("bms,bsd->bmd", probs, cross.encoded)
    ctx = jnp.swapaxes(ctx.reshape(batch, kv_heads, -1, embed), 0, 1).reshape(kv_heads, -1, embed)
    if isinstance(cross.wv, QTensor):  # int8: its per-(kv head, head_dim) scale is an output's
        out = dense("kmd,kdh->kmh", ctx, cross.wv)
    else:
        out = accumulated_einsum("kmd,kdh->kmh", ctx.astype(cross.wv.dtype), cross.wv)
    out = out.reshape(kv_heads, batch, reps * q_len, groups, head_dim)
    return jnp.transpose(out, (1, 2, 0, 3, 4)).reshape(n, q_len, num_heads, head_dim
                                                       ).astype(q.dtype)


def write_position(cache: jax.Array, new: jax.Array, position: jax.Array) -> jax.Array:
    """Write one new position's keys or values new [N, 1, K, H] into cache [B, K, R*M, H].

    N = B * R: row n = b*R + r owns region r (positions r*M .. r*M + M-1) of cache row b (R = 1:
    a plain per-row cache; R > 1: the beams of input b share one cache row, see
    `t5lite.models.cache`). `position` (< M) is a scalar (every row writes the same position:
    one dynamic-update-slice, in place inside a decoding loop) or int [N] (a scatter).
    """
    n, _, kv_heads, head_dim = new.shape
    batch = cache.shape[0]
    reps = n // batch
    length = cache.shape[2] // reps
    new = new.reshape(batch, reps, kv_heads, head_dim).astype(cache.dtype)
    # The cache is indexed as it is, never reshaped: XLA:CPU updated a reshaped view of a
    # loop-carried buffer out of place (a copy of the whole cache per step).
    if position.ndim == 0:
        for r in range(reps):
            update = new[:, r, :, None, :]  # [B, K, 1, H]
            cache = jax.lax.dynamic_update_slice(cache, update, (0, 0, r * length + position, 0))
        return cache
    b = jnp.arange(n) // reps
    r = jnp.arange(n) % reps
    return cache.at[b, :, r * length + position].set(new.reshape(n, kv_heads, head_dim))
