"""Decoding caches: plain dicts of jax arrays (usable inside jit / lax.while_loop).

Self-attention cache (`init_decode_cache(batch, max_len, beams=R)`) for N = batch * R rows:
    {"k": ([batch, kv_heads, R * max_len, head_dim],) * layers, "v": same,
     "owner": int32 [N, max_len]}
Cross-attention values (`precompute_cross_attention`, computed once per request):
    {"k": ([B, kv_heads, S_enc, head_dim],) * layers, "v": same, "mask": bool [B, S_enc]}

Why this layout: decoding runs the layers unrolled inside a `while_loop`; with one buffer per
layer each step updates every cache in place, and [batch, kv_heads, length, head_dim] is the
layout the attention dot products read without a transpose (`decode_attention`).

Rows and regions: row n = b*R + r (beam r of input b, beam-minor) writes its keys/values into
region r (positions r*max_len ... r*max_len + max_len - 1) of cache row b, and at position p
it reads region owner[n, p]. Every step sets owner[n, step] = r. With R = 1 (greedy, sampling)
every owner is 0 and this is a plain per-row cache. With R > 1 (beam search) re-ranking the
beams only reorders the small `owner` table (`take_batch(cache, rows, beam_shared=True)`, or
`BEAM_AXES` for `decoding.beam_search`): a beam keeps reading the keys/values its ancestors
wrote, wherever they are, so the caches themselves are never copied. A decoder-only prompt is
prefilled once into region 0 (owner 0), shared by all beams.

The plain alternative also works: `tile_batch(model.init_decode_cache(B, M), R)` gives B*R
independent rows (R = 1 each) that `take_batch(cache, rows)` reorders by copying them.

Example::

    >>> cache = model.init_decode_cache(2, 16, beams=4)   # a 6-layer decoder, 8 rows
    >>> len(cache["k"]), cache["k"][0].shape[0], cache["k"][0].shape[2], num_rows(cache)
    (6, 2, 64, 8)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

BATCH_AXIS = {"k": 0, "v": 0, "owner": 0, "mask": 0}
"""Batch axis of every array under each key (a prefix tree for `decoding.tile_beams` /
`decoding.gather_rows`) for plain caches (R = 1) and cross-attention values."""

BEAM_AXES = {"k": None, "v": None, "owner": 0}
"""Batch axes of a cache made with beams > 1 for `decoding.beam_search`: reordering beams
only reorders `owner` (None: the leaf is not reordered)."""


def _map(tree: dict[str, Any], fn, axes: dict[str, int | None]) -> dict[str, Any]:
    return {name: value if axes[name] is None else
            jax.tree.map(lambda a, axis=axes[name]: fn(a, axis), value)
            for name, value in tree.items()}


def tile_batch(tree: dict[str, Any], n: int) -> dict[str, Any]:
    """Repeat every batch row n times (row b -> rows b*n ... b*n + n - 1)."""
    return _map(tree, lambda a, axis: jnp.repeat(a, n, axis=axis), BATCH_AXIS)


def take_batch(tree: dict[str, Any], rows: jax.Array, beam_shared: bool = False
               ) -> dict[str, Any]:
    """Select rows (e.g. the parents of the surviving beams). `beam_shared`: the cache was
    made with beams > 1 (only the owner table moves; `rows` must stay within each input's
    beams)."""
    return _map(tree, lambda a, axis: jnp.take(a, rows, axis=axis),
                BEAM_AXES if beam_shared else BATCH_AXIS)


def num_rows(cache: dict[str, Any]) -> int:
    """Rows N of a self-attention cache (batch * beams)."""
    return cache["owner"].shape[0]
