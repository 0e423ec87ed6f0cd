"""Decoding caches: plain dicts of jax arrays (usable inside jit / lax.while_loop).

Self-attention cache (`init_decode_cache`):
    {"k": [layers, B, max_len, kv_heads, head_dim], "v": same}
Cross-attention values (`precompute_cross_attention`, computed once per request):
    {"k": [layers, B, S_enc, kv_heads, head_dim], "v": same, "mask": bool [B, S_enc]}

Beam search keeps beams in the batch dimension (row b*num_beams + j is beam j of example b):
`tile_batch(cross, n)` once after the encoder, `tile_batch(cache, n)` after init, and
`take_batch(cache, rows)` to reorder beams after each step.

Example::

    >>> cross = model.precompute_cross_attention(encoded, tokens)    # B = 2
    >>> beams = tile_batch(cross, 4)                                  # B = 8
    >>> beams["mask"].shape[0], beams["k"].shape[1]
    (8, 8)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

BATCH_AXIS = {"k": 1, "v": 1, "mask": 0}


def _map(tree: dict[str, Any], fn) -> dict[str, Any]:
    return {name: fn(value, BATCH_AXIS[name]) for name, value in tree.items()}


def tile_batch(tree: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """Repeat every batch row n times (row b -> rows b*n ... b*n + n - 1)."""
    return _map(tree, lambda a, axis: jnp.repeat(a, n, axis=axis))


def take_batch(tree: dict[str, jax.Array], rows: jax.Array) -> dict[str, jax.Array]:
    """Select batch rows (e.g. the parents of the surviving beams)."""
    return _map(tree, lambda a, axis: jnp.take(a, rows, axis=axis))


def batch_size(tree: dict[str, jax.Array]) -> int:
    return tree["k"].shape[BATCH_AXIS["k"]]
