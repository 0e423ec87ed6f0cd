"""BART-style denoising: sentence permutation, then text infilling (objectives.md §6).

Per chunk of `min(inputs, targets) - 1` tokens of one document:

1. Sentence permutation: the chunk is split after every piece that ends a sentence (`.`, `!`,
   `?`, optionally followed by closing quotes/brackets) and the sentences are shuffled.
2. Text infilling: `ceil(mask_ratio * words)` words are masked (a word starts at a piece that
   begins with "▁"). Span lengths are drawn from Poisson(λ) until they cover that many words
   (the last one is cut to fit); each span starts at a uniformly chosen word. Each maximal run of
   masked tokens becomes one mask token, and a zero-length span inserts a mask token before its
   word. The mask token is the first sentinel, `<extra_id_0>`.
3. The target is the original, unpermuted chunk.

Example (words w0..w5, one span of 2 words at w1, one zero-length span at w4)::

    w0 w1 w2 w3 w4 w5   ->   w0 <M> w3 <M> w4 w5
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from t5lite.data.preprocessors import select_random_chunk
from t5lite.errors import ConfigError

_SENTENCE_END_CHARS = (".", "!", "?")
_CLOSERS = "\"')]’”"


@dataclasses.dataclass(frozen=True)
class BartObjective:
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    permute_sentences: bool = True
    name: str = "bart"

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not self.poisson_lambda > 0:
            raise ConfigError(f"poisson_lambda must be > 0, got {self.poisson_lambda}")

    def chunk_length(self, sequence_length: Mapping[str, int]) -> int:
        if not sequence_length or "inputs" not in sequence_length \
                or "targets" not in sequence_length:
            raise ConfigError("the BART objective needs sequence lengths for 'inputs' and "
                              f"'targets', got {sequence_length}")
        chunk = min(int(sequence_length["inputs"]), int(sequence_length["targets"])) - 1
        if chunk < 2:
            raise ConfigError(f"sequence lengths {dict(sequence_length)} are too short for the "
                              "BART objective (need at least 3)")
        return chunk


def piece_tables(vocab) -> tuple[np.ndarray, np.ndarray]:
    """Boolean tables over the vocabulary: (piece starts a word, piece ends a sentence)."""
    sp = vocab.tokenizer
    n = vocab.vocab_size
    word_start = np.zeros([n], bool)
    sentence_end = np.zeros([n], bool)
    for i in range(min(sp.get_piece_size(), n)):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        word_start[i] = piece.startswith("▁")
        sentence_end[i] = piece.rstrip(_CLOSERS).endswith(_SENTENCE_END_CHARS)
    return word_start, sentence_end


def permute_sentences_tf(tokens: tf.Tensor, sentence_end: tf.Tensor, seed) -> tf.Tensor:
    n = tf.size(tokens)
    ends = tf.gather(sentence_end, tokens)
    sentence_id = tf.cumsum(tf.cast(ends, tf.int32), exclusive=True)
    num_sentences = tf.reduce_max(tf.concat([sentence_id, [-1]], 0)) + 1
    rank = tf.argsort(tf.random.stateless_uniform([num_sentences], seed=seed))
    # Sort tokens by (new rank of their sentence, position).
    key = tf.gather(rank, sentence_id) * n + tf.range(n)
    return tf.gather(tokens, tf.argsort(key))


def infill_tf(tokens: tf.Tensor, word_start: tf.Tensor, mask_id: int, mask_ratio: float,
              poisson_lambda: float, seed) -> tf.Tensor:
    seeds = tf.random.experimental.stateless_split(seed, 3)
    n = tf.size(tokens)
    starts = tf.gather(word_start, tokens)
    word_id = tf.cumsum(tf.cast(starts, tf.int32)) - 1  # -1: pieces before the first word
    num_words = tf.reduce_sum(tf.cast(starts, tf.int32))
    to_mask = tf.cast(tf.math.ceil(tf.cast(num_words, tf.float32) * mask_ratio), tf.int32)
    draws = tf.cast(tf.random.stateless_poisson([tf.maximum(to_mask, 1)], seeds[0],
                                                lam=poisson_lambda), tf.int32)
    covered = tf.cumsum(draws)
    num_spans = tf.minimum(tf.reduce_sum(tf.cast(covered < to_mask, tf.int32)) + 1,
                           tf.size(draws))
    lengths = draws[:num_spans]
    excess = tf.maximum(tf.reduce_sum(lengths) - to_mask, 0)
    lengths = tf.concat([lengths[:-1], tf.maximum(lengths[-1:] - excess, 0)], 0)
    num_spans = tf.minimum(num_spans, num_words)
    lengths = lengths[:num_spans]
    span_start = tf.argsort(tf.random.stateless_uniform([num_words], seed=seeds[1]))[:num_spans]
    # Words covered by spans: difference array over [start, start + length).
    ends = tf.minimum(span_start + lengths, num_words)
    delta = (tf.math.unsorted_segment_sum(tf.ones_like(span_start), span_start, num_words + 1)
             - tf.math.unsorted_segment_sum(tf.ones_like(ends), ends, num_words + 1))
    # (at least one entry, so that the gathers below are valid for a chunk without words)
    word_masked = tf.cumsum(delta)[:tf.maximum(num_words, 1)] > 0
    insert_word = tf.math.unsorted_segment_sum(
        tf.cast(tf.equal(lengths, 0), tf.int32), span_start, tf.maximum(num_words, 1)) > 0
    safe_word = tf.maximum(word_id, 0)
    masked = tf.logical_and(word_id >= 0, tf.gather(word_masked, safe_word))
    prev_masked = tf.pad(masked[:-1], [[1, 0]])
    insert = tf.logical_and(tf.logical_and(starts, tf.gather(insert_word, safe_word)),
                            tf.logical_not(tf.logical_or(masked, prev_masked)))
    emit_token = tf.logical_or(tf.logical_not(masked), tf.logical_not(prev_masked))
    token_out = tf.where(masked, tf.cast(mask_id, tokens.dtype), tokens)
    pairs = tf.stack([tf.fill([n], tf.cast(mask_id, tokens.dtype)), token_out], axis=1)
    keep = tf.stack([insert, emit_token], axis=1)
    return tf.boolean_mask(tf.reshape(pairs, [-1]), tf.reshape(keep, [-1]))


def make_bart_preprocessor(objective: BartObjective):
    """SeqIO preprocessor: {"targets": document tokens} -> {"inputs", "targets"} (no EOS)."""

    def bart_preprocessor(ds: tf.data.Dataset, sequence_length: Mapping[str, int],
                          output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
        vocab = output_features["targets"].vocabulary
        chunk = objective.chunk_length(sequence_length)
        if vocab.extra_ids < 1:
            raise ConfigError("the BART objective uses <extra_id_0> as its mask token, but the "
                              "vocabulary has no extra ids")
        word_start_np, sentence_end_np = piece_tables(vocab)
        word_start = tf.constant(word_start_np)
        sentence_end = tf.constant(sentence_end_np)
        mask_id = vocab.vocab_size - 1

        ds = select_random_chunk(ds)

        def split(ex):
            tokens = ex["targets"]
            starts = tf.range(0, tf.size(tokens, out_type=tf.int64), chunk, dtype=tf.int64)
            return tf.RaggedTensor.from_row_starts(tokens, starts, validate=False)

        ds = ds.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

        @seqio.map_over_dataset(num_seeds=2)
        def noise(tokens, seeds):
            original = tokens
            if objective.permute_sentences:
                tokens = permute_sentences_tf(tokens, sentence_end, seeds[0])
            inputs = infill_tf(tokens, word_start, mask_id, objective.mask_ratio,
                               objective.poisson_lambda, seeds[1])
            return {"inputs": inputs, "targets": original}

        return noise(ds)

    return bart_preprocessor
