"""Broken checkpoints: a kill -9 during an async save, an empty or missing array file,
unreadable metadata. Each is detected, named in a warning, moved aside (never deleted), and the
newest intact step is used by training, `restore_params` (eval) and `load_model` (infer,
export)."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5lite import checkpoint
from t5lite.inference import load_model
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.loop import train
from t5lite.train.setup import make_setup
from train_fixtures import N_STEPS, SyntheticData, resume_config

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_child.py")


def _files(path: str) -> dict[str, int]:
    return {os.path.relpath(os.path.join(r, f), path): os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(path) for f in fs}


def _params(model_dir: str, step: int | None = None, **kw) -> list[np.ndarray]:
    tc, mc = resume_config(2 * N_STEPS)
    setup = make_setup(mc, tc, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    params = checkpoint.restore_params(model_dir, setup.abstract_state.params, step=step, **kw)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _train(model_dir: str, steps: int, period: int = N_STEPS):
    tc, mc = resume_config(steps)
    tc = dataclasses.replace(tc, checkpoint_period=period)
    return train(mc, tc, make_mesh(MeshConfig(data=-1)),
                 SyntheticData(tc.batch_size, eval_batches=0), model_dir, console=False)


def _assert_all_equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_kill_during_async_save_then_resume_matches_an_uninterrupted_run(tmp_path, caplog):
    killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, CHILD, "killsave", killed], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = os.path.join(killed, "checkpoints")
    unfinished = [n for n in os.listdir(ckpts) if n.startswith(f"{2 * N_STEPS}.orbax")]
    assert len(unfinished) == 1 and checkpoint.latest_step(killed) == N_STEPS
    contents = _files(os.path.join(ckpts, unfinished[0]))

    with caplog.at_level(logging.WARNING, logger="t5lite"):
        result = _train(killed, 2 * N_STEPS)
    assert f"resuming from the checkpoint of step {N_STEPS}" in result.start
    warned = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(warned) == 1 and f"step {2 * N_STEPS} " in warned[0]
    assert "unfinished save" in warned[0]
    moved = os.path.join(killed, "checkpoints_broken", unfinished[0])
    assert _files(moved) == contents  # moved aside whole, nothing deleted

    _train(straight, 2 * N_STEPS)
    _assert_all_equal(_params(killed, 2 * N_STEPS), _params(straight, 2 * N_STEPS))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run with checkpoints at steps 1 and 2, and the parameters of step 1."""
    model_dir = str(tmp_path_factory.mktemp("two") / "run")
    _train(model_dir, 2, period=1)
    return model_dir, _params(model_dir, 1)


def _largest_data_file(step_dir: str) -> str:
    """The biggest data file of the params item (where Orbax's OCDBT keeps the array bytes)."""
    files = glob.glob(f"{step_dir}/params/d/*") + glob.glob(f"{step_dir}/params/ocdbt.*/d/*")
    return max(files, key=os.path.getsize)


def _empty_file(step_dir):
    open(_largest_data_file(step_dir), "wb").close()
    return "is empty (0 bytes)"


def _missing_array_file(step_dir):
    os.remove(_largest_data_file(step_dir))
    return "its arrays cannot be read"


def _unreadable_step_metadata(step_dir):
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "wb") as f:
        f.write(b"\x00\xff{not json")
    return "_CHECKPOINT_METADATA file is unreadable"


def _unreadable_item_metadata(step_dir):
    with open(os.path.join(step_dir, "train", "_METADATA"), "w") as f:
        f.write('{"tree_metadata": ')
    return "train/_METADATA file is unreadable"


FAULTS = [_empty_file, _missing_array_file, _unreadable_step_metadata,
          _unreadable_item_metadata]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__.strip("_"))
def test_broken_latest_checkpoint_is_set_aside_and_the_previous_one_used(
        two_steps, tmp_path, caplog, fault):
    source, step1 = two_steps
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    step_dir = os.path.join(model_dir, "checkpoints", "2")
    reason = fault(step_dir)
    contents = _files(step_dir)

    # eval / infer / export read through restore_params / load_model: they skip and set aside
    with caplog.at_level(logging.WARNING, logger="t5lite"):
        _assert_all_equal(_params(model_dir), step1)
    warned = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(warned) == 1 and "step 2 " in warned[0] and reason in warned[0], warned
    moved = os.path.join(model_dir, "checkpoints_broken", "2")
    assert not os.path.exists(step_dir) and _files(moved) == contents
    assert os.path.exists(moved + ".why.txt")

    # training continues from step 1 (the broken step is gone from the checkpoints dir)
    result = _train(model_dir, 3, period=1)
    assert "resuming from the checkpoint of step 1" in result.start and result.step == 3


def test_load_model_skips_a_broken_latest_step(two_steps, tmp_path, caplog):
    source, _ = two_steps
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    _missing_array_file(os.path.join(model_dir, "checkpoints", "2"))
    with caplog.at_level(logging.WARNING, logger="t5lite"):
        _, step = load_model(model_dir)
    assert step == 1
    assert any("step 2 " in r.getMessage() for r in caplog.records)
    assert os.path.isdir(os.path.join(model_dir, "checkpoints_broken", "2"))


def test_training_sets_aside_a_step_whose_arrays_cannot_be_read(two_steps, tmp_path, caplog):
    source, _ = two_steps
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    _missing_array_file(os.path.join(model_dir, "checkpoints", "2"))
    with caplog.at_level(logging.WARNING, logger="t5lite"):
        result = _train(model_dir, 3, period=1)
    assert "resuming from the checkpoint of step 1" in result.start and result.step == 3
    assert any("step 2 " in r.getMessage() and "cannot be read" in r.getMessage()
               for r in caplog.records)
    assert os.path.isdir(os.path.join(model_dir, "checkpoints_broken", "2"))


def test_an_explicit_broken_step_is_an_error_naming_it(two_steps, tmp_path):
    source, _ = two_steps
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    _missing_array_file(os.path.join(model_dir, "checkpoints", "2"))
    with pytest.raises(checkpoint.BrokenCheckpointError, match=r"checkpoints/2 is broken: its "
                                                               r"arrays cannot be read"):
        _params(model_dir, 2)
    assert os.path.isdir(os.path.join(model_dir, "checkpoints", "2"))  # left where it was
