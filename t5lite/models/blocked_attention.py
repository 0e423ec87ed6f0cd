"""Attention on CPU, one (batch row, kv head) block at a time, so each block's logits stay in
cache.

The einsum core (`t5lite.models.attention.attention_core`) materialises float32 logits and
probabilities [B, heads, T, S] (T5 v1.1-small, batch 8 x 512: 50 MB per layer, 100 MB with
the probabilities) and streams them through memory several times (bias, mask, softmax, the two
dots). On CPU that traffic, not the FLOPs, sets the time. `blocked_attention_core` runs the
same function as a loop over (row b, kv head k): the block's logits [groups * T, S] (512 x 512
float32: 1 MB) are computed, biased, masked, softmaxed and multiplied by V while they are in
the core's L2 cache, with 2D dots only (so bfloat16 blocks take XLA:CPU's float32-result fast
path, `t5lite.models.matmul`).

Its backward pass is written out (flash-attention style): nothing [T, S]-sized is kept from the
forward pass; each block's probabilities are recomputed from q, k, bias and mask, then

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)),  dQ = dS K,  dK = dS^T Q,

with dS zero where the mask forbids, and the bias gradient is dS summed over the axes the bias
broadcasts along. So training keeps no probabilities between the passes (less memory than the
einsum core) and the backward dots are 2D float32-result dots too.

Example (the result equals the einsum core's; T5 has no 1/sqrt(head_dim) scaling)::

    q = k = v = jnp.ones((2, 4, 6, 8))          # [B, T, heads, head_dim]
    out = blocked_attention_core(q, k, v, bias=None, mask=None)   # [2, 4, 6, 8]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_LOGIT = -1e9  # masked logit of both attention cores (finite: fully masked rows stay finite)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2D dot contracting a's axis contract[0] with b's axis contract[1], float32 result."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               preferred_element_type=jnp.float32)


def _logits(q, k, bias, mask, groups: int):
    """float32 masked logits [G*T, S] of one block (q [G*T, H], k [S, H], bias [G|1, T, S] or
    None, mask bool [T, S] or None) and the mask broadcast to [G*T, S] (or None)."""
    rows, seq = q.shape[0], k.shape[0]
    logits = _dot(q, k, (1, 1))
    if bias is not None:
        logits = (logits.reshape(groups, rows // groups, seq) + bias).reshape(rows, seq)
    full_mask = None
    if mask is not None:
        full_mask = jnp.broadcast_to(mask, (groups, rows // groups, seq)).reshape(rows, seq)
        logits = jnp.where(full_mask, logits, NEG_LOGIT)
    return logits, full_mask


def _probabilities(q, k, bias, mask, groups: int):
    """float32 probabilities [G*T, S] of one block and its broadcast mask (see `_logits`)."""
    logits, full_mask = _logits(q, k, bias, mask, groups)
    return jax.nn.softmax(logits, axis=-1), full_mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block(groups: int, q, k, v, bias, mask):
    """softmax(q k^T + bias, masked) v for one block; q [G*T, H] (the G query heads that share
    kv head k, stacked), k/v [S, H]; bias float32 [G|1, T, S] or None; mask bool [T, S] or None.
    Returns [G*T, H] in q's dtype. The forward pass multiplies V by the unnormalised weights
    exp(logits - max), cast to v's dtype, and divides the [G*T, H] result by the row sums,
    which saves one pass over the [G*T, S] block (the backward pass uses the normalised
    probabilities). The row sums come out of the same dot, through a column of ones appended
    to V: with bfloat16 V that saves another pass (a float32 reduction beside the bfloat16
    cast: T5 v1.1-small's encoder self-attention, batch 8 x 512, one layer, 29.8 -> 26.5 ms on
    a 2-core Intel Xeon VM; float32 unchanged), and it normalises by the sum of the weights
    actually multiplied."""
    logits, _ = _logits(q, k, bias, mask, groups)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)).astype(v.dtype)
    head_dim = v.shape[1]
    v_ones = jnp.concatenate([v, jnp.ones((v.shape[0], 1), v.dtype)], axis=1)
    out = _dot(weights, v_ones, (1, 0))
    return (out[:, :head_dim] / out[:, head_dim:]).astype(q.dtype)


def _block_fwd(groups, q, k, v, bias, mask):
    return _block(groups, q, k, v, bias, mask), (q, k, v, bias, mask)


def _block_bwd(groups, residuals, d_out):
    q, k, v, bias, mask = residuals
    probs, full_mask = _probabilities(q, k, bias, mask, groups)
    d_out = d_out.astype(v.dtype)
    d_v = _dot(probs.astype(v.dtype), d_out, (0, 0))
    d_probs = _dot(d_out, v, (1, 1))
    d_logits = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    if full_mask is not None:
        d_logits = jnp.where(full_mask, d_logits, 0.0)
    d_logits_low = d_logits.astype(q.dtype)
    d_q = _dot(d_logits_low, k, (1, 0))
    d_k = _dot(d_logits_low, q, (0, 0))
    d_bias = None
    if bias is not None:
        rows, seq = d_logits.shape
        d_bias = d_logits.reshape(groups, rows // groups, seq)
        broadcast = tuple(i for i in range(3) if bias.shape[i] == 1 and d_bias.shape[i] > 1)
        d_bias = jnp.sum(d_bias, axis=broadcast, keepdims=True).astype(bias.dtype)
    d_mask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_bias, d_mask)


_block.defvjp(_block_fwd, _block_bwd)


def rows_per_step(batch: int, dtype) -> int:
    """How many batch rows one loop step takes, as independent block chains: up to 4 in float32
    and 2 in bfloat16, the largest count that divides `batch`. (Measured on T5 v1.1-small,
    batch 8, on a 2-core Intel Xeon VM against 1 row per step: the encoder pass was ~10 %
    faster with 2 or 4; the train step was 4 % faster with 4 in float32, but 6 % slower with
    4 in bfloat16, 2 % faster with 2.)"""
    most = 4 if jnp.dtype(dtype) == jnp.float32 else 2
    return next(n for n in (4, 3, 2, 1) if n <= most and batch % n == 0)


def blocked_attention_core(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None,
                           mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T + bias, masked) v for q [B, T, N, H], k/v [B, S, K, H] (N % K == 0), bias
    float32 [B|1, N|1, T, S], mask bool [B|1, 1, T, S] (True = may attend); [B, T, N, H] in q's
    dtype. Same function as the einsum core, computed per (row, kv head) block (module doc).

    One flat loop runs over (kv head, group of `rows_per_step` rows), unrolled twice; each step
    holds that many blocks as separate chains of small ops, so XLA:CPU's thunk executor can run
    them on different threads; with one chain per step one core does almost all the work (T5
    v1.1-small's encoder self-attention, batch 8 x 512, one layer: 25 -> 18 ms in bfloat16 and
    38 -> 29 ms in float32 with 4 rows per step on a 2-core VM). The flat loop, unrolled, with
    each step slicing its heads' bias in place, replaced a loop over heads around a loop over
    row groups, whose every iteration boundary made both threads wait for the slower chain
    (same layer, 2-core Intel Xeon VM: 27 -> 19 ms in bfloat16, 36 -> 32 ms in float32;
    benchmarks/attention_module_ab.py).

    Example (B=8, K=6, 2 rows per step): 24 steps; step i takes kv head i // 4 and rows
    2 (i % 4), 2 (i % 4) + 1."""
    batch, q_len, num_heads, head_dim = q.shape
    seq, kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // kv_heads
    per_step = rows_per_step(batch, q.dtype)
    steps = batch // per_step

    def blocks(x):  # [B, K, ...] -> [K * steps, per_step, ...]: step i is kv head i // steps
        x = jnp.moveaxis(x, 1, 0)
        return x.reshape(kv_heads * steps, per_step, *x.shape[2:])

    # [K * steps, per_step, G*T, H]: a block's G query heads stacked along the rows
    qb = blocks(q.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
                .reshape(batch, kv_heads, groups * q_len, head_dim))
    kb = blocks(k.transpose(0, 2, 1, 3))
    vb = blocks(v.transpose(0, 2, 1, 3))
    row_bias = bias is not None and bias.shape[0] > 1
    head_bias = bias is not None and bias.shape[1] > 1
    if row_bias:  # [steps, per_step, N|1, T, S]; else bias[0] is [N|1, T, S]
        bias = bias.reshape(steps, per_step, *bias.shape[1:])
    row_mask = mask is not None and mask.shape[0] > 1
    if row_mask:  # [steps, per_step, T, S]
        mask = mask[:, 0].reshape(steps, per_step, *mask.shape[2:])

    def one_step(carry, xs):
        i, q_s, k_s, v_s = xs
        head, row_step = i // steps, i % steps
        bias_s = mask_s = None
        if bias is not None:  # [per_step, G|1, T, S] per row, else [G|1, T, S]
            bias_s = jax.lax.dynamic_index_in_dim(bias, row_step, keepdims=False) if row_bias \
                else bias[0]
            if head_bias:  # the G query heads of kv head `head`, sliced in place
                bias_s = jax.lax.dynamic_slice_in_dim(bias_s, head * groups, groups,
                                                      axis=1 if row_bias else 0)
        if mask is not None:
            mask_s = (jax.lax.dynamic_index_in_dim(mask, row_step, keepdims=False) if row_mask
                      else mask[0, 0])
        outs = []
        for j in range(per_step):  # independent chains: the executor may run them at once
            bias_j = None if bias is None else (bias_s[j] if row_bias else bias_s)
            mask_j = None if mask is None else (mask_s[j] if row_mask else mask_s)
            outs.append(_block(groups, q_s[j], k_s[j], v_s[j], bias_j, mask_j))
        return carry, jnp.stack(outs)

    _, out = jax.lax.scan(one_step, None, (jnp.arange(kv_heads * steps), qb, kb, vb), unroll=2)
    # [K * steps, per_step, G*T, H] -> [B, T, N, H]
    out = out.reshape(kv_heads, batch, groups, q_len, head_dim)
    return out.transpose(1, 3, 0, 2, 4).reshape(batch, q_len, num_heads, head_dim)
