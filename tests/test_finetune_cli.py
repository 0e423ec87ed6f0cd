"""Fine-tuning on files through the real `t5lite` command, one fresh process per verb:

- `train` on a TSV task (MIXTURE_OR_TASK_NAME=text2text), then `eval` and `infer
  --task_examples` in new processes given the same gin files and flags find the same task
  (t5lite.commands.task_setup) and report its metrics;
- multi-task fine-tuning from FILE_TASKS (a TSV task and a JSONL task mixed by rates): both
  tasks feed the training stream and are evaluated; bad entries are one `error:` line, exit 2,
  and leave the model dir untouched.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cli_util import cli, dir_digest, error_lines, start
from test_infer import WORDS, make_model_dir, make_vocab, tiny_config

pytestmark = pytest.mark.slow

RUN_FLAGS = ["--gin.MIXTURE_OR_TASK_NAME=text2text", "--gin.METRICS=exact_match,accuracy",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}", "--gin.BATCH_SIZE=8",
             "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=2", "--gin.EVAL_STEPS=1",
             "--gin.CHECKPOINT_PERIOD=2", "--gin.LOG_PERIOD=1"]


@pytest.fixture(scope="module")
def init_from(tmp_path_factory) -> tuple[str, str]:
    """(a tiny "pretrained" model dir whose run_info names its vocabulary, its model gin)."""
    root = tmp_path_factory.mktemp("ft_cli")
    vocab = make_vocab(str(root))
    cfg = tiny_config()
    model_dir = str(root / "pretrained")
    make_model_dir(model_dir, cfg, vocab, inputs_len=24, targets_len=8)
    gin_file = root / "tiny.gin"
    gin_file.write_text("".join(f"ModelConfig.{k} = {getattr(cfg, k)!r}\n" for k in (
        "vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
        "num_decoder_layers")))
    return model_dir, str(gin_file)


def _examples(seed: int, n: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(3, 8)))]
        out.append((" ".join(words), " ".join(words[:2])))
    return out


def _write_tsv(path, examples) -> str:
    path.write_text("".join(f"{i}\t{t}\n" for i, t in examples))
    return str(path)


def _write_jsonl(path, examples) -> str:
    path.write_text("".join(json.dumps({"question": i, "answer": t.split()[-1]}) + "\n"
                            for i, t in examples))
    return str(path)


def _eval_records(model_dir: str) -> list[dict]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if any(k.startswith("decode/") for k in r)]


def test_eval_and_infer_find_the_file_task_in_fresh_processes(tmp_path, init_from):
    init_dir, tiny_gin = init_from
    flags = [f"--gin_file={tiny_gin}", "--gin_file=gin/runs/finetune.gin",
             f"--gin.INIT_FROM={init_dir}", *RUN_FLAGS, "--gin.TASK_PREFIX=first two:",
             f"--gin.TRAIN_FILES={_write_tsv(tmp_path / 'train.tsv', _examples(0, 32))}",
             f"--gin.VALIDATION_FILES={_write_tsv(tmp_path / 'dev.tsv', _examples(1, 6))}"]
    model_dir = str(tmp_path / "ft")
    proc = cli("train", *flags, f"--model_dir={model_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]

    proc = cli("eval", f"--model_dir={model_dir}", *flags)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "eval of step 2 on text2text/validation" in proc.stdout, proc.stdout
    for name in ("decode/exact_match", "decode/accuracy", "decode/num_examples"):
        assert f"  {name} " in proc.stdout, (name, proc.stdout)
    record = [r for r in _eval_records(model_dir) if r.get("source") == "t5lite eval"][-1]
    assert record["task"] == "text2text" and record["decode/num_examples"] == 6.0
    assert 0.0 <= record["decode/accuracy"] <= 100.0

    proc = cli("infer", f"--model_dir={model_dir}", "--task_examples=2", *flags)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 validation examples of text2text decoded by" in proc.stdout, proc.stdout
    first_dev_input = _examples(1, 6)[0][0]
    assert f"[1] input : first two:{first_dev_input}" in proc.stdout.replace(
        "first two: ", "first two:"), proc.stdout
    assert "[2] input : first two:" in proc.stdout.replace("first two: ", "first two:")
    assert proc.stdout.count("    target: ") == 2

    # without the training run's gin flags the file task cannot be rebuilt: one clear error
    before = dir_digest(model_dir)
    proc = cli("eval", f"--model_dir={model_dir}")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "TRAIN_FILES and VALIDATION_FILES (or FILE_TASKS)" in lines[0], lines
    assert dir_digest(model_dir) == before


def test_multi_task_file_mixture_from_gin(tmp_path, init_from):
    init_dir, tiny_gin = init_from
    firsts = {"name": "firsts", "prefix": "first two:", "rate": 2.0,
              "train_files": _write_tsv(tmp_path / "a_train.tsv", _examples(2, 24)),
              "validation_files": _write_tsv(tmp_path / "a_dev.tsv", _examples(3, 4))}
    lasts = {"name": "lasts", "prefix": "last word:", "input_key": "question",
             "target_key": "answer", "metrics": ["accuracy"],
             "train_files": _write_jsonl(tmp_path / "b_train.jsonl", _examples(4, 24)),
             "validation_files": _write_jsonl(tmp_path / "b_dev.jsonl", _examples(5, 5))}
    base = [f"--gin_file={tiny_gin}", "--gin_file=gin/runs/finetune.gin",
            f"--gin.INIT_FROM={init_dir}", *RUN_FLAGS]

    def tasks_flag(*entries) -> str:
        return "--gin.FILE_TASKS=" + json.dumps(list(entries))

    model_dir = str(tmp_path / "multi")
    proc = cli("train", *base, tasks_flag(firsts, lasts), f"--model_dir={model_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = _eval_records(model_dir)[-1]  # the eval at the last step, per task
    assert record["decode/firsts/num_examples"] == 4.0, record
    assert record["decode/lasts/num_examples"] == 5.0, record
    assert "decode/firsts/exact_match" in record and "decode/firsts/accuracy" in record
    assert "decode/lasts/accuracy" in record and "decode/lasts/exact_match" not in record
    with open(os.path.join(model_dir, "run_info.json")) as f:
        assert json.load(f)["task"] == "text2text"

    # the training stream (the same mixture, same gin flags) draws from both tasks
    proc = cli("data", "--task=text2text", "--num=24", "--format=json",
               "--sequence_length=inputs:24,targets:8", *base, tasks_flag(firsts, lasts))
    assert proc.returncode == 0, proc.stderr[-4000:]
    inputs = [json.loads(line)["inputs_pretty"] for line in proc.stdout.splitlines()]
    assert len(inputs) == 24
    n_first = sum(i.startswith("first two:") for i in inputs)
    n_last = sum(i.startswith("last word:") for i in inputs)
    assert n_first > 0 and n_last > 0 and n_first + n_last == 24, inputs

    # bad entries: one error line each, exit 2, the model dir untouched (fresh ones not made)
    missing = dict(lasts, train_files=str(tmp_path / "no_such.jsonl"))
    cases = {
        "unknown_key": ([firsts, dict(lasts, rat=1.0)], "FILE_TASKS[1] ('lasts'): unknown key "
                                                       "'rat'"),
        "rate": ([firsts, dict(lasts, rate=0)], "FILE_TASKS[1] ('lasts'): rate=0 must be a "
                                               "positive number"),
        "duplicate": ([firsts, dict(lasts, name="firsts")], "FILE_TASKS[1] ('firsts'): the task "
                                                           "name 'firsts' is used by "
                                                           "FILE_TASKS[0] too"),
        "missing_file": ([firsts, missing], f"FILE_TASKS task 'lasts': train files: no file "
                                            f"matches '{tmp_path / 'no_such.jsonl'}'"),
        "both": ([firsts], "not both"),
    }
    before = dir_digest(model_dir)
    procs = {}
    for name, (entries, _) in cases.items():
        extra = [f"--gin.TRAIN_FILES={firsts['train_files']}"] if name == "both" else []
        target = model_dir if name != "rate" else str(tmp_path / "fresh")
        procs[name] = start("train", *base, tasks_flag(*entries), *extra,
                            f"--model_dir={target}")
    for name, p in procs.items():
        _, err = p.communicate(timeout=900)
        lines = error_lines(err)
        assert p.returncode == 2, (name, err[-3000:])
        assert len(lines) == 1 and cases[name][1] in lines[0], (name, lines, err[-2000:])
        assert "Traceback" not in err, (name, err[-3000:])
    assert dir_digest(model_dir) == before
    assert not os.path.exists(tmp_path / "fresh")
