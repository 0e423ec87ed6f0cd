"""Bad input is refused before anything is written (issue #13 item 4).

Every case runs the real `t5lite` command against a copy of a trained model dir (or a fresh
path) and checks: exit status 2, exactly one `error:` line naming the problem, no traceback, and
the model dir byte-identical before and after (no run file rewritten, no checkpoint, TensorBoard
or other file created)."""

from __future__ import annotations

import json
import os

import pytest

from cli_util import (TINY_GIN, cli_env, copy_model_dir, dir_digest, error_lines, start)

pytestmark = pytest.mark.slow  # one Python process per case (they run in parallel)


def _bad_run_info(model_dir: str) -> None:
    path = os.path.join(model_dir, "run_info.json")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    info["vocab_file"] = info.pop("vocabulary")  # a misspelt key
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f)


# name -> (extra train args, env, how to spoil the copied dir, expected text of the error line)
TRAIN_CASES = {
    "lengths_too_short": (["--gin.MIXTURE_OR_TASK_NAME=demo_span_corruption",
                           '--gin.TASK_FEATURE_LENGTHS={"inputs": 64, "targets": 4}'], {}, None,
                          "targets length 4 is too short"),
    "optimizer_changed": (["--gin.OptimizerConfig.name=adamw"], {}, None,
                          "written with another optimiser configuration"),
    "architecture_changed": (["--gin.ModelConfig.activation=silu"], {}, None,
                             "another architecture: activation: 'gelu' -> 'silu'"),
    "shape_changed": (["--gin.ModelConfig.d_ff=48"], {}, None,
                      "another architecture: d_ff: 32 -> 48"),
    "converter_mismatch": (["--gin.FEATURE_CONVERTER=prefix_lm"], {}, None,
                           "reads 'enc_dec' batches but DataConfig.feature_converter="
                           "'prefix_lm'"),
    "run_info_keys": ([], {}, _bad_run_info, "unknown keys ['vocab_file'] and missing keys "
                                             "['vocabulary']"),
    "num_processes": ([], {"T5LITE_NUM_PROCESSES": "two"}, None,
                      "$T5LITE_NUM_PROCESSES='two' is not an integer"),
}


def _check(name: str, proc, want: str) -> None:
    out, err = proc.communicate(timeout=900)
    lines = error_lines(err)
    assert proc.returncode == 2, (name, err[-3000:])
    assert len(lines) == 1 and want in lines[0], (name, lines, err[-3000:])
    assert "Traceback" not in err, (name, err[-3000:])


def test_train_refuses_bad_input_before_writing(cli_trained, tmp_path):
    procs, digests = {}, {}
    for name, (args, env, spoil, _) in TRAIN_CASES.items():
        model_dir = copy_model_dir(cli_trained[0], str(tmp_path / name))
        if spoil is not None:
            spoil(model_dir)
        digests[name] = (model_dir, dir_digest(model_dir))
        procs[name] = start("train", TINY_GIN, f"--model_dir={model_dir}", *args,
                            env=cli_env(**env))
    # a fresh model dir with lengths too short: not even created
    fresh = str(tmp_path / "fresh")
    procs["fresh_lengths"] = start("train", TINY_GIN, f"--model_dir={fresh}",
                                   *TRAIN_CASES["lengths_too_short"][0])
    digests["fresh_lengths"] = (fresh, {})
    for name, proc in procs.items():
        want = TRAIN_CASES.get(name, TRAIN_CASES["lengths_too_short"])[3]
        _check(name, proc, want)
        model_dir, before = digests[name]
        assert dir_digest(model_dir) == before, name
    assert not os.path.exists(fresh)


def test_infer_refuses_unusable_input_files(cli_trained, tmp_path):
    model_dir = copy_model_dir(cli_trained[0], str(tmp_path / "run"))
    before = dir_digest(model_dir)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Zürich <extra_id_0> naïve\n".encode("latin-1"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n")
    cases = {"not_utf8": (latin1, "is not UTF-8 text"),
             "blank_lines": (blank, "has only blank lines")}
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.txt"
        locked.write_text("hello\n")
        locked.chmod(0)
        cases["unreadable"] = (locked, "cannot be read")
    out = tmp_path / "out.txt"
    procs = {name: start("infer", f"--model_dir={model_dir}", f"--input_file={path}",
                         f"--output_file={out}")
             for name, (path, _) in cases.items()}
    for name, proc in procs.items():
        _check(name, proc, cases[name][1])
    assert not out.exists()
    assert dir_digest(model_dir) == before
