"""Multi-host with sharded parameters, started like a real job: `t5lite train` in 2 processes x
4 CPU devices (gloo) joined by `initialize_distributed` (flags on one process, T5LITE_*
variables on the other), FSDP over all 8 devices, so each process holds and saves only its own
parameter shards. Then: keep-N retention across hosts, restore onto 1 process x 8 devices and
onto 4 processes x 2 devices with identical parameters, and a 1-process restart of the run,
whose data positions belong to 2 hosts, refused with one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5lite import checkpoint
from t5lite.model_dir import read_model_config
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.config import TrainConfig
from t5lite.train.setup import make_setup

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "train_child.py")
TINY = ["--gin_file=gin/demo.gin", "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=1",
        "--gin.TrainConfig.keep_checkpoints=2", "--gin.EVAL_PERIOD=None",
        "--gin.LOG_PERIOD=1", "--gin.EVAL_STEPS=1", "--gin.ScheduleConfig.warmup_steps=1", "--gin.BATCH_SIZE=8", "--gin.PARTITIONING='fsdp'",
        "--gin.MeshConfig.data=1", "--gin.MeshConfig.fsdp=-1",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
        "--gin.ModelConfig.d_model=32", "--gin.ModelConfig.num_heads=2",
        "--gin.ModelConfig.head_dim=16", "--gin.ModelConfig.d_ff=64",
        "--gin.ModelConfig.num_encoder_layers=1", "--gin.ModelConfig.num_decoder_layers=1"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(repo_root: str, devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([repo_root, os.path.join(repo_root, "tasks")])
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env


def _wait_all(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
    try:
        return [p.communicate(timeout=1800) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, repo_root):
    """`t5lite train` on 2 processes x 4 devices, FSDP, checkpoints every step, keep 2."""
    model_dir = str(tmp_path_factory.mktemp("fsdp") / "run")
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "t5lite.cli", "train", f"--model_dir={model_dir}",
               "--cpu_collectives=gloo"] + TINY
        if i == 0:  # process 0 by flags, process 1 by T5LITE_* variables
            cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    "--process_id=0"]
            env = _env(repo_root, 4)
        else:
            env = _env(repo_root, 4, T5LITE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       T5LITE_NUM_PROCESSES="2", T5LITE_PROCESS_ID="1")
        procs.append(subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = _wait_all(procs)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    return model_dir


def _restore_on_one_process(model_dir: str, mesh_config: MeshConfig) -> dict[str, np.ndarray]:
    setup = make_setup(read_model_config(model_dir),
                       TrainConfig(train_steps=1, batch_size=8, partitioning="fsdp"),
                       make_mesh(mesh_config))
    params = checkpoint.restore_params(model_dir, setup.abstract_state.params,
                                       setup.state_shardings.params)
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.slow
def test_fsdp_over_two_processes_saves_cooperatively_and_keeps_two(fsdp_run):
    ckpts = os.path.join(fsdp_run, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["2", "3"]  # keep-N applied once, across both hosts
    for item in ("params", "train"):  # each process wrote its own shards
        for proc in (0, 1):
            shard_dir = os.path.join(ckpts, "3", item, f"ocdbt.process_{proc}")
            assert os.listdir(os.path.join(shard_dir, "d")), shard_dir
    assert checkpoint.data_state_shards(fsdp_run, 3) == [(0, 2, 4), (1, 2, 4)]


@pytest.mark.slow
def test_fsdp_checkpoint_restores_onto_1x8_and_4x2_identically(fsdp_run, tmp_path, repo_root):
    on_8 = _restore_on_one_process(fsdp_run, MeshConfig(data=1, fsdp=8))
    replicated = _restore_on_one_process(fsdp_run, MeshConfig(data=-1))  # 1 x 8, no fsdp
    assert on_8.keys() == replicated.keys()
    for k in on_8:
        np.testing.assert_array_equal(on_8[k], replicated[k])

    out = str(tmp_path / "4x2.npz")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, CHILD, "restore", fsdp_run, out], cwd=repo_root,
        env=_env(repo_root, 2, T5LITE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 T5LITE_NUM_PROCESSES="4", T5LITE_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = _wait_all(procs)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    results = [json.loads(o.split("RESULT ", 1)[1].splitlines()[0]) for o, _ in outs]
    assert all(r["step"] == 3 and r["sharded_leaves"] > 0 for r in results)
    with np.load(out) as on_4x2:
        assert set(on_4x2.files) == set(on_8)
        for k in on_8:
            np.testing.assert_array_equal(on_4x2[k], on_8[k])


@pytest.mark.slow
def test_restart_of_a_two_host_run_on_one_host_is_refused(fsdp_run, repo_root):
    before = sorted(os.listdir(os.path.join(fsdp_run, "checkpoints")))
    proc = subprocess.run(
        [sys.executable, "-m", "t5lite.cli", "train", f"--model_dir={fsdp_run}",
         "--gin.TRAIN_STEPS=4"] + TINY[:1] + [a for a in TINY[1:] if "TRAIN_STEPS" not in a],
        cwd=repo_root, env=_env(repo_root, 8), capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "2 data shard(s) of 4 rows" in errors[0] and "this run reads 1 of 8 rows" in errors[0]
    assert sorted(os.listdir(os.path.join(fsdp_run, "checkpoints"))) == before
