"""Bad input to `t5lite train`: one `error:` line, exit status 2, no checkpoint touched."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from t5lite import checkpoint
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.config import TrainConfig
from t5lite.train.loop import NonFiniteLossError, train
from t5lite.train.optim import OptimizerConfig
from t5lite.train.schedules import ScheduleConfig
from cli_util import dir_digest
from train_fixtures import SyntheticData, tiny_model_config


def _start(repo_root: str, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen([sys.executable, "-m", "t5lite.cli", "train"] + args, cwd=repo_root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_bad_input_gives_one_error_line(repo_root, tmp_path):
    bad_gin = tmp_path / "bad.gin"
    bad_gin.write_text('include "gin/demo.gin"\nTRAIN_STEPS = (1,\nBATCH_SIZE = 8\n')
    # a dir holding only a checkpoint of another shape (a tiny model; no model_config.json, so
    # the parameter shapes are what is compared: tests/test_validate_first.py covers the
    # model_config.json comparison)
    other = str(tmp_path / "other_shape")
    mc = tiny_model_config()
    from t5lite.models import abstract_model
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(abstract_model(mc), nnx.Param))
    params = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), params)
    checkpoint.save_params(other, params, step=5)
    before = dir_digest(other)

    cases = {
        "gin": ([f"--gin_file={bad_gin}", f"--model_dir={tmp_path / 'a'}"],
                r"bad.gin, line 3"),
        "task": (["--gin_file=gin/demo.gin", "--gin.MIXTURE_OR_TASK_NAME=no_such_task",
                  f"--model_dir={tmp_path / 'b'}"], "unknown task or mixture 'no_such_task'"),
        "mesh": (["--gin_file=gin/demo.gin", "--gin.MeshConfig.data=3",
                  f"--model_dir={tmp_path / 'c'}"], "3 positions but there are 8 devices"),
        "shape": (["--gin_file=gin/demo.gin", f"--model_dir={other}"],
                  "does not fit the model config: parameter"),
    }
    procs = {name: _start(repo_root, args) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, (name, err[-3000:])
        assert len(lines) == 1 and cases[name][1] in lines[0], (name, err[-3000:])
        assert "Traceback" not in err, (name, err[-3000:])
    for sub in ("a", "b", "c"):
        assert not os.path.exists(tmp_path / sub / "checkpoints")
    assert dir_digest(other) == before  # nothing in the other model's dir was touched


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model_dir = str(tmp_path / "nan")

    def config(lr: float, steps: int) -> TrainConfig:
        return TrainConfig(train_steps=steps, batch_size=8, checkpoint_period=1, log_period=5,
                           eval_period=None, async_checkpointing=False,
                           optimizer=OptimizerConfig(name="adamw", schedule=ScheduleConfig(
                               name="constant", base_learning_rate=lr, warmup_steps=0)))

    mc = tiny_model_config(num_encoder_layers=1, num_decoder_layers=1)
    mesh = make_mesh(MeshConfig(data=8))
    train(mc, config(1e-3, 2), mesh, SyntheticData(8, eval_batches=0), model_dir, console=False)
    # step 3's update overflows the parameters (its loss, computed before the update, is still
    # finite): the run stops there and step 3 is never saved
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*last good checkpoint is step 2"):
        train(mc, config(1e30, 20), mesh, SyntheticData(8, eval_batches=0), model_dir,
              console=False)
    assert checkpoint.latest_step(model_dir) == 2
    assert NonFiniteLossError.exit_status == 3


def test_architecture_and_feature_converter_mismatch_is_one_config_error(tmp_path):
    """A decoder-only model fed encoder-decoder batches is refused before anything is built
    or written (it used to fail deep inside tracing)."""
    from t5lite.errors import ConfigError
    from t5lite.model_dir import RunInfo

    model_dir = str(tmp_path / "mismatch")
    tc = TrainConfig(train_steps=2, batch_size=8, eval_period=None)
    mc = tiny_model_config(architecture="decoder_only", num_encoder_layers=0)
    data = SyntheticData(8, eval_batches=0)
    data.feature_converter = "enc_dec"
    with pytest.raises(ConfigError, match=r"architecture='decoder_only' reads 'prefix_lm'.*"
                                          r"feature_converter='enc_dec'"):
        train(mc, tc, make_mesh(MeshConfig(data=8)), data, model_dir, console=False)
    assert not os.path.exists(model_dir)
    # the run_info a model dir would record is checked the same way
    with pytest.raises(ConfigError, match="FEATURE_CONVERTER"):
        train(mc, tc, make_mesh(MeshConfig(data=8)), SyntheticData(8, eval_batches=0),
              model_dir, console=False,
              run_info=RunInfo(task="t", vocabulary="v", task_feature_lengths={},
                               feature_converter="enc_dec"))
    assert not os.path.exists(model_dir)
