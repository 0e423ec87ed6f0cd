"""`DecoderOnly`: causal language model with an optional bidirectional prefix (prefix-LM).

Inputs follow SeqIO's PrefixLMFeatureConverter / DecoderFeatureConverter: `decoder_input_tokens`
(targets shifted right), optional packing (`decoder_segment_ids`, `decoder_positions`) and
`decoder_causal_attention` (1 on the inputs and one extra position: those positions attend to
each other in both directions; every other position is causal).

Incremental decoding::

    >>> cache = model.init_decode_cache(batch_size=B, cache_len=64)
    >>> logits, cache = model.prefill(prompt, prefix_lengths, cache)   # [B, vocab] at len-1
    >>> logits, cache = model.decode_step(next_tokens, prefix_lengths, cache)  # per-row step
    >>> # in a decoding loop: layers = model.decoder.layer_modules() once, outside the loop,
    >>> # then model.decode_step(next_tokens, step, cache, layers)

`prefill` treats prompt positions < prefix_lengths[b] as the bidirectional prefix (pass the
SeqIO prefix length, i.e. inputs + 1) and ignores the rest of the row (padding). The next
position to decode for row b is prefix_lengths[b], so `decode_step` accepts a per-row step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t5lite.config import ModelConfig
from t5lite.errors import UserError
from t5lite.models.blocks import Context, Stack
from t5lite.models.encoder_decoder import (ModelBase, aux_from_stats, empty_cache,
                                          step_through)
from t5lite.models.layers import dropout, split_key
from t5lite.models.masks import causal_mask, combine, key_padding_mask, prefix_lm_mask, segment_mask


class DecoderOnly(ModelBase):
    """Decoder-only transformer (self-attention + FFN layers), same switches as the encoder-
    decoder (positions, GQA, GLU, MoE, scan, remat)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.architecture != "decoder_only":
            raise UserError(f"DecoderOnly needs architecture='decoder_only', got "
                            f"{cfg.architecture!r}; use EncoderDecoder (or build_model).")
        self._init_shared(cfg, rngs)
        self.decoder = Stack(cfg, "lm", rngs=rngs)

    def __call__(self, decoder_input_tokens: jax.Array, *,
                 decoder_segment_ids: jax.Array | None = None,
                 decoder_positions: jax.Array | None = None,
                 decoder_causal_attention: jax.Array | None = None, deterministic: bool = True,
                 dropout_rng: jax.Array | None = None, return_features: bool = False):
        """(logits float32 [B, T, vocab], aux dict of float32 scalars); `OutputFeatures` in
        place of the logits with `return_features=True` (see `EncoderDecoder.__call__`)."""
        key = self._dropout_key(deterministic, dropout_rng)
        k_embed, k_stack, k_out = split_key(key, 3)
        length = decoder_input_tokens.shape[1]
        base = (causal_mask(length) if decoder_causal_attention is None
                else prefix_lm_mask(decoder_causal_attention))
        seg = (None if decoder_segment_ids is None
               else segment_mask(decoder_segment_ids, decoder_segment_ids))
        pos = jnp.arange(length)[None] if decoder_positions is None else decoder_positions
        ctx = Context(self_mask=combine(base, seg),
                      self_bias=self.decoder.sequence_bias(pos, length), positions=pos,
                      token_mask=None if decoder_segment_ids is None else decoder_segment_ids != 0)
        x, stats = self.decoder(self._embed(decoder_input_tokens, k_embed), ctx, k_stack)
        x = dropout(x, self.config.dropout_rate, k_out)
        return self.output(x, return_features), aux_from_stats(self.config, stats)

    def init_decode_cache(self, batch_size: int, cache_len: int, beams: int = 1) -> dict:
        """Zeroed self-attention cache for batch_size * beams rows (`t5lite.models.cache`) of
        `cache_len` positions (prompt + tokens to generate):
        {"k", "v": tuple of num_layers arrays [B, kv_heads, beams * cache_len, head_dim],
        "owner": int32 [B * beams, cache_len]}. `prefill` takes the B prompts; with beams > 1
        their K/V are stored once and read by every beam."""
        return empty_cache(self.config, batch_size, cache_len, beams)

    def prefill(self, tokens: jax.Array, prefix_lengths: jax.Array, cache: dict):
        """Run the prompt tokens [B, P] (positions < prefix_lengths are the bidirectional
        prefix, the rest padding), fill cache positions [0, P), and return (float32 logits
        [B, vocab] at position prefix_lengths - 1, cache)."""
        batch, length = tokens.shape
        max_len = cache["owner"].shape[1]
        if length > max_len:
            raise UserError(f"prompt length {length} exceeds the cache length {max_len}; "
                            "make the cache longer.")
        prefix_lengths = jnp.broadcast_to(jnp.asarray(prefix_lengths, jnp.int32), (batch,))
        idx = jnp.arange(length)
        in_prefix = idx[None, :] < prefix_lengths[:, None]
        pos = idx[None]
        ctx = Context(self_mask=combine(prefix_lm_mask(in_prefix), key_padding_mask(in_prefix)),
                      self_bias=self.decoder.sequence_bias(pos, length), positions=pos,
                      token_mask=in_prefix)

        def fn(layer, x, _):
            x, stats, kv = layer(x, ctx, None)
            return x, stats, kv

        x, _, (k, v) = self.decoder.run(fn, self.embed(tokens), None)  # [layers, B, P, K, H]

        def fill(old: tuple, new: jax.Array) -> tuple:
            # [layers, B, K, P, H]: the cache layout; region 0 (owner 0 at every position)
            new = jnp.swapaxes(new, 2, 3)
            return tuple(jax.lax.dynamic_update_slice(c, new[i].astype(c.dtype), (0, 0, 0, 0))
                         for i, c in enumerate(old))

        x = self.decoder.final_norm(x)
        last = jnp.take_along_axis(x, jnp.maximum(prefix_lengths - 1, 0)[:, None, None], axis=1)
        return self.logits(last)[:, 0], {"k": fill(cache["k"], k), "v": fill(cache["v"], v),
                                         "owner": cache["owner"]}

    def decode_step(self, tokens: jax.Array, step: jax.Array | int, cache: dict,
                    layers: list | None = None):
        """tokens int [B] at position `step` (scalar or per row [B]) -> (float32 [B, vocab],
        updated cache). Inside a decoding loop pass `layers=self.decoder.layer_modules()`
        computed outside the loop."""
        return step_through(self, self.embed(tokens[:, None]), step, cache, None, layers)


__all__ = ["DecoderOnly"]
