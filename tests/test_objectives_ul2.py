"""UL2 mixture of denoisers, prefix LM and BART as tf.data preprocessors (objectives.md §4-6)."""

from __future__ import annotations

import collections
import gzip
import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5lite.data import bart, denoisers, objectives, preprocessors
from t5lite.data.vocab import load_vocabulary
from t5lite.errors import ConfigError

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "tasks", "t5lite_tasks", "demo", "data")


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary(os.path.join(DEMO, "demo_8k.model"))


@pytest.fixture(scope="module")
def documents():
    with gzip.open(os.path.join(DEMO, "validation.jsonl.gz"), "rt") as f:
        return [json.loads(line)["text"] for line in f][:24]


def _token_dataset(vocab, documents):
    return tf.data.Dataset.from_tensor_slices(documents).map(
        lambda text: {"targets": vocab.encode_tf(text)})


def _run(ds_fn, seed=3):
    with seqio.utils.map_seed_manager(seed):
        ds = ds_fn()
    return list(ds.as_numpy_iterator())


LENGTHS = {"inputs": 128, "targets": 128}


@pytest.fixture(scope="module")
def ul2_examples(vocab, documents):
    plan = denoisers.ul2().plan(LENGTHS, vocab)
    examples = _run(lambda: preprocessors.denoise(_token_dataset(vocab, documents), plan,
                                                  keep_denoiser_id=True))
    return plan, examples


def test_ul2_paradigm_token_first_and_never_masked(vocab, ul2_examples):
    plan, examples = ul2_examples
    paradigm = {vocab.tokenizer.piece_to_id(t) for t in ("[NLU]", "[NLG]", "[S2S]")}
    assert paradigm == {3, 4, 5}
    for ex in examples:
        expected = plan.lengths[ex["denoiser"]].paradigm_ids
        assert tuple(ex["inputs"][:1]) == expected
        assert not paradigm & set(ex["inputs"][1:].tolist())
        assert not paradigm & set(ex["targets"].tolist())


def test_ul2_every_denoiser_fits_its_lengths(ul2_examples):
    plan, examples = ul2_examples
    by_denoiser = collections.defaultdict(list)
    for ex in examples:
        by_denoiser[int(ex["denoiser"])].append(ex)
        lengths = plan.lengths[ex["denoiser"]]
        assert len(ex["inputs"]) + 1 <= LENGTHS["inputs"]  # + EOS
        assert len(ex["targets"]) + 1 <= lengths.targets_length <= LENGTHS["targets"]
    assert sorted(by_denoiser) == list(range(7))
    for k, exs in by_denoiser.items():
        if plan.denoisers[k].kind == denoisers.SPAN:
            # Full chunks (all but a group's last one) fill the encoder exactly.
            assert max(len(e["inputs"]) for e in exs) + 1 == LENGTHS["inputs"]


def test_ul2_span_denoisers_use_their_own_sentinels(vocab, ul2_examples):
    plan, examples = ul2_examples
    for ex in examples:
        d = plan.denoisers[ex["denoiser"]]
        if d.kind == denoisers.SPAN:
            assert ex["targets"][0] == vocab.vocab_size - 1
            assert ex["inputs"][-1] >= vocab.vocab_size - vocab.extra_ids


@pytest.mark.parametrize("rates", ["uniform", "ul2r", (1, 0, 2, 0, 0, 1, 4)])
def test_ul2_document_frequencies_follow_document_rates(vocab, rates):
    objective = denoisers.ul2(rates, rate_unit="documents")
    plan = objective.plan({"inputs": 256, "targets": 256}, vocab)
    # 4000 documents of 20 tokens each: each document's tokens all go to one denoiser, so the
    # token share of a denoiser is its share of documents.
    docs = tf.data.Dataset.from_tensor_slices(np.full([4000, 20], 7, np.int32))
    docs = docs.ragged_batch(preprocessors.GROUP_SIZE)
    tokens = collections.Counter()
    with seqio.utils.map_seed_manager(11):
        chunked = preprocessors._assign_and_chunk(plan)(docs)
    for group in chunked.as_numpy_iterator():
        for row, k in zip(group["targets"], group[preprocessors.DENOISER_KEY]):
            tokens[int(k)] += len(row)
    total = sum(tokens.values())
    assert total == 4000 * 20
    for k, p in enumerate(plan.probabilities):
        assert abs(tokens[k] / total - p) < 0.025, (k, tokens[k] / total, p)


@pytest.mark.parametrize("rates", ["uniform", "ul2r"])
def test_ul2_example_frequencies_follow_rates(vocab, rates):
    plan = denoisers.ul2(rates).plan({"inputs": 128, "targets": 128}, vocab)
    rng = np.random.default_rng(0)
    lengths = rng.integers(30, 600, size=3000)
    docs = [rng.integers(10, 7000, size=n).astype(np.int32) for n in lengths]
    ds = tf.data.Dataset.from_generator(lambda: iter({"targets": d} for d in docs),
                                        output_signature={"targets": tf.TensorSpec([None],
                                                                                   tf.int32)})
    examples = _run(lambda: preprocessors.denoise(ds, plan, keep_denoiser_id=True), seed=2)
    counts = collections.Counter(int(e["denoiser"]) for e in examples)
    total = sum(counts.values())
    assert total > 5000
    for k, p in enumerate(plan.probabilities):
        assert abs(counts[k] / total - p) < 0.03, (plan.denoisers[k].name, counts[k] / total, p)


def test_ul2r_preset_rates():
    objective = denoisers.ul2("ul2r")
    shares = collections.defaultdict(float)
    total = sum(d.rate for d in objective.denoisers)
    for d in objective.denoisers:
        shares[d.paradigm] += d.rate / total
    assert shares == {"[S2S]": 0.5, "[NLU]": 0.25, "[NLG]": 0.25}


def test_ul2_plan_values_at_512(vocab):
    big = seqio.SentencePieceVocabulary(os.path.join(DEMO, "demo_8k.model"), extra_ids=200)
    plan = denoisers.ul2().plan({"inputs": 512, "targets": 512}, big)
    # The paradigm token takes one encoder slot, so each span denoiser plans for 511.
    for d, lengths in zip(plan.denoisers[:6], plan.lengths[:6]):
        assert (lengths.chunk_length, lengths.targets_length) == objectives.random_spans_helper(
            511, d.noise_density, d.mean_noise_span_length)
    assert [x.chunk_length for x in plan.lengths[:6]] == [567, 587, 765, 906, 599, 1004]
    assert plan.lengths[2].sentinels == 127
    # S: chunk 510, prefix >= round(0.5 * 509) = 254 (half to even), targets <= 510 - 254 + EOS
    assert plan.lengths[6].chunk_length == 510 and plan.lengths[6].targets_length == 257


def test_sentinel_overflow_is_refused_with_the_count(vocab):
    with pytest.raises(ConfigError, match=r"needs 127 sentinels.*100 extra ids"):
        denoisers.ul2().plan({"inputs": 512, "targets": 512}, vocab)
    few = seqio.SentencePieceVocabulary(os.path.join(DEMO, "demo_8k.model"), extra_ids=10)
    with pytest.raises(ConfigError, match=r"needs 28 sentinels.*10 extra ids"):
        denoisers.span_corruption().plan({"inputs": 512, "targets": 114}, few)


def test_too_short_lengths_are_refused(vocab):
    with pytest.raises(ConfigError, match="targets length 114 is too short"):
        denoisers.ul2().plan({"inputs": 256, "targets": 114}, vocab)
    with pytest.raises(ConfigError, match="too short"):
        denoisers.span_corruption().plan({"inputs": 2, "targets": 114}, vocab)
    with pytest.raises(ConfigError, match="targets length 100 is too short"):
        denoisers.span_corruption().plan({"inputs": 512, "targets": 100}, vocab)
    with pytest.raises(ConfigError, match="too short"):
        denoisers.prefix_lm().plan({"inputs": 2, "targets": 8}, vocab)


def test_bad_objective_configs():
    with pytest.raises(ConfigError, match="seven rates"):
        denoisers.ul2((1, 2, 3))
    with pytest.raises(ConfigError, match="preset"):
        denoisers.ul2("nope")
    with pytest.raises(ConfigError, match=r"\[0, 0.5\]"):
        denoisers.prefix_lm(0.7)
    with pytest.raises(ConfigError, match="mean_noise_span_length"):
        denoisers.span_corruption(0.15, 0.5)


def test_vocabulary_without_paradigm_pieces_encodes_them_with_a_warning(vocab, caplog):
    class Plain:
        """A vocabulary whose model lacks the paradigm pieces."""
        tokenizer = type("T", (), {"piece_to_id": lambda self, p: 2, "unk_id": lambda self: 2,
                                   "id_to_piece": lambda self, i: "<unk>"})()
        vocab_size, extra_ids = vocab.vocab_size, vocab.extra_ids

        def encode(self, text):
            return [200, 201, 202]

    with caplog.at_level("WARNING"):
        assert denoisers.paradigm_ids(Plain(), "[NLU]") == (200, 201, 202)
    assert "no single piece '[NLU]'" in caplog.text


def test_prefix_lm_preprocessor_splits_each_document(vocab, documents):
    plan = denoisers.prefix_lm().plan({"inputs": 64, "targets": 64}, vocab)
    examples = _run(lambda: preprocessors.denoise(_token_dataset(vocab, documents), plan))
    chunks = collections.Counter()
    for doc in documents:
        ids = list(vocab.encode(doc))
        for i in range(0, len(ids), 63):
            chunks[tuple(ids[i:i + 63])] += 1
    rebuilt = collections.Counter(tuple(e["inputs"].tolist() + e["targets"].tolist())
                                  for e in examples)
    assert rebuilt == chunks  # no cross-document concatenation, nothing lost
    assert all(len(e["inputs"]) >= 1 and len(e["targets"]) >= 1 for e in examples)


def test_span_corruption_preprocessor_concatenates_and_keeps_every_token(vocab, documents):
    plan = denoisers.span_corruption().plan({"inputs": 128, "targets": 128}, vocab)
    examples = _run(lambda: preprocessors.denoise(_token_dataset(vocab, documents), plan))
    sentinel_floor = vocab.vocab_size - vocab.extra_ids
    kept = sum(int((e["inputs"] < sentinel_floor).sum()) for e in examples)
    noise = sum(int((e["targets"] < sentinel_floor).sum()) for e in examples)
    assert kept + noise == sum(len(vocab.encode(d)) for d in documents)
    full = [e for e in examples if len(e["inputs"]) + 1 == 128]
    assert len(full) >= len(examples) - 1  # one group: only its last chunk is partial
    assert all(len(e["targets"]) + 1 == plan.lengths[0].targets_length for e in full)


def test_same_seed_same_examples(vocab, documents):
    plan = denoisers.ul2().plan(LENGTHS, vocab)
    a = _run(lambda: preprocessors.denoise(_token_dataset(vocab, documents), plan), seed=5)
    b = _run(lambda: preprocessors.denoise(_token_dataset(vocab, documents), plan), seed=5)
    c = _run(lambda: preprocessors.denoise(_token_dataset(vocab, documents), plan), seed=6)
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


# ---------------------------------------------------------------------------------------- BART


def test_bart_infilling_example(vocab):
    word_start, _ = bart.piece_tables(vocab)
    text = " ".join(f"w{i}" for i in range(40))
    ids = tf.constant(vocab.encode(text), tf.int32)
    mask_id = vocab.vocab_size - 1
    for seed in range(20):
        out = bart.infill_tf(ids, tf.constant(word_start), mask_id, 0.3, 3.0,
                             tf.constant([seed, 0], tf.int64)).numpy()
        assert mask_id in out
        kept = [t for t in out.tolist() if t != mask_id]
        it = iter(ids.numpy().tolist())
        assert all(t in it for t in kept)  # the kept tokens are a subsequence, in order
        assert not any(a == b == mask_id for a, b in zip(out[:-1], out[1:]))
        words = sum(1 for t in ids.numpy() if word_start[t])
        removed_words = words - sum(1 for t in kept if word_start[t])
        assert removed_words <= int(np.ceil(0.3 * words))


def test_bart_sentence_permutation_keeps_sentences(vocab):
    _, sentence_end = bart.piece_tables(vocab)
    sentences = ["The first one.", "A second sentence!", "Is this the third?", "Four."]
    ids = vocab.encode(" ".join(sentences))
    seen = set()
    for seed in range(12):
        out = bart.permute_sentences_tf(tf.constant(ids, tf.int32), tf.constant(sentence_end),
                                        tf.constant([seed, 1], tf.int64)).numpy().tolist()
        assert sorted(out) == sorted(ids)
        text = vocab.decode(out)
        assert all(s in text for s in sentences)
        seen.add(text)
    assert len(seen) > 3


def test_bart_preprocessor_targets_are_the_original_chunk(vocab, documents):
    fn = bart.make_bart_preprocessor(bart.BartObjective())
    features = {"targets": seqio.Feature(vocab)}
    examples = _run(lambda: fn(_token_dataset(vocab, documents[:6]),
                               sequence_length={"inputs": 64, "targets": 64},
                               output_features=features))
    originals = []
    for doc in documents[:6]:
        ids = list(vocab.encode(doc))
        originals += [ids[i:i + 63] for i in range(0, len(ids), 63)]
    assert [e["targets"].tolist() for e in examples] == originals
    assert all(vocab.vocab_size - 1 in e["inputs"] for e in examples if len(e["targets"]) > 20)
