"""Decoding caches: plain dicts of jax arrays (usable inside jit / lax.while_loop).

Self-attention cache (`init_decode_cache(batch, cache_len, beams=R)`) for N = batch * R rows:
    {"k": ([batch, kv_heads, R * cache_len, head_dim],) * layers, "v": same,
     "owner": int32 [N, cache_len]}
Cross-attention values (`precompute_cross_attention`, computed once per request):
    {"k": ([B, kv_heads, S_enc, head_dim],) * layers, "v": same, "mask": bool [B, S_enc]}
or, absorbed (`t5lite.models.attention.absorbed_decode_attention`), no K/V at all:
    {"encoded": [B, S_enc, embed], "encoded_t": [B, embed, S_enc], "wk", "wv": kernels per
     layer, "mask": bool [B, S_enc]}

Why this layout: decoding runs the layers unrolled inside a `while_loop`; with one buffer per
layer each step updates every cache in place, and [batch, kv_heads, length, head_dim] is the
layout the attention dot products read without a transpose (`decode_attention`).

Rows and regions: row n = b*R + r (beam r of input b, beam-minor) writes its keys/values into
region r (positions r*cache_len ... r*cache_len + cache_len - 1) of cache row b, and at position p
it reads region owner[n, p]. Every step sets owner[n, step] = r. With R = 1 (greedy, sampling)
every owner is 0 and this is a plain per-row cache. With R > 1 (beam search) re-ranking the
beams only reorders the small `owner` table (`BEAM_AXES` as the batch axes of
`decoding.beam_search` / `decoding.gather_rows`): a beam keeps reading the keys/values its ancestors
wrote, wherever they are, so the caches themselves are never copied. A decoder-only prompt is
prefilled once into region 0 (owner 0), shared by all beams.

The plain alternative also works: `decoding.tile_beams(model.init_decode_cache(B, M), R,
BATCH_AXIS)` gives B*R independent rows (R = 1 each) that `decoding.gather_rows` reorders by
copying them.

Example::

    >>> cache = model.init_decode_cache(2, 16, beams=4)   # a 6-layer decoder, 8 rows
    >>> len(cache["k"]), cache["k"][0].shape[0], cache["k"][0].shape[2], cache["owner"].shape[0]
    (6, 2, 64, 8)
"""

from __future__ import annotations

BATCH_AXIS = {"k": 0, "v": 0, "owner": 0, "mask": 0, "encoded": 0, "encoded_t": 0, "wk": None,
              "wv": None}
"""Batch axis of every array under each key (a prefix tree for `decoding.tile_beams` /
`decoding.gather_rows`) for plain caches (R = 1) and cross-attention values of both forms
(None: a kernel, the same for every row)."""

BEAM_AXES = {"k": None, "v": None, "owner": 0}
"""Batch axes of a cache made with beams > 1 for `decoding.beam_search`: reordering beams
only reorders `owner` (None: the leaf is not reordered)."""
