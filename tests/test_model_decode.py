"""Incremental decoding (KV caches) and the decoder-only prefix LM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5lite.config import ModelConfig
from t5lite.models import DecoderOnly, EncoderDecoder, build_model
from t5lite.models.cache import take_batch, tile_batch

TINY = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2,
            num_decoder_layers=2, relative_num_buckets=8, relative_max_distance=16)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(2, 64, size=shape).astype(np.int32))


@pytest.mark.parametrize("changes", [
    {},
    dict(scan_layers=False, position_scheme="rope", num_kv_heads=1),
    dict(num_experts=2, moe_dropless=True, tie_embeddings=True),
])
def test_cached_steps_equal_teacher_forced_logits(changes):
    cfg = tiny(**changes)
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    assert isinstance(model, EncoderDecoder)
    enc = tokens(0, (2, 10)).at[1, 6:].set(0)
    dec = tokens(1, (2, 6)).at[:, 0].set(0)
    expected, _ = model(enc, dec)
    encoded = model.encode(enc)
    cross = model.precompute_cross_attention(encoded, enc)
    cache = model.init_decode_cache(2, 8)
    step = jax.jit(model.decode_step)
    for t in range(dec.shape[1]):
        logits, cache = step(dec[:, t], jnp.int32(t), cache, cross)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(expected[:, t]),
                                   atol=2e-5, rtol=1e-5)


def test_cache_works_in_while_loop_and_with_tiled_beams():
    cfg = tiny()
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    enc = tokens(0, (2, 10))
    dec = tokens(1, (2, 5)).at[:, 0].set(0)
    expected, _ = model(enc, dec)
    cross = tile_batch(model.precompute_cross_attention(model.encode(enc), enc), 3)
    cache = tile_batch(model.init_decode_cache(2, 5), 3)
    beam_tokens = jnp.repeat(dec, 3, axis=0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, cache):
        m = nnx.merge(graphdef, state)

        def body(carry):
            t, cache, out = carry
            logits, cache = m.decode_step(beam_tokens[:, t], t, cache, cross)
            return t + 1, cache, out.at[:, t].set(logits)

        out = jnp.zeros((6, 5, cfg.vocab_size))
        return jax.lax.while_loop(lambda c: c[0] < 5, body, (jnp.int32(0), cache, out))[2]

    out = run(state, cache)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jnp.repeat(expected, 3, axis=0)),
                               atol=2e-5, rtol=1e-5)
    reordered = take_batch(cache, jnp.array([2, 2, 0, 3, 4, 5]))
    assert reordered["k"].shape == cache["k"].shape


def lm_cfg(**changes) -> ModelConfig:
    return tiny(architecture="decoder_only", num_encoder_layers=0, **changes)


def test_prefix_lm_mask_semantics():
    model = build_model(lm_cfg(), rngs=nnx.Rngs(params=0))
    assert isinstance(model, DecoderOnly)
    x = tokens(2, (1, 8)).at[:, 0].set(0)
    prefix = jnp.asarray([[1, 1, 1, 1, 0, 0, 0, 0]])
    ref, _ = model(x, decoder_causal_attention=prefix)
    # changing a later prefix token changes earlier prefix positions (bidirectional) ...
    changed, _ = model(x.at[0, 3].set(5), decoder_causal_attention=prefix)
    assert not np.allclose(np.asarray(changed[0, 0]), np.asarray(ref[0, 0]))
    # ... but a target token never influences anything before it
    changed, _ = model(x.at[0, 6].set(5), decoder_causal_attention=prefix)
    np.testing.assert_array_equal(np.asarray(changed[0, :6]), np.asarray(ref[0, :6]))
    # plain causal LM when no prefix is given
    causal, _ = model(x)
    changed, _ = model(x.at[0, 3].set(5))
    np.testing.assert_array_equal(np.asarray(changed[0, :3]), np.asarray(causal[0, :3]))


@pytest.mark.parametrize("changes", [{}, dict(position_scheme="rope", num_kv_heads=2,
                                              scan_layers=False)])
def test_prefill_and_steps_equal_full_forward(changes):
    model = build_model(lm_cfg(**changes), rngs=nnx.Rngs(params=0))
    seq = tokens(3, (2, 9)).at[:, 0].set(0)
    prefix_lengths = jnp.array([3, 5])
    causal_attention = (jnp.arange(9)[None, :] < prefix_lengths[:, None]).astype(jnp.int32)
    expected, _ = model(seq, decoder_causal_attention=causal_attention)
    prompt = jnp.where(causal_attention == 1, seq, 0)[:, :6]
    cache = model.init_decode_cache(2, 10)
    logits, cache = model.prefill(prompt, prefix_lengths, cache)
    rows = jnp.arange(2)
    np.testing.assert_allclose(np.asarray(logits),
                               np.asarray(expected[rows, prefix_lengths - 1]), atol=2e-5, rtol=1e-5)
    for i in range(3):
        pos = prefix_lengths + i
        logits, cache = model.decode_step(seq[rows, pos], pos, cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(expected[rows, pos]),
                                   atol=2e-5, rtol=1e-5)


def test_packed_lm_rows_do_not_mix():
    model = build_model(lm_cfg(), rngs=nnx.Rngs(params=0))
    a = tokens(4, (1, 5)).at[:, 0].set(0)
    alone, _ = model(a)
    other = tokens(5, (1, 3)).at[:, 0].set(0)
    packed = jnp.concatenate([other, a, jnp.zeros((1, 2), jnp.int32)], axis=1)
    seg = jnp.asarray([[1] * 3 + [2] * 5 + [0] * 2])
    pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 4, 0, 0]])
    out, _ = model(packed, decoder_segment_ids=seg, decoder_positions=pos)
    np.testing.assert_allclose(np.asarray(out[0, 3:8]), np.asarray(alone[0]), atol=2e-5,
                               rtol=1e-5)
