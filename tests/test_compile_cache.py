"""`--compilation_cache_dir`: a second process loads the programs the first compiled (train and
infer), computes exactly what a fresh compile computes, and a bad directory is one clear error.
The gs:// form runs against fake-gcs-server in tests/test_gcs_end_to_end.py."""

from __future__ import annotations

import json
import os
import re

import pytest

from cli_util import TINY_GIN, cli, cli_env, dir_digest, error_lines
from t5lite import compile_cache
from t5lite.errors import UserError

# every program is written, however fast its compile, so the second run finds them all
ENV = cli_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _cache_counts(text: str) -> tuple[int, int]:
    """(loaded, compiled) from the last 'compilation cache DIR: N loaded, M compiled' line."""
    found = re.findall(r"compilation cache \S+: (\d+) loaded, (\d+) compiled", text)
    assert found, text[-3000:]
    loaded, compiled = found[-1]
    return int(loaded), int(compiled)


def _train_losses(model_dir) -> list[float]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r.get("split") == "train"]


@pytest.mark.slow
def test_a_second_run_loads_its_programs_and_computes_the_same(tmp_path):
    cache = tmp_path / "xla_cache"
    runs = []
    for name in ("first", "second"):
        r = cli("train", TINY_GIN, "--gin.TRAIN_STEPS=3", "--gin.EVAL_PERIOD=None",
                f"--model_dir={tmp_path / name}", f"--compilation_cache_dir={cache}", env=ENV)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(r.stdout + r.stderr)
    first_step = [re.search(r"first step \(compile \+ run\): [\d.]+ s; (compilation cache .*)",
                            out) for out in runs]
    assert all(first_step), runs[0][-2000:]
    loaded, compiled = _cache_counts(first_step[0].group(1))
    assert loaded == 0 and compiled >= 1                     # nothing there yet: compiled
    loaded, compiled = _cache_counts(first_step[1].group(1))
    assert loaded >= 1 and compiled == 0                     # the train step came from disk
    assert any("step" in name for name in os.listdir(cache))
    assert _cache_counts(runs[1])[1] == 0                    # ... and so did the rest
    # the loaded executable is the compiled one: the same losses, the same final parameters
    assert _train_losses(tmp_path / "first") == _train_losses(tmp_path / "second")

    outs = []
    for _ in range(2):
        r = cli("infer", f"--model_dir={tmp_path / 'first'}", "--input=copy: a b c",
                "--max_decode_len=8", f"--compilation_cache_dir={cache}", env=ENV)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append((r.stdout, _cache_counts(r.stderr)))
    assert outs[0][1][1] >= 1 and outs[1][1] == (outs[0][1][1] + outs[0][1][0], 0)
    assert outs[0][0] == outs[1][0]


def test_a_cache_dir_that_is_a_file_is_one_clear_error(tmp_path):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("keep me")
    model_dir = tmp_path / "run"
    r = cli("train", TINY_GIN, f"--model_dir={model_dir}", f"--compilation_cache_dir={not_a_dir}")
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1
    assert "--compilation_cache_dir" in lines[0] and "not a directory" in lines[0]
    assert not_a_dir.read_text() == "keep me" and dir_digest(str(model_dir)) == {}


def test_enable_and_disable_in_process(tmp_path, monkeypatch):
    import jax

    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.directory() is None and compile_cache.summary() == ""
    try:
        path = compile_cache.enable("~/xla", min_compile_seconds=0)
        assert path == str(tmp_path / "xla") and os.path.isdir(path)
        assert jax.config.jax_compilation_cache_dir == path
        assert compile_cache.summary() == f"compilation cache {path}: 0 loaded, 0 compiled"
        with pytest.raises(UserError, match="min_compile_seconds"):
            compile_cache.enable(path, min_compile_seconds=-1)
    finally:
        compile_cache.disable()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    assert compile_cache.directory() is None and jax.config.jax_compilation_cache_dir is None
