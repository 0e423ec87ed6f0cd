"""Noise mask, sentinels, lengths, prefix-LM split: every invariant of objectives.md §1–§4."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from t5lite.data import objectives as obj

SETTINGS = settings(max_examples=40, deadline=None)


def _runs(mask: np.ndarray) -> tuple[int, int]:
    """(number of maximal True runs, number of maximal False runs)."""
    m = mask.astype(int)
    starts = np.flatnonzero(np.diff(np.concatenate([[-1], m])) != 0)
    values = m[starts]
    return int(values.sum()), int((1 - values).sum())


def _feasible(length: int, d: float, mu: float) -> bool:
    noise, spans = obj.num_noise_and_spans(length, d, mu)
    return spans <= max(length, 2) - noise


@SETTINGS
@given(length=st.integers(2, 700), d=st.floats(0.01, 0.8), mu=st.floats(1.0, 70.0),
       seed=st.integers(0, 2**40))
def test_noise_mask_invariants(length, d, mu, seed):
    if not _feasible(length, d, mu):
        with pytest.raises(ValueError, match="noise spans"):
            obj.random_spans_noise_mask(length, d, mu, seed)
        return
    mask = obj.random_spans_noise_mask(length, d, mu, seed)
    noise, spans = obj.num_noise_and_spans(length, d, mu)
    assert mask.dtype == bool and mask.shape == (length,)
    assert int(mask.sum()) == noise
    assert _runs(mask) == (spans, spans)
    assert not mask[0] and mask[-1]
    np.testing.assert_array_equal(mask, obj.random_spans_noise_mask(length, d, mu, seed))


def test_noise_mask_counts_follow_float32_half_even_rounding():
    # 0.15 * 570 = 85.5 in float32 -> 86 (round half to even), then 86 / 3 = 28.67 -> 29.
    assert obj.num_noise_and_spans(570, 0.15, 3.0) == (int(np.round(np.float32(570) *
                                                                    np.float32(0.15))), 29)
    assert obj.num_noise_and_spans(10, 0.25, 1.0) == (2, 2)  # 2.5 -> 2 (half to even)
    assert obj.num_noise_and_spans(14, 0.25, 1.0) == (4, 4)  # 3.5 -> 4
    assert obj.num_noise_and_spans(2, 0.01, 3.0) == (1, 1)  # clipped to [1, L-1]
    assert obj.num_noise_and_spans(10, 0.99, 30.0) == (9, 1)


def test_noise_mask_edge_lengths_and_zero_density():
    np.testing.assert_array_equal(obj.random_spans_noise_mask(1, 0.15, 3.0, 0), [False])
    assert obj.random_spans_noise_mask(0, 0.15, 3.0, 0).shape == (0,)
    np.testing.assert_array_equal(obj.random_spans_noise_mask(9, 0.0, 3.0, 0), [False] * 9)


def test_noise_mask_refuses_more_spans_than_kept_tokens():
    with pytest.raises(ValueError, match="length=3.*noise_density=0.5.*mean_noise_span_length=1"):
        obj.random_spans_noise_mask(3, 0.5, 1.0, 0)


def test_noise_mask_seed_changes_mask():
    masks = {obj.random_spans_noise_mask(200, 0.15, 3.0, s).tobytes() for s in range(8)}
    assert len(masks) == 8


def test_noise_mask_compositions_are_uniform():
    # L=8, d=0.5, mu=2: 4 noise tokens in 2 spans and 4 kept tokens in 2 runs: each split has
    # 3 compositions, so 9 equally likely masks.
    counts = collections.Counter(obj.random_spans_noise_mask(8, 0.5, 2.0, s).tobytes()
                                 for s in range(900))
    assert len(counts) == 9
    assert min(counts.values()) > 60 and max(counts.values()) < 140  # expected 100 each


def test_worked_vector():
    inputs, targets = obj.corrupt_spans(np.arange(10, 16),
                                          np.array([1, 1, 0, 0, 1, 0], bool), 1000)
    assert inputs.tolist() == [999, 12, 13, 998, 15]
    assert targets.tolist() == [10, 11, 999, 14, 998]


def _reconstruct(inputs: np.ndarray, targets: np.ndarray, vocab_size: int, spans: int):
    """Undo span corruption: put each sentinel's target span back in place of the sentinel."""
    def split(seq):
        pieces, current, order = {}, None, []
        for t in seq:
            if t >= vocab_size - spans:
                current = int(t)
                order.append(current)
                pieces[current] = []
            elif current is not None:
                pieces[current].append(int(t))
        return pieces, order

    filled, order = split(targets)
    out = []
    for t in inputs:
        out.extend(filled[int(t)] if int(t) in filled else [int(t)])
    return out, order


@SETTINGS
@given(length=st.integers(2, 400), d=st.floats(0.05, 0.5), mu=st.floats(1.0, 10.0),
       seed=st.integers(0, 2**31))
def test_span_corruption_invariants(length, d, mu, seed):
    if not _feasible(length, d, mu):
        return
    vocab_size = 32100
    tokens = np.random.default_rng(seed).integers(3, 30000, size=length)
    mask = obj.random_spans_noise_mask(length, d, mu, seed)
    noise, spans = obj.num_noise_and_spans(length, d, mu)
    inputs, targets = obj.corrupt_spans(tokens, mask, vocab_size)
    assert len(inputs) == length - noise + spans
    assert len(targets) == noise + spans
    assert inputs[-1] == vocab_size - spans  # inputs end with the last sentinel
    assert targets[0] == vocab_size - 1  # targets start with <extra_id_0>
    in_sentinels = [int(t) for t in inputs if t >= vocab_size - spans]
    assert in_sentinels == list(range(vocab_size - 1, vocab_size - 1 - spans, -1))
    restored, order = _reconstruct(inputs, targets, vocab_size, spans)
    assert order == in_sentinels
    assert restored == tokens.tolist()


WORKED_LENGTHS = [
    (512, 3, 0.15, 568, 114), (512, 8, 0.15, 588, 100), (512, 3, 0.5, 766, 512),
    (512, 8, 0.5, 908, 512), (512, 64, 0.15, 600, 92), (512, 64, 0.5, 1006, 512),
    (512, 32, 0.15, 598, 94), (64, 2, 0.2, 70, 22), (64, 1, 0.2, 63, 27),
]


@pytest.mark.parametrize("inputs_length,mu,d,tokens,targets", WORKED_LENGTHS)
def test_random_spans_helper_worked_values(inputs_length, mu, d, tokens, targets):
    assert obj.random_spans_helper(inputs_length, d, mu) == (tokens, targets)


def test_568_raw_tokens_give_exactly_512_inputs_and_114_targets():
    tokens = np.arange(3, 3 + 568)
    for seed in range(5):
        mask = obj.random_spans_noise_mask(568, 0.15, 3.0, seed)
        inputs, targets = obj.corrupt_spans(tokens, mask, 32100)
        assert (len(inputs) + 1, len(targets) + 1) == (512, 114)  # + EOS


@SETTINGS
@given(inputs_length=st.integers(8, 600), d=st.sampled_from([0.15, 0.25, 0.5]),
       mu=st.sampled_from([1.0, 2.0, 3.0, 8.0, 32.0, 64.0]), seed=st.integers(0, 1000))
def test_chunk_of_helper_length_fits_exactly(inputs_length, d, mu, seed):
    try:
        tokens_length, targets_length = obj.random_spans_helper(inputs_length, d, mu)
    except ValueError:
        return
    mask = obj.random_spans_noise_mask(tokens_length, d, mu, seed)
    inputs, targets = obj.corrupt_spans(np.arange(3, 3 + tokens_length), mask, 32100)
    expected_inputs, expected_targets = obj.span_corruption_lengths(tokens_length, d, mu)
    assert len(targets) + 1 == targets_length == expected_targets
    assert len(inputs) + 1 == expected_inputs <= inputs_length
    if d != 0.5:
        assert expected_inputs == inputs_length
    else:  # the reference's d=0.5 rule may give up one token to keep targets <= inputs
        assert targets_length <= inputs_length and expected_inputs >= inputs_length - 1


def test_random_spans_helper_rejects_impossible_lengths():
    with pytest.raises(ValueError, match="too short"):
        obj.random_spans_helper(2, 0.15, 3.0)
    with pytest.raises(ValueError, match="noise_density"):
        obj.random_spans_helper(512, 0.0, 3.0)


@SETTINGS
@given(length=st.integers(2, 300), d=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
       seed=st.integers(0, 2**31))
def test_prefix_split_invariants(length, d, seed):
    tokens = np.arange(3, 3 + length)
    inputs, targets = obj.random_prefix_split(tokens, d, seed)
    lo, hi = obj.prefix_bounds(length, d)
    assert lo <= len(inputs) <= hi
    assert len(targets) >= 1
    np.testing.assert_array_equal(np.concatenate([inputs, targets]), tokens)


def test_prefix_bounds_values():
    assert obj.prefix_bounds(511, 0.5) == (1, 510)
    assert obj.prefix_bounds(511, 0.25) == (255, 510)  # round(0.5 * 510)
    assert obj.prefix_bounds(100, 0.0) == (99, 99)


def test_prefix_split_uniform_at_half_density():
    counts = collections.Counter(len(obj.random_prefix_split(np.arange(6), 0.5, s)[0])
                                 for s in range(500))
    assert sorted(counts) == [1, 2, 3, 4, 5]
    assert min(counts.values()) > 70  # expected 100 each


def test_prefix_density_above_half_is_an_error():
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        obj.random_prefix_split(np.arange(10), 0.6, 0)
