"""`t5lite infer` end to end (subprocesses: the CLI parses absl flags once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_infer import TEXTS, make_model_dir, make_vocab, tiny_config
from t5lite.inference import Generator


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t5lite.cli", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("cli_model"))
    make_model_dir(d, tiny_config(), make_vocab(d))
    return d


def test_infer_text_and_json_one_line_per_input(model_dir, tmp_path):
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(TEXTS) + "\n")
    out_json = tmp_path / "out.jsonl"
    proc = run_cli("infer", f"--model_dir={model_dir}", f"--input_file={inputs}",
                   "--format=json", f"--output_file={out_json}", "--batch_size=3",
                   "--max_decode_len=6")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [r["input"] for r in rows] == TEXTS
    expected = Generator.from_model_dir(model_dir, batch_size=4).generate(TEXTS, max_decode_len=6)
    assert [r["output_ids"] for r in rows] == [e.ids for e in expected]
    assert [r["output"] for r in rows] == [e.output for e in expected]
    assert all(1 not in r["output_ids"] for r in rows)

    proc = run_cli("infer", f"--model_dir={model_dir}", f"--input={TEXTS[1]}",
                   "--decode=beam", "--beam_size=3", "--num_samples=2", "--max_decode_len=6")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0].split("\t")) == 2


def test_infer_dtype_changes_the_compute_and_composes_with_int8(model_dir):
    """--dtype=bfloat16 runs the float32 model dir in bfloat16 (its beam scores are the
    in-process bfloat16 Generator's, not the float32 ones), alone and with --quantize=int8
    and --cross_kv_dtype=bfloat16; --cross_attention=kv reaches the Generator too."""
    common = [f"--model_dir={model_dir}", f"--input={TEXTS[1]}", "--decode=beam",
              "--beam_size=3", "--num_samples=2", "--max_decode_len=6", "--format=json"]
    cases = {"float32": {}, "float32+kv": {"cross_attention": "kv"},
             "bfloat16": {"dtype": "bfloat16"},
             "bfloat16+int8": {"dtype": "bfloat16", "quantize": "int8",
                               "cross_kv_dtype": "bfloat16"}}
    scores = {}
    for name, opts in cases.items():
        proc = run_cli("infer", *common, *(f"--{k}={v}" for k, v in opts.items()))
        assert proc.returncode == 0, proc.stderr
        row = json.loads(proc.stdout)
        gen = Generator.from_model_dir(model_dir, batch_size=8, **opts)
        assert gen.config.dtype == opts.get("dtype", "float32")
        want = gen.generate([TEXTS[1]], "beam", beam_size=3, num_samples=2,
                            max_decode_len=6)[0]
        assert row["output_ids"] == want.output_ids, name
        np.testing.assert_allclose(row["scores"], want.scores, rtol=1e-5, err_msg=name)
        scores[name] = row["scores"]
    # bfloat16 rounding moves the summed log-probabilities well beyond 1e-5 (a test that the
    # flag reached the model, not just that the run worked)
    for name in ("bfloat16", "bfloat16+int8"):
        assert not np.allclose(scores[name], scores["float32"], rtol=1e-5, atol=0), name
        np.testing.assert_allclose(scores[name], scores["float32"], rtol=0.05)


@pytest.mark.parametrize("case", ["empty_file", "no_checkpoint", "too_long", "no_input",
                                  "bad_dtype"])
def test_infer_bad_input_is_one_clear_error(model_dir, tmp_path, case):
    args = ["infer", f"--model_dir={model_dir}"]
    if case == "empty_file":
        (tmp_path / "empty.txt").write_text("")
        args.append(f"--input_file={tmp_path / 'empty.txt'}")
        want = "is empty"
    elif case == "no_checkpoint":
        d = tmp_path / "nockpt"
        d.mkdir()
        for name in ("model_config.json", "run_info.json"):
            (d / name).write_text(open(os.path.join(model_dir, name)).read())
        args = ["infer", f"--model_dir={d}", "--input=hello"]
        want = "no checkpoint"
    elif case == "bad_dtype":
        args += ["--input=hello", "--dtype=float16"]
        want = "--dtype"
    elif case == "too_long":
        args.append("--input=" + " ".join(["the cat sat on the mat"] * 20))
        want = "--truncate"
    else:
        want = "--input"
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and want in err_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
