"""Two processes x 4 CPU devices (gloo collectives) train exactly like one process x 8."""

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
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.metrics import read_metrics
from t5lite.train.setup import make_setup
from train_fixtures import multihost_config, run_multihost_steps

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_child.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_losses(model_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(model_dir) if r["split"] == "train"]


def _final_params(model_dir: str) -> list[np.ndarray]:
    tc, mc = multihost_config()
    setup = make_setup(mc, tc, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    params = checkpoint.restore_params(model_dir, setup.abstract_state.params)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    port = _free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, CHILD, "multihost", multi, str(i), str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
        assert "RESULT" in out
    results = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out, _ in outs]
    assert results[0] == results[1]  # every host saw the same global metrics

    run_multihost_steps(single)  # 1 process x 8 devices, same global batches
    want, got = _train_losses(single), _train_losses(multi)
    assert len(want) == len(got) == 3
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(_final_params(multi), _final_params(single)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
