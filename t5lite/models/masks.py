"""Attention masks from padding, packing and causality. True = may attend.

Conventions (SeqIO / T5X): token id 0 is padding; with packing, segment id 0 is padding and
tokens only see tokens of their own segment; positions restart at 0 in every segment.

Example (packed encoder row, segments [1, 1, 2, 0])::

    >>> segment_mask(jnp.array([[1, 1, 2, 0]]), jnp.array([[1, 1, 2, 0]]))[0, 0].astype(int)
    [[1 1 0 0]
     [1 1 0 0]
     [0 0 1 0]
     [0 0 0 0]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def key_padding_mask(valid_keys: jax.Array) -> jax.Array:
    """[B, S] bool -> [B, 1, 1, S]: every query sees the valid keys."""
    return valid_keys[:, None, None, :]


def segment_mask(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """[B, T], [B, S] -> [B, 1, T, S]: same segment and key not padding."""
    same = query_segments[:, :, None] == key_segments[:, None, :]
    return (same & (key_segments[:, None, :] != 0))[:, None]


def causal_mask(length: int) -> jax.Array:
    """[1, 1, T, T]: query t sees keys <= t."""
    idx = jnp.arange(length)
    return (idx[None, :] <= idx[:, None])[None, None]


def prefix_lm_mask(causal_attention: jax.Array) -> jax.Array:
    """Prefix-LM: causal, plus full attention among the positions where causal_attention == 1
    (SeqIO's `decoder_causal_attention`: the inputs and one extra position). [B, T] -> [B,1,T,T].

    Example: causal_attention [1, 1, 1, 0, 0] -> positions 0-2 see each other both ways,
    positions 3 and 4 see everything before them (and themselves).
    """
    length = causal_attention.shape[1]
    prefix = causal_attention.astype(bool)
    bidirectional = prefix[:, :, None] & prefix[:, None, :]
    return causal_mask(length) | bidirectional[:, None]


def combine(*masks: jax.Array | None) -> jax.Array | None:
    """Logical and of the masks that are not None (None if all are None)."""
    out = None
    for m in masks:
        if m is None:
            continue
        out = m if out is None else (out & m)
    return out
