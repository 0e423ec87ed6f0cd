"""Decoding caches: plain dicts of tuples of jax arrays (usable inside jit / lax.while_loop).

Self-attention cache (`init_decode_cache`), one array per decoder layer:
    {"k": ([B, kv_heads, max_len, head_dim],) * layers, "v": same}
Cross-attention values (`precompute_cross_attention`, computed once per request):
    {"k": ([B, kv_heads, S_enc, head_dim],) * layers, "v": same, "mask": bool [B, S_enc]}

Why this layout: decoding runs the layers unrolled inside a `while_loop`; with one buffer per
layer each step reads and updates every cache in place, and [B, kv_heads, length, head_dim]
is the layout the attention dot products read without a transpose (`decode_attention`).

Beam search and sampling keep beams in the batch dimension of the self-attention cache (row
b*num_beams + j is beam j of example b): `tile_batch(cache, n)` after init (or after a prefill)
and `take_batch(cache, rows)` to reorder beams after each step. Cross-attention values need no
tiling: `decode_step` lets the num_beams rows of an example share its cross row (tiling them,
`tile_batch(cross, n)`, gives the same result with n times the memory traffic).

Example::

    >>> cache = model.init_decode_cache(2, 16)        # a 6-layer decoder, B = 2
    >>> beams = tile_batch(cache, 4)                  # B = 8
    >>> len(beams["k"]), beams["k"][0].shape[0], batch_size(beams)
    (6, 8, 8)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

BATCH_AXIS = {"k": 0, "v": 0, "mask": 0}
"""Batch axis of every array under each key (a prefix tree for `decoding.tile_beams` /
`decoding.gather_rows`)."""


def _map(tree: dict[str, Any], fn) -> dict[str, Any]:
    return {name: jax.tree.map(lambda a, axis=BATCH_AXIS[name]: fn(a, axis), value)
            for name, value in tree.items()}


def tile_batch(tree: dict[str, Any], n: int) -> dict[str, Any]:
    """Repeat every batch row n times (row b -> rows b*n ... b*n + n - 1)."""
    return _map(tree, lambda a, axis: jnp.repeat(a, n, axis=axis))


def take_batch(tree: dict[str, Any], rows: jax.Array) -> dict[str, Any]:
    """Select batch rows (e.g. the parents of the surviving beams)."""
    return _map(tree, lambda a, axis: jnp.take(a, rows, axis=axis))


def batch_size(tree: dict[str, Any]) -> int:
    return tree["k"][0].shape[BATCH_AXIS["k"]]
