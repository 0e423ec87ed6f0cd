"""Test set-up: 8 simulated CPU devices for every test process (set before JAX is imported)."""

from __future__ import annotations

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow: never look for a GPU in tests

import pytest  # noqa: E402

import t5lite  # noqa: E402,F401  (with libtpu installed: keeps JAX off the absent TPU runtime)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def cli_trained(tmp_path_factory):
    """A model dir written by the real `t5lite train` on the demo_copy SeqIO task
    (tests/gin/cli_tiny.gin: 6 steps, a checkpoint every step, keep 2, eval with decoding at
    steps 3 and 6). Tests copy it before changing anything. Returns (model_dir, process)."""
    from cli_util import TINY_GIN, cli

    model_dir = str(tmp_path_factory.mktemp("cli_trained") / "run")
    proc = cli("train", TINY_GIN, f"--model_dir={model_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return model_dir, proc
