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
from typing import NamedTuple

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


def _block_bwd(groups, residuals, d_out):
    """Gradients (q, k, v, bias or None) of `_block` for one block: its probabilities are
    recomputed from the residuals (q, k, v, bias, mask), nothing [T, S]-sized is kept."""
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
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_bias


def _block_vjp_fwd(groups, q, k, v, bias, mask):
    return _block(groups, q, k, v, bias, mask), (q, k, v, bias, mask)


def _block_vjp_bwd(groups, residuals, d_out):
    mask = residuals[4]
    return (*_block_bwd(groups, residuals, d_out),
            None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0))


# `_block` with its gradient, for loops that JAX differentiates (the float32 path)
_block_with_vjp = jax.custom_vjp(_block, nondiff_argnums=(0,))
_block_with_vjp.defvjp(_block_vjp_fwd, _block_vjp_bwd)


def rows_per_step(batch: int, dtype) -> int:
    """How many batch rows one loop step takes, as independent block chains: up to 4 in float32
    and 2 in bfloat16, the largest count that divides `batch`. (Measured on T5 v1.1-small,
    batch 8, on a 2-core Intel Xeon VM against 1 row per step: the encoder pass was ~10 %
    faster with 2 or 4; the train step was 4 % faster with 4 in float32, but 6 % slower with
    4 in bfloat16, 2 % faster with 2.)"""
    most = 4 if jnp.dtype(dtype) == jnp.float32 else 2
    return next(n for n in (4, 3, 2, 1) if n <= most and batch % n == 0)


class _Plan(NamedTuple):
    """How `blocked_attention_core` cuts q [B, T, N, H] and k/v [B, S, K, H] into blocks."""
    batch: int
    q_len: int
    seq: int
    num_heads: int
    kv_heads: int
    per_step: int  # rows per loop step (`rows_per_step`)

    @property
    def groups(self) -> int:
        return self.num_heads // self.kv_heads

    @property
    def steps(self) -> int:
        return self.batch // self.per_step


def _to_blocks(x: jax.Array, kv_heads: int, per_step: int) -> jax.Array:
    """[B, L, N, H] -> [K * steps, per_step, G*L, H] (N = K * G): step i is kv head
    i // steps, a block's G query heads stacked along the rows. For k/v, N = K and G = 1."""
    batch, length, heads, head_dim = x.shape
    groups = heads // kv_heads
    x = x.reshape(batch, length, kv_heads, groups, head_dim).transpose(2, 0, 3, 1, 4)
    return x.reshape(kv_heads * batch // per_step, per_step, groups * length, head_dim)


def _from_blocks(x: jax.Array, batch: int, length: int, heads: int, kv_heads: int) -> jax.Array:
    """Inverse of `_to_blocks`: [K * steps, per_step, G*L, H] -> [B, L, N, H]."""
    head_dim = x.shape[-1]
    x = x.reshape(kv_heads, batch, heads // kv_heads, length, head_dim)
    return x.transpose(1, 3, 0, 2, 4).reshape(batch, length, heads, head_dim)


def _bits(x: jax.Array) -> jax.Array:
    """bfloat16 as uint16 bits, anything else as is. A while loop's bfloat16 inputs and
    outputs are widened to float32 by XLA:CPU (a convert of every slice on the way in and of
    every result on the way out); as integers they pass untouched."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _unbits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def _prepare(plan: _Plan, bias, mask):
    """bias [steps, per_step, N|1, T, S] per row, else [N|1, T, S]; mask [steps, per_step, T,
    S] per row, else [T, S]; None stays None."""
    if bias is not None:
        bias = (bias.reshape(plan.steps, plan.per_step, *bias.shape[1:]) if bias.shape[0] > 1
                else bias[0])
    if mask is not None:
        mask = (mask[:, 0].reshape(plan.steps, plan.per_step, *mask.shape[2:])
                if mask.shape[0] > 1 else mask[0, 0])
    return bias, mask


def _step_inputs(plan: _Plan, bias, mask, head, row_step):
    """A step's bias (its kv head's G query heads, sliced in place) and mask: lists of
    per_step entries, [G|1, T, S] and [T, S] (or None)."""
    rows = range(plan.per_step)
    bias_rows = mask_rows = [None] * plan.per_step
    if bias is not None:
        row_bias = bias.ndim == 5
        b = jax.lax.dynamic_index_in_dim(bias, row_step, keepdims=False) if row_bias else bias
        if b.shape[-3] > 1:
            b = jax.lax.dynamic_slice_in_dim(b, head * plan.groups, plan.groups, axis=b.ndim - 3)
        bias_rows = [b[j] for j in rows] if row_bias else [b] * plan.per_step
    if mask is not None:
        if mask.ndim == 4:
            m = jax.lax.dynamic_index_in_dim(mask, row_step, keepdims=False)
            mask_rows = [m[j] for j in rows]
        else:
            mask_rows = [mask] * plan.per_step
    return bias_rows, mask_rows


def _blocked(plan: _Plan, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Each [B, L, N|K, H] array in the loop's block layout (`_to_blocks`), bfloat16 as bits."""
    return tuple(_bits(_to_blocks(x, plan.kv_heads, plan.per_step)) for x in arrays)


def _forward(plan: _Plan, q, k, v, bias, mask, block=_block):
    prepared_bias, prepared_mask = _prepare(plan, bias, mask)
    qb, kb, vb = _blocked(plan, q, k, v)

    def one_step(carry, xs):
        i, q_s, k_s, v_s = xs
        q_s, k_s, v_s = _unbits(q_s), _unbits(k_s), _unbits(v_s)
        bias_rows, mask_rows = _step_inputs(plan, prepared_bias, prepared_mask, i // plan.steps,
                                            i % plan.steps)
        outs = [block(plan.groups, q_s[j], k_s[j], v_s[j], bias_rows[j], mask_rows[j])
                for j in range(plan.per_step)]  # independent chains: run on both cores
        return carry, _bits(jnp.stack(outs))

    _, out = jax.lax.scan(one_step, None, (jnp.arange(plan.kv_heads * plan.steps), qb, kb, vb),
                          unroll=2)
    return _from_blocks(_unbits(out), plan.batch, plan.q_len, plan.num_heads, plan.kv_heads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(plan: _Plan, q, k, v, bias, mask):
    return _forward(plan, q, k, v, bias, mask)


def _core_fwd(plan, q, k, v, bias, mask):
    return _forward(plan, q, k, v, bias, mask), (q, k, v, bias, mask)


def _core_bwd(plan, residuals, d_out):
    """The same loop backwards: each block's `_block_bwd`; the bias gradient accumulates in the
    loop's carry (the blocks of one head, or one row, share a bias slice)."""
    q, k, v, bias, mask = residuals
    prepared_bias, prepared_mask = _prepare(plan, bias, mask)
    qb, kb, vb, d_ob = _blocked(plan, q, k, v, d_out.astype(q.dtype))
    d_bias0 = None if bias is None else jnp.zeros(prepared_bias.shape, jnp.float32)

    def one_step(d_bias, xs):
        i, q_s, k_s, v_s, d_o = xs
        q_s, k_s, v_s, d_o = _unbits(q_s), _unbits(k_s), _unbits(v_s), _unbits(d_o)
        head, row_step = i // plan.steps, i % plan.steps
        bias_rows, mask_rows = _step_inputs(plan, prepared_bias, prepared_mask, head, row_step)
        grads = [_block_bwd(plan.groups, (q_s[j], k_s[j], v_s[j], bias_rows[j], mask_rows[j]),
                            d_o[j]) for j in range(plan.per_step)]
        if d_bias is not None:
            row_bias = d_bias.ndim == 5
            d_step = (jnp.stack([g[3] for g in grads]) if row_bias
                      else sum(g[3] for g in grads))
            if row_bias:  # [per_step, G|1, T, S] into row group `row_step`
                start = (row_step, 0, head * plan.groups if d_bias.shape[2] > 1 else 0, 0, 0)
                d_step = d_step[None]
            else:  # [G|1, T, S]
                start = (head * plan.groups if d_bias.shape[0] > 1 else 0, 0, 0)
            d_bias = jax.lax.dynamic_update_slice(
                d_bias, jax.lax.dynamic_slice(d_bias, start, d_step.shape) + d_step, start)
        stacked = [_bits(jnp.stack([g[n] for g in grads])) for n in range(3)]
        return d_bias, tuple(stacked)

    d_bias, (d_qb, d_kb, d_vb) = jax.lax.scan(
        one_step, d_bias0, (jnp.arange(plan.kv_heads * plan.steps), qb, kb, vb, d_ob), unroll=2)
    d_q = _from_blocks(_unbits(d_qb), plan.batch, plan.q_len, plan.num_heads, plan.kv_heads)
    d_k, d_v = (_from_blocks(_unbits(x), plan.batch, plan.seq, plan.kv_heads, plan.kv_heads)
                for x in (d_kb, d_vb))
    if bias is not None:
        d_bias = d_bias.reshape(bias.shape).astype(bias.dtype)
    d_mask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    return d_q, d_k, d_v, d_bias, d_mask


_core.defvjp(_core_fwd, _core_bwd)


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

    In bfloat16 the backward pass is the same loop over `_block_bwd`, written out (`_core`),
    so that the blocks pass through both loops as uint16 bits (`_bits`), which carry no
    gradient of their own: XLA:CPU would widen them to float32 on the way in and out (same
    layer, forward + backward: 104 -> 76 ms; T5 v1.1-small's train step 5-8 % faster). In
    float32 JAX differentiates the loop over `_block_with_vjp`: the written-out loop was 2-3 %
    slower there in the train step, though not in the layer alone.

    Example (B=8, K=6, 2 rows per step): 24 steps; step i takes kv head i // 4 and rows
    2 (i % 4), 2 (i % 4) + 1."""
    batch, q_len, num_heads, _ = q.shape
    plan = _Plan(batch=batch, q_len=q_len, seq=k.shape[1], num_heads=num_heads,
                 kv_heads=k.shape[2], per_step=rows_per_step(batch, q.dtype))
    if q.dtype == jnp.bfloat16:
        return _core(plan, q, k, v, bias, mask)
    return _forward(plan, q, k, v, bias, mask, block=_block_with_vjp)
