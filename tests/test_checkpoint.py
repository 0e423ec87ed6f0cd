"""Checkpoints: bit-exact resume after kill -9, SIGTERM, resharding restore, params-only,
resume precedence and shape checks."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5lite import checkpoint
from t5lite.errors import UserError
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.config import TrainConfig
from t5lite.train.loop import train
from t5lite.train.setup import load_start, make_setup, plan_start
from t5lite.parallel.hosts import host_to_global
from train_fixtures import N_STEPS, SyntheticData, global_batch, resume_config, tiny_model_config

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "train_child.py")


def _child(mode: str, model_dir: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, CHILD, mode, model_dir], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _params(model_dir: str, step: int) -> list[np.ndarray]:
    tc, mc = resume_config(2 * N_STEPS)
    setup = make_setup(mc, tc, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    params = checkpoint.restore_params(model_dir, setup.abstract_state.params, step=step)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow
def test_resume_after_hard_kill_is_bit_exact(tmp_path):
    killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
    proc = _child("kill9", killed)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert checkpoint.latest_step(killed) == N_STEPS

    tc, mc = resume_config(2 * N_STEPS)
    mesh = make_mesh(MeshConfig(data=-1))
    data = SyntheticData(tc.batch_size, eval_batches=0)
    result = train(mc, tc, mesh, data, killed, console=False)
    assert data.started_at == [N_STEPS]  # the data stream resumed at the checkpointed batch
    assert "resuming from the checkpoint of step 3" in result.start
    assert result.step == 2 * N_STEPS

    train(mc, tc, mesh, SyntheticData(tc.batch_size, eval_batches=0), straight, console=False)
    for a, b in zip(_params(killed, 2 * N_STEPS), _params(straight, 2 * N_STEPS)):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
    model_dir = str(tmp_path / "run")
    proc = _child("sigterm", model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # SIGTERM arrives while batch 3 is read: step 4 finishes, is saved, the process exits
    assert checkpoint.latest_step(model_dir) == 4
    ckpt = checkpoint.TrainCheckpointer(model_dir)
    assert ckpt.restore_meta(4)["data_position"] == 4
    ckpt.close()


@pytest.fixture(scope="module")
def saved_on_8x1(tmp_path_factory):
    """A full train-state checkpoint written on an 8x1 (data) mesh after one train step (so
    its optimiser state is not all zeros)."""
    model_dir = str(tmp_path_factory.mktemp("mesh8x1"))
    mc = tiny_model_config()
    setup = make_setup(mc, TrainConfig(train_steps=5, batch_size=8),
                       make_mesh(MeshConfig(data=8)))
    state, _ = setup.train_step(setup.fresh_state(),
                                host_to_global(global_batch(0, 8), setup.batch_sharding, 8))
    host = jax.device_get(state)
    ckpt = checkpoint.TrainCheckpointer(model_dir)
    ckpt.save(state, data_position=7)
    ckpt.close()
    return model_dir, mc, host


def test_restore_onto_a_2x4_mesh(saved_on_8x1):
    model_dir, mc, host = saved_on_8x1
    setup = make_setup(mc, TrainConfig(train_steps=5, batch_size=8, partitioning="fsdp_tp"),
                       make_mesh(MeshConfig(data=1, fsdp=2, tensor=4)))
    ckpt = checkpoint.TrainCheckpointer(model_dir)
    state, meta = ckpt.restore(1, setup.abstract_state)
    ckpt.close()
    assert meta["data_position"] == 7
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(host)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
    assert any("fsdp" in s and "tensor" in s for s in specs)
    assert state.params["embed"]["embedding"].sharding == setup.state_shardings.params[
        "embed"]["embedding"]


def test_params_only_checkpoint_and_resume_rules(saved_on_8x1, tmp_path):
    model_dir, mc, host = saved_on_8x1
    setup = make_setup(mc, TrainConfig(train_steps=5, batch_size=8),
                       make_mesh(MeshConfig(data=8)))
    # a checkpoint in model_dir wins over init_from, and the reason says so
    plan = plan_start(setup, model_dir, init_from="/somewhere/else")
    assert plan.source == "checkpoint" and "init_from=/somewhere/else is ignored" in plan.reason
    # params-only checkpoint: restorable, and used like init_from (fresh optimiser state)
    params_dir = str(tmp_path / "imported")
    checkpoint.save_params(params_dir, host.params, step=0)
    assert checkpoint.checkpoint_kind(params_dir, 0) == "params"
    restored = checkpoint.restore_params(params_dir, setup.abstract_state.params)
    assert np.array_equal(restored["lm_head"], host.params["lm_head"])
    assert plan_start(setup, params_dir, None).source == "checkpoint_params"
    fresh_dir = str(tmp_path / "fresh")
    plan = plan_start(setup, fresh_dir, init_from=model_dir)  # a full train checkpoint
    assert plan.source == "init_from" and plan.step == 1  # the source checkpoint's step
    ckpt = checkpoint.TrainCheckpointer(fresh_dir)
    state, position = load_start(setup, plan, ckpt)  # parameters only: fresh optimiser, step 0
    ckpt.close()
    assert position == 0 and int(state.step) == 0
    assert np.array_equal(state.params["lm_head"], host.params["lm_head"])
    # the source's optimiser state is not zero (one step taken); the new one is fresh
    assert any(float(np.abs(x).sum()) > 0 for x in jax.tree.leaves(host.opt_state))
    assert all(float(np.abs(x).sum()) == 0 for x in jax.tree.leaves(state.opt_state))
    assert plan_start(setup, fresh_dir, None).source == "scratch"


def test_checkpoint_of_another_shape_is_refused(saved_on_8x1):
    model_dir, _, _ = saved_on_8x1
    other = tiny_model_config(d_ff=96)
    setup = make_setup(other, TrainConfig(train_steps=5, batch_size=8),
                       make_mesh(MeshConfig(data=8)))
    before = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    with pytest.raises(UserError, match=r"parameter decoder/layers/mlp/wi_0 has shape "
                                        r"\(2, 32, 64\) in the checkpoint but \(2, 32, 96\)"):
        plan_start(setup, model_dir, None)
    with pytest.raises(UserError, match="does not fit the model config"):
        checkpoint.restore_params(model_dir, setup.abstract_state.params)
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == before
    with pytest.raises(UserError, match="no checkpoint"):
        checkpoint.restore_params(os.path.join(model_dir, "nothing"),
                                  setup.abstract_state.params)


def test_checkpoint_with_missing_or_extra_parameters_is_refused(saved_on_8x1):
    model_dir, mc, _ = saved_on_8x1

    def abstract(cfg):
        return make_setup(cfg, TrainConfig(train_steps=5, batch_size=8),
                          make_mesh(MeshConfig(data=8))).abstract_state.params

    # tied embeddings: the model has no lm_head, the (untied) checkpoint has one
    with pytest.raises(UserError, match=r"it has parameter lm_head \(32, 64\) that the model "
                                        r"does not have"):
        checkpoint.check_params_compatible(model_dir, abstract(mc.replace(tie_embeddings=True)))
    # the other way round: a tied checkpoint lacks the untied model's lm_head
    tied_dir = os.path.join(os.path.dirname(model_dir), "tied")
    tied = abstract(mc.replace(tie_embeddings=True))
    checkpoint.save_params(tied_dir, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tied))
    with pytest.raises(UserError, match=r"parameter lm_head \(32, 64\) is missing from the "
                                        r"checkpoint"):
        checkpoint.check_params_compatible(tied_dir, abstract(mc))
    assert checkpoint.check_params_compatible(tied_dir, tied) == 0
