"""Noise masks, sentinels and lengths of the pretraining objectives (docs: design/objectives.md).

Everything here works on one example and is written with TensorFlow ops so that it runs inside
`tf.data` maps, in parallel and off the accelerator. The NumPy entry points at the bottom
(`random_spans_noise_mask`, `random_spans_helper`, `corrupt_spans`, `random_prefix_split`) call
the very same code eagerly; they are a contract used by other tooling and by the tests.

Rounding follows T5 exactly: round-half-to-even on float32 values (`tf.round`).

Worked example (span corruption, vocabulary size V = 1000, so `<extra_id_0>` = 999)::

    tokens  10 11 12 13 14 15
    mask     T  T  F  F  T  F
    inputs  [999, 12, 13, 998, 15]     # each noise span -> one sentinel, counting down from V-1
    targets [10, 11, 999, 14, 998]     # each kept span -> the same sentinels
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# ----------------------------------------------------------------------------------------------
# Counting (pure Python; shared by the TF code paths and the length planner so they never differ)
# ----------------------------------------------------------------------------------------------


def _round_f32(x: float) -> int:
    return int(np.round(np.float32(x)))


def num_noise_and_spans(length: int, noise_density: float,
                        mean_noise_span_length: float) -> tuple[int, int]:
    """`(num_noise, num_spans)` for a chunk of `length` tokens (objectives.md §1 steps 2–4).

    >>> num_noise_and_spans(568, 0.15, 3.0)
    (85, 28)
    """
    lm = max(length, 2)
    num_noise = _round_f32(np.float32(lm) * np.float32(noise_density))
    num_noise = min(max(num_noise, 1), lm - 1)
    num_spans = max(_round_f32(np.float32(num_noise) / np.float32(mean_noise_span_length)), 1)
    return num_noise, num_spans


def span_corruption_lengths(tokens_length: int, noise_density: float,
                            mean_noise_span_length: float) -> tuple[int, int]:
    """Lengths `(inputs, targets)`, EOS included, that span corruption makes of a chunk of
    `tokens_length` raw tokens."""
    num_noise, num_spans = num_noise_and_spans(tokens_length, noise_density,
                                               mean_noise_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def check_spans_fit(length: int, noise_density: float, mean_noise_span_length: float) -> None:
    """Raise ValueError when the noise mask cannot be built: more noise spans than kept tokens
    (the T5 reference fails there with a shape error)."""
    if length < 2 or noise_density == 0:
        return
    num_noise, num_spans = num_noise_and_spans(length, noise_density, mean_noise_span_length)
    if num_spans > max(length, 2) - num_noise:
        raise ValueError(
            f"cannot build a span-corruption mask for length={length}, "
            f"noise_density={noise_density}, mean_noise_span_length={mean_noise_span_length}: "
            f"it needs {num_spans} noise spans but only {max(length, 2) - num_noise} tokens stay "
            "unmasked to separate them; lower noise_density or raise mean_noise_span_length")


def random_spans_helper(inputs_length: int, noise_density: float,
                        mean_noise_span_length: float) -> tuple[int, int]:
    """`(tokens_length, targets_length)`: how many raw tokens T to cut so that span corruption
    gives encoder inputs of exactly `inputs_length` (EOS included), and the targets length that
    comes with it (objectives.md §3).

    >>> random_spans_helper(512, 0.15, 3.0)
    (568, 114)
    >>> random_spans_helper(512, 0.5, 3.0)
    (766, 512)
    """
    if not 0 < noise_density < 1:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
    if inputs_length < 3:
        raise ValueError(f"inputs length {inputs_length} is too short for span corruption "
                         "(need at least one kept token, one sentinel and EOS)")
    tokens_length = inputs_length - 1
    while span_corruption_lengths(tokens_length + 1, noise_density,
                                  mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = span_corruption_lengths(tokens_length, noise_density, mean_noise_span_length)
    if noise_density == 0.5 and targets > inputs:
        tokens_length -= 1
        inputs, targets = span_corruption_lengths(tokens_length, noise_density,
                                                  mean_noise_span_length)
    check_spans_fit(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length, targets


def prefix_bounds(length: int, noise_density: float) -> tuple[int, int]:
    """`(min_prefix, max_prefix)`: the prefix length of a prefix-LM split of `length` tokens is
    uniform on this closed range (objectives.md §4)."""
    if not 0 <= noise_density <= 0.5:
        raise ValueError(f"prefix-LM noise_density must be in [0, 0.5], got {noise_density}")
    max_in = max(length - 1, 0)
    min_in = min(max_in, max(1, _round_f32(np.float32(1 - 2 * noise_density)
                                           * np.float32(max_in))))
    return min_in, max_in


# ----------------------------------------------------------------------------------------------
# TensorFlow ops (one example; `seed` is a stateless seed, an int32/int64 tensor of shape [2])
# ----------------------------------------------------------------------------------------------


def _random_composition(total: tf.Tensor, parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Split `total` into `parts` positive integers, uniformly over all compositions: choose
    `parts - 1` distinct cut points among the `total - 1` gaps."""
    u = tf.random.stateless_uniform([tf.maximum(total - 1, 0)], seed=seed)
    cuts = tf.sort(tf.argsort(u)[: parts - 1] + 1)
    bounds = tf.concat([[0], cuts, [total]], axis=0)
    return bounds[1:] - bounds[:-1]


def noise_mask_tf(length: tf.Tensor, noise_density: float, mean_noise_span_length: float,
                  seed: tf.Tensor) -> tf.Tensor:
    """Boolean mask `[length]` of noise tokens, T5's `random_spans_noise_mask` (objectives.md §1).

    Inside the pipeline a chunk shorter than the planned length can ask for more spans than it
    has kept tokens; the span count is then lowered to fit (the planned, full-length chunk is
    validated up front by `check_spans_fit`).
    """
    length = tf.cast(length, tf.int32)
    if noise_density == 0:
        return tf.zeros([length], tf.bool)
    lm = tf.maximum(length, 2)
    num_noise = tf.cast(tf.round(tf.cast(lm, tf.float32) * tf.constant(noise_density,
                                                                        tf.float32)), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, lm - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32)
                                 / tf.constant(mean_noise_span_length, tf.float32)), tf.int32)
    num_spans = tf.maximum(num_spans, 1)
    num_nonnoise = lm - num_noise
    num_spans = tf.minimum(num_spans, num_nonnoise)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    noise_lengths = _random_composition(num_noise, num_spans, seeds[0])
    nonnoise_lengths = _random_composition(num_nonnoise, num_spans, seeds[1])
    # nonnoise_0, noise_0, nonnoise_1, noise_1, ...: noise spans are the odd-numbered runs.
    run_lengths = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
    run_starts = tf.cumsum(run_lengths)[:-1]
    run_start_flags = tf.math.unsorted_segment_sum(tf.ones_like(run_starts), run_starts, lm)
    run_index = tf.cumsum(run_start_flags)
    return tf.equal(run_index % 2, 1)[:length]


def sentinel_replace(tokens: tf.Tensor, mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """Replace each run of masked tokens by one sentinel: run i -> `vocab_size - 1 - i`."""
    prev = tf.pad(mask[:-1], [[1, 0]])
    first = tf.logical_and(mask, tf.logical_not(prev))
    rest = tf.logical_and(mask, prev)
    sentinels = tf.cast(vocab_size, tokens.dtype) - tf.cumsum(tf.cast(first, tokens.dtype))
    return tf.boolean_mask(tf.where(first, sentinels, tokens), tf.logical_not(rest))


def span_corruption_tf(tokens: tf.Tensor, noise_density: float, mean_noise_span_length: float,
                       vocab_size: int, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(inputs, targets)` of T5 span corruption for one chunk (no EOS yet)."""
    mask = noise_mask_tf(tf.size(tokens), noise_density, mean_noise_span_length, seed)
    return (sentinel_replace(tokens, mask, vocab_size),
            sentinel_replace(tokens, tf.logical_not(mask), vocab_size))


def prefix_split_tf(tokens: tf.Tensor, noise_density: float,
                    seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(inputs, targets)` of a prefix-LM split: the first n tokens and the rest, with
    n ~ UniformInt[min_in, max_in] (objectives.md §4)."""
    length = tf.size(tokens)
    max_in = tf.maximum(length - 1, 0)
    scaled = tf.round(tf.constant(1 - 2 * noise_density, tf.float32)
                      * tf.cast(max_in, tf.float32))
    min_in = tf.minimum(max_in, tf.maximum(1, tf.cast(scaled, tf.int32)))
    n = tf.random.stateless_uniform([], seed=seed, minval=min_in, maxval=max_in + 1,
                                    dtype=tf.int32)
    return tokens[:n], tokens[n:]


# ----------------------------------------------------------------------------------------------
# NumPy entry points (contract)
# ----------------------------------------------------------------------------------------------


def _tf_seed(seed: int) -> tf.Tensor:
    seed = int(seed) % (1 << 62)
    return tf.constant([seed & 0x7FFFFFFF, seed >> 31], dtype=tf.int64)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            seed: int) -> np.ndarray:
    """Boolean noise mask of shape `[length]`, deterministic for a given integer `seed`.

    >>> m = random_spans_noise_mask(568, 0.15, 3.0, seed=0)
    >>> int(m.sum()), bool(m[0]), bool(m[-1])
    (85, False, True)

    Raises ValueError when the configuration needs more noise spans than there are kept tokens.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if not 0 <= noise_density < 1:
        raise ValueError(f"noise_density must be in [0, 1), got {noise_density}")
    if mean_noise_span_length <= 0:
        raise ValueError(f"mean_noise_span_length must be > 0, got {mean_noise_span_length}")
    check_spans_fit(length, noise_density, mean_noise_span_length)
    mask = noise_mask_tf(tf.constant(length, tf.int32), float(noise_density),
                         float(mean_noise_span_length), _tf_seed(seed))
    return mask.numpy().astype(bool)


def corrupt_spans(tokens: np.ndarray, mask: np.ndarray,
                  vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`(inputs, targets)` of span corruption for given tokens and noise mask (no EOS).

    >>> corrupt_spans(np.arange(10, 16), np.array([1, 1, 0, 0, 1, 0], bool), 1000)
    (array([999,  12,  13, 998,  15], dtype=int32), array([ 10,  11, 999,  14, 998], dtype=int32))
    """
    t = tf.constant(np.asarray(tokens, np.int32))
    m = tf.constant(np.asarray(mask, bool))
    return (sentinel_replace(t, m, vocab_size).numpy(),
            sentinel_replace(t, tf.logical_not(m), vocab_size).numpy())


def random_prefix_split(tokens: np.ndarray, noise_density: float,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(inputs, targets)` of a prefix-LM split of `tokens` (no EOS)."""
    prefix_bounds(len(tokens), noise_density)  # validates noise_density
    inputs, targets = prefix_split_tf(tf.constant(np.asarray(tokens, np.int32)),
                                      float(noise_density), _tf_seed(seed))
    return inputs.numpy(), targets.numpy()
