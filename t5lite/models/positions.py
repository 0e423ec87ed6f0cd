"""Position information: T5 relative position bias and rotary embeddings (RoPE).

Relative position bias (T5): the signed distance `key_position - query_position` is mapped to
one of `num_buckets` buckets (exact for small distances, logarithmic up to `max_distance`, then
clipped); each bucket has a learned scalar per head that is added to the attention logits. In
the encoder the buckets are bidirectional (half of them for keys after the query); in the decoder
they are causal (all keys after the query share bucket 0). One table per stack, shared by all
layers of the stack.

Example (bidirectional, 32 buckets, max distance 128)::

    >>> relative_position_bucket(np.array([-3, 0, 3, 200]), True, 32, 128)
    array([ 3,  0, 19, 31])
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5lite.models.layers import make_param, normal


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
    """Bucket ids (int32) for `relative_position = key_pos - query_pos` (numpy or jax)."""
    xp = jnp if isinstance(relative_position, jax.Array) else np
    relative_position = xp.asarray(relative_position).astype(xp.int32)
    buckets = xp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(xp.int32) * num_buckets
        distance = xp.abs(relative_position)
    else:
        distance = -xp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 arithmetic in the same order as the reference implementation, so that the
    # bucket boundaries agree exactly.
    scaled = (xp.log(xp.maximum(distance, 1).astype(xp.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
    large = max_exact + scaled.astype(xp.int32)
    large = xp.minimum(large, num_buckets - 1)
    return (buckets + xp.where(is_small, distance, large)).astype(xp.int32)


class RelativePositionBias(nnx.Module):
    """Learned bias table [relpos_buckets, heads] -> additive logits bias [B|1, heads, q, k]."""

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool,
                 param_dtype: jnp.dtype, *, rngs: nnx.Rngs, init_std: float = 1.0):
        self.embedding = make_param(rngs, normal(init_std), (num_buckets, num_heads),
                                    ("relpos_buckets", "heads"), param_dtype)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """Bias for positions [B|1, q] x [B|1, k]; returns float32 [B|1, heads, q, k]."""
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        table = self.embedding[...].astype(jnp.float32)
        # one-hot matmul instead of a gather: cheap (few buckets) and sharding friendly
        values = jnp.take(table, buckets, axis=0)  # [B, q, k, heads]
        return jnp.transpose(values, (0, 3, 1, 2))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of x [B, T, heads, head_dim] at positions [B|1, T] (half-split pairs:
    dimension i rotates with dimension i + head_dim/2). Computed in float32."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    freqs = 1.0 / (theta ** (np.arange(half, dtype=np.float32) * 2.0 / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
