"""Batches: packing, exact lengths, determinism, bit-exact restart, host shards, eval padding."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5lite.data import pipeline
from t5lite.data.pipeline import DataConfig, make_batch_stream
from t5lite.data.registry import get_task_or_mixture, import_task_modules
from t5lite.data.sources import TextDocumentSource
from t5lite.errors import ConfigError, UserError

import_task_modules(["t5lite_tasks"])

SPAN = {"inputs": 128, "targets": 32}


def test_canonical_packing_case():
    examples = [{"inputs": [7, 8, 5, 1], "targets": [3, 9, 1]},
                {"inputs": [8, 4, 9, 3, 1], "targets": [4, 1]}]
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                          "targets": tf.TensorSpec([None], tf.int32)})
    converter = pipeline.make_feature_converter("enc_dec", pack=True)
    out = next(converter(ds, {"inputs": 10, "targets": 7}).as_numpy_iterator())
    expected = {
        "encoder_input_tokens": [7, 8, 5, 1, 8, 4, 9, 3, 1, 0],
        "encoder_segment_ids": [1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
        "encoder_positions": [0, 1, 2, 3, 0, 1, 2, 3, 4, 0],
        "decoder_target_tokens": [3, 9, 1, 4, 1, 0, 0],
        "decoder_input_tokens": [0, 3, 9, 0, 4, 0, 0],
        "decoder_loss_weights": [1, 1, 1, 1, 1, 0, 0],
        "decoder_segment_ids": [1, 1, 1, 2, 2, 0, 0],
        "decoder_positions": [0, 1, 2, 0, 1, 0, 0],
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].tolist() == value, key


def test_span_corruption_task_gives_exactly_512_inputs_and_114_targets():
    task = get_task_or_mixture("demo_span_corruption")
    ds = task.get_dataset({"inputs": 512, "targets": 114}, split="validation", shuffle=False,
                          seed=1, num_epochs=1)
    lengths = collections.Counter((len(e["inputs"]), len(e["targets"]))
                                  for e in ds.take(40).as_numpy_iterator())
    assert lengths.most_common(1)[0][0] == (512, 114)
    assert lengths[(512, 114)] >= 38  # only a group's last chunk can be shorter
    assert all(i <= 512 and t <= 114 for i, t in lengths)


def _batches(config, n, **kwargs):
    stream = make_batch_stream(config, **kwargs)
    return [next(stream) for _ in range(n)], stream


def test_batches_have_exact_shapes_and_dtypes():
    config = DataConfig("demo_span_corruption", SPAN, host_batch_size=4, shuffle_buffer_size=16)
    (batch,), stream = _batches(config, 1)
    assert stream.batches_consumed == 1
    lengths = pipeline.model_feature_lengths(config)
    assert set(batch) == set(lengths)
    for key, value in batch.items():
        assert value.dtype == np.int32 and value.shape == (4, lengths[key]), key
    assert (batch["decoder_loss_weights"] == (batch["decoder_target_tokens"] != 0)).all()


def test_same_seed_same_batches_and_restart_is_bit_exact():
    config = DataConfig("demo_ul2", {"inputs": 96, "targets": 96}, host_batch_size=2, seed=7,
                        shuffle_buffer_size=64)
    first, _ = _batches(config, 5)
    resumed, stream = _batches(config, 2, start_batch=3)
    assert stream.batches_consumed == 5
    for a, b in zip(first[3:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other, _ = _batches(dataclasses.replace(config, seed=8), 1)
    assert not np.array_equal(other[0]["encoder_input_tokens"],
                              first[0]["encoder_input_tokens"])


def test_eval_stream_is_finite_and_pads_the_last_batch_with_zero_rows():
    config = DataConfig("demo_span_corruption", SPAN, split="validation", host_batch_size=64,
                        shuffle=False, num_epochs=1)
    batches = list(make_batch_stream(config))
    assert len(batches) >= 2
    assert all(b["encoder_input_tokens"].shape == (64, 128) for b in batches)
    last = batches[-1]
    empty = ~last["encoder_input_tokens"].any(axis=1)
    assert empty.any() and not empty[0]
    assert not last["decoder_loss_weights"][empty].any()
    assert empty.tolist() == sorted(empty.tolist())  # padding rows come last
    again = list(make_batch_stream(config))
    assert all(np.array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])
               for a, b in zip(batches, again))


def _targets(config, **kwargs):
    rows = collections.Counter()
    for batch in make_batch_stream(config, **kwargs):
        for row, weights in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"]):
            if weights.any():
                rows[tuple(row.tolist())] += 1
    return rows


def test_host_shards_are_disjoint_and_cover_the_split():
    config = DataConfig("demo_copy", {"inputs": 32, "targets": 32}, split="validation",
                        host_batch_size=32, shuffle=False, pack=False, num_epochs=1)
    everything = _targets(config)
    shards = [_targets(config, shard_index=i, num_shards=3) for i in range(3)]
    assert sum(shards, collections.Counter()) == everything
    assert all(sum(s.values()) > 0 for s in shards)


def test_prefix_lm_converter():
    config = DataConfig("demo_prefix_lm", {"inputs": 64, "targets": 64}, host_batch_size=2,
                        feature_converter="prefix_lm", shuffle_buffer_size=16)
    (batch,), _ = _batches(config, 1)
    assert batch["decoder_target_tokens"].shape == (2, 128)
    assert "decoder_causal_attention" in batch and "encoder_input_tokens" not in batch


def _write_jsonl(path, texts):
    with gzip.open(path, "wt") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


@pytest.mark.parametrize("file_format,num_files", [("jsonl", 1), ("jsonl", 5), ("text", 2)])
def test_source_shards_before_shuffling(tmp_path, file_format, num_files):
    texts = [f"document number {i}" for i in range(60)]
    paths = []
    for j in range(num_files):
        part = texts[j::num_files]
        if file_format == "jsonl":
            path = tmp_path / f"part{j}.jsonl.gz"
            _write_jsonl(path, part)
        else:
            path = tmp_path / f"part{j}.txt"
            path.write_text("\n".join(part) + "\n\n")
        paths.append(str(path))
    source = TextDocumentSource({"train": paths}, file_format=file_format)
    seen = []
    for index in range(4):  # each host with its own seed
        ds = source.get_dataset("train", shuffle=True, seed=100 + index,
                                shard_info=seqio.ShardInfo(index, 4))
        seen.append([ex["text"].decode() for ex in ds.as_numpy_iterator()])
    flat = [t for shard in seen for t in shard]
    assert sorted(flat) == sorted(texts) and len(set(flat)) == len(flat)
    one = [ex["text"].decode() for ex in
           source.get_dataset("train", shuffle=True, seed=1).as_numpy_iterator()]
    assert sorted(one) == sorted(texts) and one != texts


def test_hosts_get_their_own_corruption_seed():
    task = get_task_or_mixture("demo_span_corruption")
    assert pipeline._shards_before_shuffling(task, "train", 4)
    seeds = {pipeline.shard_seed(0, i, 4) for i in range(4)}
    assert len(seeds) == 4 and pipeline.shard_seed(0, 0, 1) == 0
    assert pipeline.shard_seed(None, 1, 4) is None


def test_data_config_validation():
    with pytest.raises(ConfigError, match="task_feature_lengths"):
        DataConfig("demo_ul2", {"inputs": 0, "targets": 8})
    with pytest.raises(ConfigError, match="lacks"):
        DataConfig("demo_ul2", {"inputs": 8})
    with pytest.raises(ConfigError, match="batch_size"):
        DataConfig("demo_ul2", SPAN, host_batch_size=0)
    with pytest.raises(ConfigError, match="feature_converter"):
        DataConfig("demo_ul2", SPAN, feature_converter="dec")
    with pytest.raises(ConfigError, match="split 'test'"):
        make_batch_stream(DataConfig("demo_span_corruption", SPAN, split="test"))
    with pytest.raises(ConfigError, match="shard_index"):
        make_batch_stream(DataConfig("demo_span_corruption", SPAN), shard_index=2,
                          num_shards=2)
    with pytest.raises(UserError, match="unknown task or mixture 'nope'.*demo_ul2"):
        make_batch_stream(DataConfig("nope", SPAN))
    with pytest.raises(ConfigError, match="targets length 32 is too short"):
        make_batch_stream(DataConfig("demo_ul2", SPAN))


def test_data_throughput_benchmark_runs(repo_root):
    import importlib.util
    import os

    path = os.path.join(repo_root, "benchmarks", "data_throughput.py")
    spec = importlib.util.spec_from_file_location("data_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run_case("demo_span_corruption", 64, 16, batch_size=2, batches=3, warmup=1)
    assert result["batches"] == 3 and result["batches_per_s"] > 0 and result["tokens_per_s"] > 0
