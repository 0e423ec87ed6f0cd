"""Incremental decoding (KV caches) and the decoder-only prefix LM."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5lite.config import ModelConfig
from t5lite.models import DecoderOnly, EncoderDecoder, build_model
from t5lite.models.cache import BATCH_AXIS, BEAM_AXES
from t5lite.models.decoding import gather_rows, tile_beams


def tile_batch(tree, n):
    """Repeat every row of a plain cache / cross K/V tree n times (row b -> rows b*n..)."""
    return tile_beams(tree, n, {k: BATCH_AXIS[k] for k in tree})


def take_batch(tree, rows):
    """Select rows of a plain cache (copying them)."""
    return gather_rows(tree, rows, {k: BATCH_AXIS[k] for k in tree})

TINY = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2,
            num_decoder_layers=2, relative_num_buckets=8, relative_max_distance=16)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(2, 64, size=shape).astype(np.int32))


@pytest.mark.parametrize("absorbed", [False, True], ids=["cross_kv", "absorbed"])
@pytest.mark.parametrize("changes", [
    {},
    dict(scan_layers=False, position_scheme="rope", num_kv_heads=1),
    dict(num_experts=2, moe_dropless=True, tie_embeddings=True),
])
def test_cached_steps_equal_teacher_forced_logits(changes, absorbed):
    """Step by step decoding gives the full forward pass's logits, with cross-attention read
    from precomputed K/V or absorbed (the encoder output itself; MQA included)."""
    cfg = tiny(**changes)
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    assert isinstance(model, EncoderDecoder)
    enc = tokens(0, (2, 10)).at[1, 6:].set(0)
    dec = tokens(1, (2, 6)).at[:, 0].set(0)
    expected, _ = model(enc, dec)
    encoded = model.encode(enc)
    cross = model.precompute_cross_attention(encoded, enc, absorbed=absorbed)
    assert ("k" in cross) != absorbed and ("encoded" in cross) == absorbed
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
        _, cache, out = jax.lax.while_loop(lambda c: c[0] < 5, body, (jnp.int32(0), cache, out))
        return out, cache

    out, cache = run(state, cache)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jnp.repeat(expected, 3, axis=0)),
                               atol=2e-5, rtol=1e-5)
    rows = jnp.array([2, 2, 0, 3, 4, 5])
    reordered = take_batch(cache, rows)
    assert len(reordered["k"]) == cfg.num_decoder_layers
    for new, old in zip(reordered["k"] + reordered["v"], cache["k"] + cache["v"]):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old)[np.asarray(rows)])


@pytest.mark.parametrize("absorbed", [False, True], ids=["cross_kv", "absorbed"])
@pytest.mark.parametrize("changes", [{}, dict(scan_layers=False, num_heads=4, num_kv_heads=2)])
def test_beams_share_cross_attention_rows(changes, absorbed):
    """Cross K/V (or the absorbed form's encoder output) computed once per input, not tiled
    per beam, give the same step logits as tiled ones, and the same beam search results (GQA
    included: 2 query heads per K/V head and 3 beams per input are regrouped together)."""
    from t5lite.models.decoding import DecodeConfig, beam_search

    cfg = tiny(**changes)
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    enc = tokens(0, (2, 10)).at[0, 7:].set(0)
    dec = tokens(1, (2, 5)).at[:, 0].set(0)
    expected, _ = model(enc, dec)
    layers = model.decoder.layer_modules()
    cross = model.precompute_cross_attention(model.encode(enc), enc, layers, absorbed=absorbed)
    tiled = tile_batch(cross, 3)
    per_input = cross["encoded"] if absorbed else cross["k"][0]
    per_row = tiled["encoded"] if absorbed else tiled["k"][0]
    assert per_input.shape[0] == 2 and per_row.shape[0] == 6
    cache_a = cache_b = tile_batch(model.init_decode_cache(2, 5), 3)
    beam_tokens = jnp.repeat(dec, 3, axis=0)
    step = jax.jit(model.decode_step)
    for t in range(dec.shape[1]):
        shared, cache_a = step(beam_tokens[:, t], jnp.int32(t), cache_a, cross, layers)
        copied, cache_b = step(beam_tokens[:, t], jnp.int32(t), cache_b, tiled)
        np.testing.assert_allclose(np.asarray(shared), np.asarray(copied), atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(shared), np.asarray(jnp.repeat(expected[:, t], 3, 0)),
                                   atol=2e-5, rtol=1e-5)

    config = DecodeConfig(method="beam", beam_size=3, max_decode_len=6, alpha=0.6)

    @functools.partial(jax.jit, static_argnums=1)
    def search(cross, shared_cache):
        if shared_cache:  # the 3 beams of an input share its cache row; no K/V reordering
            cache, axes = model.init_decode_cache(2, 6, beams=3), BEAM_AXES
        else:  # 6 independent rows, reordered (copied) when beams are re-ranked
            cache = tile_batch(model.init_decode_cache(2, 6), 3)
            axes = {k: BATCH_AXIS[k] for k in cache}
        return beam_search(lambda tok, i, c: model.decode_step(tok, i, c, cross, layers), cache,
                           2, config, batch_axes=axes, early_stop=False)

    a = search(cross, True)
    for b in (search(tiled, True), search(cross, False), search(tiled, False)):
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), atol=1e-5)
    assert len({tuple(t) for t in np.asarray(a.tokens)[0]}) == 3  # real, distinct beams


@pytest.mark.parametrize("changes", [{}, dict(position_scheme="rope", num_kv_heads=2)])
def test_decoder_only_beam_cache_shares_the_prompt(changes):
    """Decoder-only beam search with the shared beam cache (prompt prefilled once into region
    0, per-row positions) equals beam search over independent tiled rows."""
    from t5lite.models.decoding import DecodeConfig, beam_search, tile_beams

    model = build_model(lm_cfg(**changes), rngs=nnx.Rngs(params=0))
    prompt = tokens(3, (2, 6)).at[:, 0].set(0)
    lengths = jnp.array([4, 6])
    prompt = jnp.where(jnp.arange(6)[None, :] < lengths[:, None], prompt, 0)
    config = DecodeConfig(method="beam", beam_size=3, max_decode_len=5, alpha=0.6)
    rows = jnp.repeat(lengths, 3)

    @functools.partial(jax.jit, static_argnums=0)
    def search(shared_cache):
        if shared_cache:
            cache, axes = model.init_decode_cache(2, 11, beams=3), BEAM_AXES
            logits, cache = model.prefill(prompt, lengths, cache)
        else:
            logits, cache = model.prefill(prompt, lengths, model.init_decode_cache(2, 11))
            axes = {k: BATCH_AXIS[k] for k in cache}
            cache = tile_beams(cache, 3, axes)
        step = lambda tok, i, c: model.decode_step(tok, rows + i, c)  # noqa: E731
        return beam_search(step, cache, 2, config, initial_logits=logits, batch_axes=axes,
                           early_stop=False)

    a, b = search(True), search(False)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), atol=1e-5)


def test_per_row_positions_and_prepared_layers_match_the_plain_step():
    """decode_step with a per-row step [B] (all equal) or with `layers` prepared outside gives
    the same logits and cache as the plain scalar step."""
    cfg = tiny()
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    enc = tokens(0, (2, 10))
    cross = model.precompute_cross_attention(model.encode(enc), enc)
    cache = model.init_decode_cache(2, 4)
    tok = tokens(2, (2,))
    layers = model.decoder.layer_modules()
    ref_logits, ref_cache = model.decode_step(tok, jnp.int32(2), cache, cross)
    for logits, new_cache in (model.decode_step(tok, jnp.array([2, 2]), cache, cross),
                              model.decode_step(tok, 2, cache, cross, layers)):
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-6)
        for x, y in zip(jax.tree.leaves(new_cache), jax.tree.leaves(ref_cache)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    # exactly position 2 of every layer's cache was written
    written = np.asarray(ref_cache["k"][0]).any(axis=(0, 1, 3))
    np.testing.assert_array_equal(written, [False, False, True, False])


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


def _while_bodies(hlo: str, within: str | None = None) -> list[str]:
    """Text of the while-loop body computations of an optimised HLO module (or only of the
    loops that `within`, a computation's text, runs), nested loops' bodies included."""
    bodies = []
    for name in set(re.findall(r"body=%([\w.\-]+)", hlo if within is None else within)):
        body = re.search(rf"^%{re.escape(name)} .*?^}}", hlo, re.S | re.M).group(0)
        bodies += [body] + _while_bodies(hlo, body)
    return bodies


def _copies_of_size(body: str, sizes: set[int]) -> list[str]:
    """copy / transpose instructions (or fusions named after them) with a size in `sizes`."""
    found = []
    for line in body.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w[\w\-]*)\(", line)
        if not m:
            continue
        name, dims, opcode = m.groups()
        size = int(np.prod([int(d) for d in dims.split(",") if d]))
        copying = opcode in ("copy", "transpose") or (
            opcode == "fusion" and ("copy" in name or "transpose" in name))
        if copying and size in sizes:
            found.append(line.strip()[:160])
    return found


@pytest.mark.parametrize("method,arch,cross_attention", [
    ("greedy", "encoder_decoder", "kv"), ("beam", "encoder_decoder", "kv"),
    ("greedy", "encoder_decoder", "absorbed"), ("beam", "encoder_decoder", "absorbed"),
    ("greedy", "decoder_only", "auto")])
def test_decoding_loop_copies_no_cache_cross_kv_or_weights(method, arch, cross_attention):
    """The compiled decoding loop (Generator, scanned layers) updates the self-attention cache
    in place and reads cross K/V (or, absorbed, the encoder output) and weights where they
    are: no copy or transpose the size of a kernel, a cache, a cross K/V array or the encoder
    output in the loop body (such copies made decoding several times slower). Beam search
    re-ranks beams without copying the caches either."""
    from t5lite.inference import Generator
    from t5lite.models.decoding import DecodeConfig

    # sizes chosen so that no activation has the size of a kernel, cache or cross K/V array
    cfg = tiny(vocab_size=80, d_model=24, d_ff=40, num_decoder_layers=4)
    batch, src, steps, layers = 4, 48, 12, cfg.num_decoder_layers
    if arch == "decoder_only":  # per-row positions: the cache is written with a scatter
        cfg = lm_cfg(vocab_size=80, d_model=24, d_ff=40, num_decoder_layers=4)
    gen = Generator(build_model(cfg, rngs=nnx.Rngs(params=0)), None, max_input_len=src,
                    batch_size=batch, cross_attention=cross_attention)
    beams = 3 if method == "beam" else 1
    config = DecodeConfig(method=method, beam_size=beams, max_decode_len=steps)
    hlo = gen._jitted.lower(gen._state, jnp.ones((batch, src), jnp.int32),
                            jnp.full((batch,), src), jax.random.key(0),
                            config=config).compile().as_text()
    kv = cfg.kv_heads * cfg.head_dim
    cross = batch * src * kv
    cache = batch * beams * steps * kv
    unrolled = nnx.eval_shape(lambda: build_model(cfg.replace(scan_layers=False),
                                                  rngs=nnx.Rngs(params=0)))
    kernels = {a.size for m in (gen.model, unrolled)  # stacked and per-layer parameters
               for a in jax.tree.leaves(nnx.state(m, nnx.Param)) if a.size >= 256}
    if arch == "decoder_only":  # the cache holds the prompt and the outputs
        cache = batch * beams * (src + steps) * kv
    encoded = batch * src * cfg.d_model
    sizes = {cross, cross * layers, cross * beams, cache, cache * layers, encoded} | kernels
    # the decoding loop carries the generated tokens
    out = f"s32[{batch},{steps}]" if method == "greedy" else f"s32[{batch},{beams},{steps}]"
    loops = [b for b in _while_bodies(hlo) if out in b.splitlines()[0]]
    assert loops, "no decoding loop found"
    bodies = loops + [inner for b in loops for inner in _while_bodies(hlo, b)]
    assert [c for body in bodies for c in _copies_of_size(body, sizes)] == []
