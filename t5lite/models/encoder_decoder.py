"""`EncoderDecoder`: the T5 model (v1.1 by default; original T5, RoPE, GQA, MoE by config).

Inputs follow SeqIO's EncDecFeatureConverter: `encoder_input_tokens`, `decoder_input_tokens`
(targets shifted right, starting with 0) and, when packed, `*_segment_ids` and `*_positions`.
Token id 0 is padding in the encoder; in the decoder position 0 holds the start token 0, so
decoder padding is only known from segment ids (with causal attention, trailing padding never
influences real positions anyway).

Example::

    >>> model = EncoderDecoder(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    >>> logits, aux = model(enc_tokens, dec_tokens)        # [B, T, vocab] float32
    >>> encoded = model.encode(enc_tokens)
    >>> layers = model.decoder.layer_modules()          # once per request, outside the loop
    >>> cross = model.precompute_cross_attention(encoded, enc_tokens, layers)
    >>> cache = model.init_decode_cache(batch_size=B, cache_len=T)
    >>> step_logits, cache = model.decode_step(dec_tokens[:, 0], 0, cache, cross, layers)
    >>> # step_logits == logits[:, 0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t5lite.config import ModelConfig
from t5lite.errors import UserError
from t5lite.models.attention import AbsorbedCross
from t5lite.models.blocks import Context, Stack, Stats, add_stats
from t5lite.models.layers import Embed, dropout, make_param, normal, split_key
from t5lite.models.masks import causal_mask, combine, key_padding_mask, segment_mask
from t5lite.models.features import OutputFeatures
from t5lite.models.quant import QTensor, dense, kernel
from t5lite.parallel.rules import constrain


def aux_from_stats(cfg: ModelConfig, stats: Stats) -> dict[str, jax.Array]:
    """The model's aux dict: MoE losses already multiplied by their weights."""
    return {
        "moe_aux_loss": cfg.router_aux_loss_weight * stats["aux_loss"],
        "moe_z_loss": cfg.router_z_loss_weight * stats["z_loss"],
        "moe_dropped_fraction": stats["dropped"] / jnp.maximum(stats["assigned"], 1.0),
    }


def dropout_rngs_from(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Rngs | None:
    """A private dropout stream for models that use dropout (None otherwise)."""
    if cfg.dropout_rate <= 0.0:
        return None
    return nnx.Rngs(dropout=rngs.dropout())


class ModelBase(nnx.Module):
    """The base class of both architectures (`EncoderDecoder`, `DecoderOnly`): the shared
    embedding, output projection (logits) and dropout keys."""

    config: ModelConfig

    def _init_shared(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        self.config = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype, cfg.params_dtype,
                           rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = make_param(rngs, normal(cfg.d_model ** -0.5),
                                      (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                      cfg.params_dtype)
        self.dropout_rngs = dropout_rngs_from(cfg, rngs)

    def _dropout_key(self, deterministic: bool, dropout_rng: jax.Array | None):
        if deterministic or self.config.dropout_rate <= 0.0:
            return None
        if dropout_rng is not None:
            return dropout_rng
        return self.dropout_rngs.dropout()

    def _embed(self, tokens: jax.Array, key: jax.Array | None) -> jax.Array:
        x = constrain(self.embed(tokens), ("batch", "length", "embed"))
        return dropout(x, self.config.dropout_rate, key)

    def logits(self, x: jax.Array) -> jax.Array:
        """float32 logits [..., vocab] from final (normed) decoder states."""
        cfg = self.config
        if cfg.tie_embeddings:
            if cfg.scale_tied_logits:
                x = x * jnp.asarray(cfg.d_model ** -0.5, x.dtype)
            out = self.embed.attend(x)
        else:
            out = dense("...d,dv->...v", x, kernel(self, "lm_head", x.dtype),
                        preferred_element_type=jnp.float32)
        if out.ndim == 3:
            out = constrain(out, ("batch", "length", "vocab"))
        return out

    def output(self, x: jax.Array, features: bool = False):
        """`logits(x)`, or with `features=True` the `OutputFeatures` (final states and output
        kernel) the logits would be computed from (quantized output layers: the logits)."""
        if not features:
            return self.logits(x)
        cfg = self.config
        if cfg.tie_embeddings:
            w = kernel(self.embed, "embedding", x.dtype)
            if isinstance(w, QTensor):
                return self.logits(x)
            if cfg.scale_tied_logits:
                x = x * jnp.asarray(cfg.d_model ** -0.5, x.dtype)
            return OutputFeatures(x, w, vocab_major=True)
        w = kernel(self, "lm_head", x.dtype)
        if isinstance(w, QTensor):
            return self.logits(x)
        return OutputFeatures(x, w)


class EncoderDecoder(ModelBase):
    """T5-style encoder-decoder (see module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.architecture != "encoder_decoder":
            raise UserError(f"EncoderDecoder needs architecture='encoder_decoder', got "
                            f"{cfg.architecture!r}; use DecoderOnly (or build_model).")
        self._init_shared(cfg, rngs)
        self.encoder = Stack(cfg, "encoder", rngs=rngs)
        self.decoder = Stack(cfg, "decoder", rngs=rngs)

    # ------------------------------------------------------------------ full sequences
    def _encode(self, tokens, segment_ids, positions, key) -> tuple[jax.Array, Stats]:
        k_embed, k_stack, k_out = split_key(key, 3)
        if segment_ids is None:
            valid = tokens != 0
            mask = key_padding_mask(valid)
        else:
            valid = segment_ids != 0
            mask = segment_mask(segment_ids, segment_ids)
        pos = jnp.arange(tokens.shape[1])[None] if positions is None else positions
        ctx = Context(self_mask=mask,
                      self_bias=self.encoder.sequence_bias(pos, tokens.shape[1]),
                      positions=pos, token_mask=valid)
        x, stats = self.encoder(self._embed(tokens, k_embed), ctx, k_stack)
        return dropout(x, self.config.dropout_rate, k_out), stats

    def encode(self, encoder_input_tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None) -> jax.Array:
        """Encoder output [B, S, d_model] in the compute dtype."""
        key = self._dropout_key(deterministic, dropout_rng)
        return self._encode(encoder_input_tokens, segment_ids, positions, key)[0]

    def _run_decoder(self, encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                decoder_segment_ids, decoder_positions, key,
                features: bool = False) -> tuple[jax.Array, Stats]:
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise UserError("packed inputs need both encoder_segment_ids and "
                            "decoder_segment_ids (or neither, for unpacked batches).")
        k_embed, k_stack, k_out = split_key(key, 3)
        length = decoder_input_tokens.shape[1]
        if decoder_segment_ids is None:
            self_mask = causal_mask(length)
            cross_mask = key_padding_mask(encoder_input_tokens != 0)
            token_mask = None
        else:
            self_mask = combine(causal_mask(length),
                                segment_mask(decoder_segment_ids, decoder_segment_ids))
            cross_mask = segment_mask(decoder_segment_ids, encoder_segment_ids)
            token_mask = decoder_segment_ids != 0
        pos = jnp.arange(length)[None] if decoder_positions is None else decoder_positions
        ctx = Context(self_mask=self_mask, self_bias=self.decoder.sequence_bias(pos, length),
                      positions=pos, cross_mask=cross_mask, token_mask=token_mask,
                      encoded=encoded)
        x, stats = self.decoder(self._embed(decoder_input_tokens, k_embed), ctx, k_stack)
        x = dropout(x, self.config.dropout_rate, k_out)
        return self.output(x, features), stats

    def run_decoder(self, encoded: jax.Array, encoder_input_tokens: jax.Array,
               decoder_input_tokens: jax.Array, *, encoder_segment_ids: jax.Array | None = None,
               decoder_segment_ids: jax.Array | None = None,
               decoder_positions: jax.Array | None = None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None):
        """Teacher-forced decoder: (logits float32 [B, T, vocab], aux)."""
        key = self._dropout_key(deterministic, dropout_rng)
        logits, stats = self._run_decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                                     encoder_segment_ids, decoder_segment_ids,
                                     decoder_positions, key)
        return logits, aux_from_stats(self.config, stats)

    def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array, *,
                 encoder_segment_ids: jax.Array | None = None,
                 decoder_segment_ids: jax.Array | None = None,
                 encoder_positions: jax.Array | None = None,
                 decoder_positions: jax.Array | None = None, deterministic: bool = True,
                 dropout_rng: jax.Array | None = None, return_features: bool = False):
        """(logits float32 [B, T, vocab], aux dict of float32 scalars).

        `dropout_rng` (optional) is the dropout key for this call; without it a training call
        (deterministic=False, dropout_rate > 0) draws from the model's own dropout stream.
        `return_features=True` returns `OutputFeatures` in place of the logits (for a loss
        over vocabulary chunks, `t5lite.train.chunked_loss`).
        """
        key = self._dropout_key(deterministic, dropout_rng)
        k_enc, k_dec = split_key(key, 2)
        encoded, enc_stats = self._encode(encoder_input_tokens, encoder_segment_ids,
                                          encoder_positions, k_enc)
        logits, dec_stats = self._run_decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                                         encoder_segment_ids, decoder_segment_ids,
                                         decoder_positions, k_dec, return_features)
        return logits, aux_from_stats(self.config, add_stats(enc_stats, dec_stats))

    # ------------------------------------------------------------------ incremental decoding
    def precompute_cross_attention(self, encoded: jax.Array, encoder_input_tokens: jax.Array,
                                   layers: list | None = None, absorbed: bool = False) -> dict:
        """What the decoder's cross-attention reads per step, computed once per request.

        absorbed=False: every layer's K/V and the encoder padding mask: {"k", "v": tuple of
        num_layers arrays [B, kv_heads, S, head_dim], "mask": bool [B, S]}.
        absorbed=True (`absorbed_decode_attention`): no K/V; {"encoded": [B, S, embed],
        "encoded_t": [B, embed, S] (in the compute dtype), "wk", "wv": tuple of num_layers
        rearranged kernels (`Layer.cross_absorbed_weights`), "mask"}.
        `layers`: `self.decoder.layer_modules()` if already at hand."""
        layers = self.decoder.layer_modules() if layers is None else layers
        mask = encoder_input_tokens != 0
        if absorbed:
            encoded = encoded.astype(self.config.compute_dtype)
            weights = [layer.cross_absorbed_weights() for layer in layers]
            return {"encoded": encoded, "encoded_t": jnp.swapaxes(encoded, 1, 2),
                    "wk": tuple(k for k, _ in weights), "wv": tuple(v for _, v in weights),
                    "mask": mask}
        kv = [layer.cross_key_value(encoded) for layer in layers]
        return {"k": tuple(k for k, _ in kv), "v": tuple(v for _, v in kv), "mask": mask}

    def init_decode_cache(self, batch_size: int, cache_len: int, beams: int = 1) -> dict:
        """Zeroed self-attention cache for batch_size * beams rows (`t5lite.models.cache`) of
        `cache_len` positions (the most tokens to generate):
        {"k", "v": tuple of num_layers arrays [B, kv_heads, beams * cache_len, head_dim],
        "owner": int32 [B * beams, cache_len]}."""
        return empty_cache(self.config, batch_size, cache_len, beams)

    def decode_step(self, tokens: jax.Array, step: jax.Array | int, cache: dict, cross: dict,
                    layers: list | None = None):
        """One decoder position for every row: tokens int [N] at position `step` (scalar or [N]).

        Returns (float32 logits [N, vocab], updated cache). Reads cross-attention K/V from
        `cross` only (its batch B may divide N: rows b*N/B .. (b+1)*N/B-1, e.g. the beams of
        input b, share cross row b); writes this position's self-attention K/V into the cache
        (N rows: a plain cache, or a beam cache shared by the rows of an input, see
        `t5lite.models.cache`).
        Inside a decoding loop pass `layers=self.decoder.layer_modules()` computed outside the
        loop (see `Stack.layer_modules`).
        """
        x = self.embed(tokens[:, None])
        return step_through(self, x, step, cache, cross, layers)


def empty_cache(cfg: ModelConfig, batch_size: int, cache_len: int, beams: int = 1) -> dict:
    """Zeroed self-attention cache of both architectures (see `t5lite.models.cache`): for
    batch_size * beams rows; the beams of an input share one cache row (beams > 1)."""
    shape = (batch_size, cfg.kv_heads, beams * cache_len, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, cfg.compute_dtype)  # noqa: E731
                          for _ in range(cfg.num_decoder_layers))
    return {"k": zeros(), "v": zeros(),
            "owner": jnp.zeros((batch_size * beams, cache_len), jnp.int32)}


def step_through(model: ModelBase, x: jax.Array, step, cache: dict, cross: dict | None,
                 layers: list | None = None):
    """Run the decoder stack on one new position per row (shared by both architectures).

    The layers run unrolled (a Python loop, not a scan): each reads its own cache and cross K/V
    arrays, so nothing is sliced out of a stacked buffer per step. Row n = b*R + r writes its
    new K/V into region r of cache row b and reads, at every earlier position p, region
    cache["owner"][n, p] (R = 1 for a plain cache, where every owner is 0)."""
    stack: Stack = model.decoder
    layers = stack.layer_modules() if layers is None else layers
    rows = x.shape[0]
    batch = cache["k"][0].shape[0]
    reps = rows // batch
    max_len = cache["owner"].shape[1]
    step = jnp.asarray(step, jnp.int32)
    pos = step.reshape(-1)  # [1] (same position for all rows) or [N]
    region = jnp.arange(rows, dtype=jnp.int32) % reps
    if step.ndim == 0:
        owner = jax.lax.dynamic_update_slice(cache["owner"], region[:, None], (0, step))
    else:
        owner = cache["owner"].at[jnp.arange(rows), step].set(region)
    key_pos = jnp.arange(max_len)
    visible = (key_pos[None, :] <= pos[:, None])[:, None, :]  # [N|1, 1, M]
    mask = visible & (owner[:, None, :] == jnp.arange(reps)[None, :, None])  # [N, R, M]
    mask = mask.reshape(batch, reps, reps * max_len)[:, None]  # [B, 1, R queries, R*M keys]
    bias = stack.position_bias(pos[:, None], key_pos[None, :])  # [N|1, heads, 1, M]
    if bias is not None and reps > 1:
        bias = jnp.tile(bias, (1, 1, 1, reps))
        if bias.shape[0] > 1:  # per-row positions: [B, heads, R queries, R*M]
            bias = jnp.swapaxes(bias.reshape(batch, reps, -1, reps * max_len), 1, 2)
    ctx = Context(self_mask=mask, self_bias=bias,
                  positions=jnp.broadcast_to(pos[:, None], (rows, 1)), write_positions=step,
                  cross_mask=None if cross is None else key_padding_mask(cross["mask"]))
    new_k, new_v = [], []
    for i, layer in enumerate(layers):
        if cross is None:
            cross_kv = None
        elif "encoded" in cross:
            cross_kv = AbsorbedCross(cross["wk"][i], cross["wv"][i], cross["encoded"],
                                     cross["encoded_t"])
        else:
            cross_kv = (cross["k"][i], cross["v"][i])
        x, (k, v) = layer.decode_step(x, ctx, (cache["k"][i], cache["v"][i]), cross_kv)
        new_k.append(k)
        new_v.append(v)
    logits = model.logits(stack.final_norm(x))[:, 0]
    return logits, {"k": tuple(new_k), "v": tuple(new_v), "owner": owner}
