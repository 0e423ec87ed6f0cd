"""Helpers of the tests that run the real `t5lite` command in subprocesses.

    proc = cli("train", "--gin_file=tests/gin/cli_tiny.gin", f"--model_dir={d}")
    before = dir_digest(d); ...; assert dir_digest(d) == before   # byte-identical model dir
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
TINY_GIN = "--gin_file=tests/gin/cli_tiny.gin"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout first on PYTHONPATH (so the tests'
    `slow_save_hook` module and `t5lite_tasks` import), 8 CPU devices, no GPU."""
    env = dict(os.environ)
    paths = [ROOT, os.path.join(ROOT, "tasks"), TESTS]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.update(extra)
    return env


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`t5lite ARGS...` started in the checkout root, stdout and stderr piped (text)."""
    return subprocess.Popen([sys.executable, "-m", "t5lite.cli", *args], cwd=ROOT,
                            env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `t5lite ARGS...` to the end."""
    return subprocess.run([sys.executable, "-m", "t5lite.cli", *args], cwd=ROOT,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def dir_digest(path: str) -> dict[str, str]:
    """{relative path: sha256 of the bytes (or "<dir>")} of everything under `path` (and
    {} when it does not exist): equal digests mean nothing was created, removed or changed."""
    out: dict[str, str] = {}
    if not os.path.exists(path):
        return out
    for root, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), path)] = "<dir>"
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def copy_model_dir(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def checkpoint_steps(model_dir: str) -> list[int]:
    """The committed checkpoint steps (numeric directory names) in `model_dir/checkpoints`."""
    d = os.path.join(model_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())
