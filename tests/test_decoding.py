"""Decoding loops on small real step functions (no model needed).

The toy model's next-token logits depend on every token fed so far (through a fixed-size token
buffer written in place, i.e. a real cache that beam search must reorder), so cache handling,
EOS handling and beam bookkeeping are all exercised. An uncached reference recomputes the logits
from the whole prefix in numpy.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.errors import ConfigError
from t5lite.models import decoding as dec
from t5lite.models.decoding import DecodeConfig

V = 6
L = 5


def _tables(seed: int = 0, vocab: int = V, length: int = L, eos_bias: float = 0.0):
    rng = np.random.default_rng(seed)
    e1 = rng.normal(size=(vocab, vocab)).astype(np.float32) * 2.0
    e2 = rng.normal(size=(length + 1, vocab, vocab)).astype(np.float32)
    e1[:, dec.EOS_ID] += eos_bias
    return e1, e2


def make_step_fn(e1: np.ndarray, e2: np.ndarray):
    """Step fn with a cache {"buf": [N, L+1], "buf_t": [L+1, N]} (two batch-axis layouts)."""
    e1j, e2j = jnp.asarray(e1), jnp.asarray(e2)
    positions = jnp.arange(e2.shape[0])

    def step_fn(tokens, step, cache):
        buf = cache["buf"].at[:, step].set(tokens)
        buf_t = cache["buf_t"].at[step, :].set(tokens)
        seen = (positions <= step)[None, :, None]
        contrib = e2j[positions[None, :], buf]  # [N, L+1, V]
        contrib_t = e2j[positions[:, None], buf_t].transpose(1, 0, 2)
        hist = jnp.sum(jnp.where(seen, 0.5 * contrib + 0.5 * contrib_t, 0.0), axis=1)
        return e1j[tokens] + 0.5 * hist, {"buf": buf, "buf_t": buf_t}

    return step_fn


def init_cache(n: int, length: int = L):
    return {"buf": jnp.zeros((n, length + 1), jnp.int32),
            "buf_t": jnp.zeros((length + 1, n), jnp.int32)}


BATCH_AXES = {"buf": 0, "buf_t": 1}


def ref_logits(e1, e2, fed: list[int]) -> np.ndarray:
    """Uncached: logits after feeding `fed` (start token first)."""
    hist = sum(e2[j, t] for j, t in enumerate(fed))
    return e1[fed[-1]] + 0.5 * hist


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def ref_greedy(e1, e2, length: int = L) -> list[int]:
    fed, out = [dec.PAD_ID], []
    for _ in range(length):
        tok = int(np.argmax(ref_logits(e1, e2, fed)))
        out.append(tok)
        if tok == dec.EOS_ID:
            break
        fed.append(tok)
    return out


def seq_logp(e1, e2, seq: list[int]) -> float:
    fed, total = [dec.PAD_ID], 0.0
    for tok in seq:
        total += log_softmax(ref_logits(e1, e2, fed))[tok]
        fed.append(tok)
    return total


def unpad(row) -> list[int]:
    row = [int(t) for t in row]
    if dec.EOS_ID in row:
        return row[: row.index(dec.EOS_ID) + 1]
    return row


@functools.partial(jax.jit, static_argnames=("config", "n", "batch_axes_on"))
def run(tables, config: DecodeConfig, n: int, rng=None, batch_axes_on=True):
    step_fn = make_step_fn(*tables)
    cache = init_cache(n * (config.beam_size if config.method == "beam" else 1),
                       tables[1].shape[0] - 1)
    return dec.run_decoding(step_fn, cache, n, config, rng=rng,
                      batch_axes=BATCH_AXES if batch_axes_on else 0)


# --------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_equals_uncached_argmax_loop(seed):
    e1, e2 = _tables(seed, eos_bias=1.0)
    out = run((e1, e2), DecodeConfig(method="greedy", max_decode_len=L), 1)
    expected = ref_greedy(e1, e2)
    assert unpad(out.tokens[0]) == expected
    np.testing.assert_allclose(float(out.scores[0]), seq_logp(e1, e2, expected), rtol=1e-5)
    assert int(out.num_steps) == len(expected)


def test_greedy_stops_early_and_pads_after_eos():
    e1, e2 = _tables(0)
    e1[:, dec.EOS_ID] = -50.0
    e1[dec.PAD_ID, 3] = 100.0  # start -> 3
    e1[3, dec.EOS_ID] = 100.0  # 3 -> EOS
    out = run((e1, e2), DecodeConfig(method="greedy", max_decode_len=L), 2)
    np.testing.assert_array_equal(np.asarray(out.tokens), [[3, 1, 0, 0, 0]] * 2)
    assert int(out.num_steps) == 2


def test_rows_finish_independently():
    """A row that hits EOS is padded while the others go on; each row equals its own decode."""
    e1, e2 = _tables(5)
    step_fn = make_step_fn(e1, e2)
    # row-dependent start tokens make the rows differ
    starts = jnp.array([0, 2, 3, 4], jnp.int32)

    def row_step(tokens, step, cache):
        tokens = jnp.where(step == 0, starts[: tokens.shape[0]], tokens)
        return step_fn(tokens, step, cache)

    cfg = DecodeConfig(method="greedy", max_decode_len=L)
    both = jax.jit(lambda: dec.run_decoding(row_step, init_cache(4), 4, cfg))()
    for r in range(4):
        fed, out = [int(starts[r])], []
        for _ in range(L):
            tok = int(np.argmax(ref_logits(e1, e2, fed)))
            out.append(tok)
            if tok == dec.EOS_ID:
                break
            fed.append(tok)
        row = [int(t) for t in both.tokens[r]]
        assert row[: len(out)] == out
        assert all(t == dec.PAD_ID for t in row[len(out):])


def test_initial_logits_path_equals_step_zero():
    """Decoder-only convention: first token from prefill logits, then step = j - 1."""
    e1, e2 = _tables(7, eos_bias=0.5)
    step_fn = make_step_fn(e1, e2)
    n = 3
    for cfg in (DecodeConfig(method="greedy", max_decode_len=L),
                DecodeConfig(method="beam", beam_size=3, max_decode_len=L),
                DecodeConfig(method="sample", max_decode_len=L, top_k=3)):
        k = cfg.beam_size if cfg.method == "beam" else 1

        def plain():
            return dec.run_decoding(step_fn, init_cache(n * k), n, cfg, rng=jax.random.key(3),
                              batch_axes=BATCH_AXES)

        def prefilled():
            cache = init_cache(n)
            logits0, cache = step_fn(jnp.zeros((n,), jnp.int32), jnp.int32(0), cache)
            if k > 1:
                cache = dec.tile_beams(cache, k, BATCH_AXES)
            shifted = lambda t, s, c: step_fn(t, s + 1, c)  # noqa: E731
            return dec.run_decoding(shifted, cache, n, cfg, rng=jax.random.key(3),
                              initial_logits=logits0, batch_axes=BATCH_AXES)

        a, b = jax.jit(plain)(), jax.jit(prefilled)()
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens), err_msg=cfg.method)
        np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), rtol=1e-5)
        assert int(b.num_steps) == int(a.num_steps) - 1


# ------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_1_and_temperature_zero_equal_greedy(seed):
    e1, e2 = _tables(seed, eos_bias=0.5)
    n = 4
    greedy = run((e1, e2), DecodeConfig(method="greedy", max_decode_len=L), n)
    for cfg in (DecodeConfig(method="sample", top_k=1, max_decode_len=L),
                DecodeConfig(method="sample", temperature=0.0, max_decode_len=L),
                DecodeConfig(method="sample", temperature=1e-4, max_decode_len=L),
                DecodeConfig(method="sample", top_p=1e-6, max_decode_len=L)):
        sampled = run((e1, e2), cfg, n, rng=jax.random.key(11))
        np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(greedy.tokens),
                                      err_msg=str(cfg))


def test_sampling_is_reproducible_and_seed_dependent():
    e1, e2 = _tables(0)
    cfg = DecodeConfig(method="sample", max_decode_len=L)
    a = run((e1, e2), cfg, 64, rng=jax.random.key(1))
    b = run((e1, e2), cfg, 64, rng=jax.random.key(1))
    c = run((e1, e2), cfg, 64, rng=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    # rows are different samples, not copies
    assert len({tuple(r) for r in np.asarray(a.tokens).tolist()}) > 10


def _first_token_freqs(cfg: DecodeConfig, e1, e2, n: int = 20000) -> np.ndarray:
    out = run((e1, e2), dataclasses_replace(cfg, max_decode_len=1), n, rng=jax.random.key(0))
    return np.bincount(np.asarray(out.tokens)[:, 0], minlength=V) / n


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def _expected(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1.0:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        kept = order[before < top_p]
        mask = np.zeros_like(keep)
        mask[kept] = True
        keep &= mask
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.5), dict(temperature=2.0),
                                dict(top_k=3), dict(top_p=0.8), dict(top_k=4, top_p=0.6)])
def test_sampling_distribution(kw):
    e1, e2 = _tables(3)
    logits0 = ref_logits(e1, e2, [dec.PAD_ID])
    want = _expected(logits0, **kw)
    got = _first_token_freqs(DecodeConfig(method="sample", **kw), e1, e2)
    assert np.all(got[want == 0] == 0), (got, want)
    np.testing.assert_allclose(got, want, atol=0.015)


def test_process_logits_worked_example():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: (np.asarray(x)[0] > dec.NEG_INF / 2).tolist()  # noqa: E731
    assert kept(dec.process_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert kept(dec.process_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(dec.process_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(dec.process_logits(logits, top_k=1)) == [True, False, False, False]
    assert kept(dec.process_logits(logits, top_k=3)) == [True, True, True, False]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_first_argmax_and_token_log_prob_match_argmax_and_log_softmax(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 37)).astype(np.float32) * 4
    x[1, [3, 20]] = 50.0  # tied maxima: the first one wins
    x[2, :] = 7.0  # a constant row
    x[3, 5] = np.nan  # argmax returns the (first) NaN
    x[4, :] = -np.inf  # nothing finite
    x[4, 30] = -1e30
    x[5, 9] = np.inf
    logits = jnp.asarray(x, dtype)
    want = jnp.argmax(logits, axis=-1)
    got = dec.first_argmax(logits)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    assert got.tolist()[:3] == [int(np.argmax(x[0])), 3, 0]
    token = jnp.asarray([0, 3, 20, 7, 30, 9], jnp.int32)
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                              token[:, None], axis=-1)[:, 0]
    lp = dec.token_log_prob(logits, token)
    finite = [0, 1, 2, 4]  # rows 3 (NaN) and 5 (inf) give NaN either way
    np.testing.assert_allclose(np.asarray(lp)[finite], np.asarray(ref)[finite], rtol=1e-6,
                               atol=1e-6)
    assert np.isnan(np.asarray(lp)[3]) and np.isnan(np.asarray(ref)[3])


# ---------------------------------------------------------------------------- beam search
def brute_force_top(e1, e2, k: int, alpha: float, length: int = L, vocab: int = V):
    """Every complete hypothesis: EOS-terminated of length <= L, or cut off at length L."""
    scored = []
    for n in range(1, length + 1):
        for prefix in itertools.product([t for t in range(vocab) if t != dec.EOS_ID],
                                        repeat=n - 1):
            ends = [dec.EOS_ID] + ([t for t in range(vocab) if t != dec.EOS_ID]
                                   if n == length else [])
            for last in ends:
                seq = list(prefix) + [last]
                lp = ((5.0 + n) / 6.0) ** alpha
                scored.append((seq_logp(e1, e2, seq) / lp, seq))
    scored.sort(key=lambda x: -x[0])
    return scored[:k]


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0, -0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_wide_beam_equals_brute_force_enumeration(seed, alpha):
    # 1 + 3 + 9 * 4 = 40 complete hypotheses: a beam of 40 never prunes, so it is exhaustive
    vocab, length, k = 4, 3, 40
    e1, e2 = _tables(seed, vocab=vocab, length=length, eos_bias=0.5)
    cfg = DecodeConfig(method="beam", beam_size=k, alpha=alpha, max_decode_len=length)
    out = run((e1, e2), cfg, 1)
    best = brute_force_top(e1, e2, k, alpha, length, vocab)
    got = [unpad(r) for r in np.asarray(out.tokens[0])]
    assert got == [s for _, s in best]
    np.testing.assert_allclose(np.asarray(out.scores[0]), [s for s, _ in best], rtol=1e-4)


def test_beam_size_one_equals_greedy():
    for seed in range(4):
        e1, e2 = _tables(seed, eos_bias=0.5)
        greedy = run((e1, e2), DecodeConfig(method="greedy", max_decode_len=L), 3)
        beam = run((e1, e2), DecodeConfig(method="beam", beam_size=1, alpha=0.0,
                                          max_decode_len=L), 3)
        np.testing.assert_array_equal(np.asarray(beam.tokens[:, 0]), np.asarray(greedy.tokens))
        np.testing.assert_allclose(np.asarray(beam.scores[:, 0]), np.asarray(greedy.scores),
                                   rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_scores_match_sequences_and_cache_is_reordered(seed):
    """Scores recomputed from the returned sequences with the uncached reference agree; this
    fails if the cache is not permuted along with the beams (either batch-axis layout)."""
    e1, e2 = _tables(seed, eos_bias=-0.5)
    alpha = 0.6
    out = run((e1, e2), DecodeConfig(method="beam", beam_size=3, alpha=alpha, max_decode_len=L),
              2)
    for b in range(2):
        seqs = [unpad(r) for r in np.asarray(out.tokens[b])]
        for s, score in zip(seqs, np.asarray(out.scores[b])):
            lp = ((5.0 + len(s)) / 6.0) ** alpha
            np.testing.assert_allclose(score, seq_logp(e1, e2, s) / lp, rtol=1e-4)
        assert list(np.asarray(out.scores[b])) == sorted(np.asarray(out.scores[b]), reverse=True)
        assert len({tuple(s) for s in seqs}) == 3


def test_beam_early_stop_does_not_change_results():
    e1, e2 = _tables(4, eos_bias=3.0)  # EOS likely: hypotheses finish early
    length = 8
    e2 = np.random.default_rng(0).normal(size=(length + 1, V, V)).astype(np.float32)
    cfg = DecodeConfig(method="beam", beam_size=2, alpha=0.6, max_decode_len=length)
    step_fn = make_step_fn(e1, e2)

    def go(early: bool):
        cache = init_cache(2 * 2, length)
        return jax.jit(lambda c: dec.beam_search(step_fn, c, 2, cfg, batch_axes=BATCH_AXES,
                                                 early_stop=early))(cache)

    early, full = go(True), go(False)
    np.testing.assert_array_equal(np.asarray(early.tokens), np.asarray(full.tokens))
    np.testing.assert_allclose(np.asarray(early.scores), np.asarray(full.scores))
    assert int(early.num_steps) < int(full.num_steps) == length


def test_beam_initial_alive_is_one_hypothesis():
    """All beams start identical; results must not contain duplicates of the same sequence."""
    e1, e2 = _tables(9)
    out = run((e1, e2), DecodeConfig(method="beam", beam_size=4, max_decode_len=L), 1)
    seqs = [tuple(unpad(r)) for r in np.asarray(out.tokens[0])]
    assert len(set(seqs)) == 4


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw", [dict(method="nucleus"), dict(max_decode_len=0),
                                dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                dict(top_k=-1), dict(beam_size=0),
                                dict(method="greedy", num_samples=2),
                                dict(method="beam", beam_size=2, num_samples=3)])
def test_bad_decode_config(kw):
    with pytest.raises(ConfigError):
        DecodeConfig(**kw)


def test_sampling_without_rng_is_a_clear_error():
    e1, e2 = _tables(0)
    with pytest.raises(ConfigError, match="rng"):
        dec.sample_decode(make_step_fn(e1, e2), init_cache(1), 1, DecodeConfig(method="sample"))


def test_trim_at_eos():
    assert dec.trim_at_eos([5, 6, 1, 0, 0]) == [5, 6]
    assert dec.trim_at_eos(np.array([5, 6, 7])) == [5, 6, 7]
    assert dec.trim_at_eos([1, 0]) == []
