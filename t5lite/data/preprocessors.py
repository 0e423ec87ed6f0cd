"""SeqIO preprocessors that apply a `DenoisingObjective` to tokenized documents.

Input: examples whose "targets" feature holds a document's token ids (no EOS). Output: examples
with "inputs" and "targets" (no EOS; `seqio.preprocessors.append_eos_after_trim` follows).

The pipeline, all in tf.data ops (no per-token Python):

1. `select_random_chunk`: documents longer than 65,536 tokens keep one random aligned window.
2. Groups of 128 documents (`ragged_batch`); in each group every document is given to one
   denoiser (a stateless draw; see `denoisers.DenoisingObjective` for the probabilities). Span denoisers concatenate their documents
   and cut chunks of their own length T; prefix-LM denoisers cut each document separately into
   chunks of `inputs - 1` (minus the paradigm token). With several denoisers the chunks of a
   group are shuffled; with one they stay in document order.
3. Each chunk is corrupted by its denoiser (`tf.switch_case`), and the paradigm token ids are
   prepended to the inputs.

Every random choice uses a stateless seed handed out by `seqio.map_over_dataset`, so a stream is
a pure function of the task seed.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from t5lite.data import objectives
from t5lite.data.denoisers import PREFIX, DenoisingObjective, Plan

DOCUMENT_CHUNK_LIMIT = 65536
GROUP_SIZE = 128
DENOISER_KEY = "denoiser"


def select_random_chunk(ds: tf.data.Dataset, max_length: int = DOCUMENT_CHUNK_LIMIT,
                        key: str = "targets") -> tf.data.Dataset:
    """Keep one random window of at most `max_length` tokens of each example's `key` feature;
    windows start at multiples of `max_length` (T5's `select_random_chunk`)."""

    @seqio.map_over_dataset(num_seeds=1)
    def chunk(ex, seed):
        tokens = ex[key]
        n = tf.size(tokens)
        num_windows = tf.maximum((n + max_length - 1) // max_length, 1)
        start = max_length * tf.random.stateless_uniform([], seed=seed, maxval=num_windows,
                                                         dtype=tf.int32)
        return {key: tokens[start:start + max_length]}

    return chunk(ds)


def _split_rows(values: tf.Tensor, starts: tf.Tensor) -> tf.RaggedTensor:
    return tf.RaggedTensor.from_row_starts(values, tf.cast(starts, tf.int64), validate=False)


def _assignment_logits(plan: Plan, doc_lengths: tf.Tensor) -> tf.Tensor:
    """`[num_docs, num_denoisers]` log-probabilities of sending each document to each denoiser:
    log(rate_k) for rate_unit "documents"; log(rate_k / e_k(n)) for "examples", where e_k(n) is
    the number of examples denoiser k makes of a document of n tokens."""
    log_rates = tf.math.log(tf.constant(plan.probabilities, tf.float32))[None, :]
    n = tf.cast(tf.maximum(doc_lengths, 1), tf.float32)[:, None]
    if plan.rate_unit == "documents":
        return tf.broadcast_to(log_rates, [tf.shape(n)[0], len(plan.probabilities)])
    chunk = tf.constant([[float(x.chunk_length) for x in plan.lengths]], tf.float32)
    concatenated = tf.constant([[x.concatenate for x in plan.lengths]])
    examples = tf.where(concatenated, n / chunk, tf.math.ceil(n / chunk))
    return log_rates - tf.math.log(examples)


def _assign_and_chunk(plan: Plan):
    probs = plan.probabilities

    @seqio.map_over_dataset(num_seeds=1)
    def assign(docs: tf.RaggedTensor, seed):
        if not isinstance(docs, tf.RaggedTensor):  # documents that all had one static length
            docs = tf.RaggedTensor.from_tensor(docs)
        seeds = tf.random.experimental.stateless_split(seed, 2)
        num_docs = docs.nrows(out_type=tf.int32)
        if len(probs) > 1:
            logits = _assignment_logits(plan, docs.row_lengths())
            which = tf.random.stateless_categorical(logits, 1, seeds[0], dtype=tf.int32)[:, 0]
        else:
            which = tf.zeros([num_docs], tf.int32)
        pieces, ids = [], []
        for k, lengths in enumerate(plan.lengths):
            mine = tf.ragged.boolean_mask(docs, tf.equal(which, k))
            values = mine.flat_values
            size = tf.size(values, out_type=tf.int64)
            if lengths.concatenate:
                starts = tf.range(0, size, lengths.chunk_length, dtype=tf.int64)
            else:
                row_starts = mine.row_starts()
                offset = tf.range(size, dtype=tf.int64) - tf.gather(row_starts,
                                                                    mine.value_rowids())
                starts = tf.where(tf.equal(offset % lengths.chunk_length, 0))[:, 0]
            rows = _split_rows(values, starts)
            pieces.append(rows)
            ids.append(tf.fill([rows.nrows(out_type=tf.int32)], k))
        rows = tf.concat(pieces, axis=0)
        ids = tf.concat(ids, axis=0)
        if len(probs) == 1:  # one denoiser: chunks stay in document order, as in T5
            return {"targets": rows, DENOISER_KEY: ids}
        # Several: interleave the denoisers' chunks (else each group emits them in blocks).
        order = tf.argsort(tf.random.stateless_uniform([tf.size(ids)], seed=seeds[1]))
        return {"targets": tf.gather(rows, order), DENOISER_KEY: tf.gather(ids, order)}

    return assign


def _corrupt(plan: Plan, keep_denoiser_id: bool):
    def branch(k: int, tokens: tf.Tensor, seed: tf.Tensor):
        d = plan.denoisers[k]
        ids = plan.lengths[k].paradigm_ids

        def fn():
            if d.kind == PREFIX:
                inputs, targets = objectives.prefix_split_tf(tokens, d.noise_density, seed)
            else:
                inputs, targets = objectives.span_corruption_tf(
                    tokens, d.noise_density, d.mean_noise_span_length, plan.vocab_size, seed)
            if ids:
                inputs = tf.concat([tf.constant(ids, tokens.dtype), inputs], axis=0)
            return inputs, targets

        return fn

    @seqio.map_over_dataset(num_seeds=1)
    def corrupt(ex, seed):
        tokens = ex["targets"]
        if len(plan.denoisers) == 1:
            inputs, targets = branch(0, tokens, seed)()
        else:
            inputs, targets = tf.switch_case(
                ex[DENOISER_KEY], [branch(k, tokens, seed) for k in range(len(plan.denoisers))])
        out = {"inputs": inputs, "targets": targets}
        if keep_denoiser_id:
            out[DENOISER_KEY] = ex[DENOISER_KEY]
        return out

    return corrupt


def denoise(ds: tf.data.Dataset, plan: Plan, *, keep_denoiser_id: bool = False,
            group_size: int = GROUP_SIZE) -> tf.data.Dataset:
    """Apply a planned objective to a dataset of {"targets": document tokens}."""
    ds = select_random_chunk(ds)
    ds = ds.map(lambda ex: ex["targets"], num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ragged_batch(group_size)
    ds = _assign_and_chunk(plan)(ds)
    ds = ds.unbatch()
    ds = ds.filter(lambda ex: tf.size(ex["targets"]) > 0)
    return _corrupt(plan, keep_denoiser_id)(ds)


def make_denoise_preprocessor(objective: DenoisingObjective, keep_denoiser_id: bool = False):
    """A SeqIO preprocessor `(ds, sequence_length, output_features) -> ds` for `objective`.

    The objective is planned against the sequence lengths and the "targets" vocabulary when the
    dataset is built, so an impossible configuration fails there with a `ConfigError`, before
    any data is read.
    """

    def denoise_preprocessor(ds: tf.data.Dataset, sequence_length: Mapping[str, int],
                             output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
        plan = objective.plan(sequence_length, output_features["targets"].vocabulary)
        return denoise(ds, plan, keep_denoiser_id=keep_denoiser_id)

    denoise_preprocessor.__name__ = f"{objective.name}_preprocessor"
    return denoise_preprocessor


def keep_only(ds: tf.data.Dataset, keys: tuple[str, ...]) -> tf.data.Dataset:
    """Drop every feature but `keys`."""
    return ds.map(lambda ex: {k: ex[k] for k in keys}, num_parallel_calls=tf.data.AUTOTUNE)
