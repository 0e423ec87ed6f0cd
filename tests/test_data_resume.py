"""O(1) exact data resume: the input stream's saved state continues bit-exactly without replay,
through the training loop too; a restart that splits the data differently is refused."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import t5lite_tasks.demo  # noqa: F401  (registers the demo tasks)
from t5lite import checkpoint
from t5lite.data import pipeline
from t5lite.data.pipeline import DataConfig, make_batch_stream
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.data_source import SeqioData
from t5lite.train.loop import train
from train_fixtures import resume_config

LENGTHS = {"inputs": 64, "targets": 16}


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("shard_index,num_shards", [(0, 1), (1, 2)])
def test_saved_stream_state_continues_exactly_without_replay(monkeypatch, shard_index,
                                                             num_shards):
    config = DataConfig("demo_span_corruption", LENGTHS, host_batch_size=4, seed=3)
    stream = make_batch_stream(config, shard_index=shard_index, num_shards=num_shards)
    for _ in range(5):
        next(stream)
    state = stream.save_state()
    assert state and all(isinstance(v, bytes) and v for v in state.values())
    want = [next(stream) for _ in range(3)]

    built = []
    original = pipeline.build_dataset

    def spy(*args, **kwargs):
        built.append(kwargs.get("start_batch"))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_dataset", spy)
    resumed = make_batch_stream(config, shard_index=shard_index, num_shards=num_shards,
                                start_batch=5, state=state)
    assert built == [0]  # rebuilt from the start and restored: nothing skipped or replayed
    assert resumed.batches_consumed == 5
    assert _equal([next(resumed) for _ in range(3)], want)


class SpyData(SeqioData):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int]] = []

    def train_batches(self, shard, start_batch):
        self.calls.append(("replay", start_batch))
        return super().train_batches(shard, start_batch)

    def resume_train_batches(self, shard, position, state):
        self.calls.append(("restore", position))
        return super().resume_train_batches(shard, position, state)


def _demo_run(steps: int):
    tc, mc = resume_config(steps)
    mc = mc.replace(vocab_size=8192)
    return tc, mc, DataConfig("demo_span_corruption", LENGTHS, host_batch_size=8, seed=5)


def _final_params(model_dir: str, steps: int) -> list[np.ndarray]:
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    tc, mc, _ = _demo_run(steps)
    from t5lite.train.setup import make_setup

    setup = make_setup(mc, tc, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    params = checkpoint.restore_params(ckpt_dir, setup.abstract_state.params, step=steps)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_training_resumes_the_seqio_stream_from_its_saved_state(tmp_path):
    """Train 3 steps (checkpoint at 3), restart to 6: the stream is restored, not replayed, and
    the parameters equal those of a straight 6-step run."""
    mesh = make_mesh(MeshConfig(data=-1))
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    tc, mc, dc = _demo_run(6)
    train(mc, tc, mesh, SeqioData(dc, eval_split=None), straight, console=False)

    tc3, _, _ = _demo_run(3)
    first = SpyData(dc, eval_split=None)
    train(mc, tc3, mesh, first, resumed, console=False)
    assert first.calls == [("replay", 0)]
    assert checkpoint.data_state_shards(resumed, 3) == [(0, 1, 8)]
    second = SpyData(dc, eval_split=None)
    result = train(mc, tc, mesh, second, resumed, console=False)
    assert result.step == 6 and second.calls == [("restore", 3)]
    for a, b in zip(_final_params(resumed, 6), _final_params(straight, 6)):
        np.testing.assert_array_equal(a, b)


def test_restart_on_another_split_of_the_data_is_refused_before_writing(tmp_path):
    model_dir = str(tmp_path / "run")
    tc, mc, dc = _demo_run(3)
    mesh = make_mesh(MeshConfig(data=-1))
    from t5lite.train.setup import make_setup

    setup = make_setup(mc, tc, mesh)
    ckpt = checkpoint.TrainCheckpointer(model_dir)
    state = setup.fresh_state()
    ckpt.save(state, 2, checkpoint.DataState(1, 2, 4, 2, {"ckpt.index": b"x"}))
    ckpt.close()
    before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(model_dir)
              for p in fs}
    with pytest.raises(checkpoint.DataStateMismatch) as err:
        train(mc, tc, mesh, SeqioData(dc, eval_split=None), model_dir, console=False)
    message = str(err.value)
    assert "\n" not in message
    assert "2 data shard(s) of 4 rows" in message and "this run reads 1 of 8 rows" in message
    after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(model_dir)
             for p in fs}
    assert after == before  # refused before anything was written
