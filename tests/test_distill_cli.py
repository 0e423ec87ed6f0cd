"""`t5lite train` with gin/runs/distill.gin end to end on the demo task (tiny models): an
encoder-decoder teacher, a decoder-only prefix-LM teacher (continued after a restart), the
offline teacher (`t5lite teacher-logits`), and a teacher with another vocabulary refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from t5lite import checkpoint
from t5lite.model_dir import RunInfo, write_model_config, write_run_info
from t5lite.models import build_model
from train_fixtures import tiny_model_config

DEMO_VOCAB = os.path.join("tasks", "t5lite_tasks", "demo", "data", "demo_8k.model")


def _teacher(repo_root, path, vocabulary=None, **changes) -> str:
    cfg = tiny_model_config(vocab_size=8192, **changes)
    model = build_model(cfg, rngs=nnx.Rngs(params=3, dropout=4))
    checkpoint.save_params(path, nnx.to_pure_dict(nnx.state(model, nnx.Param)), step=0)
    write_model_config(path, cfg)
    write_run_info(path, RunInfo(
        task="demo_span_corruption",
        vocabulary=vocabulary or os.path.join(repo_root, DEMO_VOCAB),
        task_feature_lengths={"inputs": 32, "targets": 8}, extra_ids=100,
        feature_converter="prefix_lm" if cfg.architecture == "decoder_only" else "enc_dec"))
    return path


def _cli(repo_root, verb, args):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([repo_root, os.path.join(repo_root, "tasks")])
    return subprocess.run([sys.executable, "-m", "t5lite.cli", verb] + args, cwd=repo_root,
                          env=env, capture_output=True, text=True, timeout=900)


def _student_args(teacher: str, steps: int, model_dir: str, *extra: str) -> list[str]:
    return ["--gin_file=gin/models/t5_1_1/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
            "--gin_file=gin/runs/distill.gin",
            "--gin.MIXTURE_OR_TASK_NAME=demo_span_corruption",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
            f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8", "--gin.EVAL_STEPS=1",
            "--gin.CHECKPOINT_PERIOD=2", "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=100",
            "--gin.ModelConfig.vocab_size=8192", "--gin.ModelConfig.num_encoder_layers=1",
            "--gin.ModelConfig.num_decoder_layers=1", f"--gin.TEACHER_MODEL_DIR={teacher}",
            f"--model_dir={model_dir}", *extra]


def _train_rows(model_dir: str) -> list[dict]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_distill_cli_with_both_teacher_kinds_offline_logits_and_a_refused_vocabulary(
        repo_root, tmp_path):
    encdec = _teacher(repo_root, str(tmp_path / "t_encdec"))
    deconly = _teacher(repo_root, str(tmp_path / "t_deconly"), architecture="decoder_only",
                       num_encoder_layers=0, num_decoder_layers=2)

    out = str(tmp_path / "s_encdec")
    r = _cli(repo_root, "train", _student_args(encdec, 2, out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _train_rows(out)
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["kd_loss"] > 0 and row["teacher_ce"] > 0 and "ce_loss" in row
               for row in rows)

    out = str(tmp_path / "s_deconly")
    r = _cli(repo_root, "train", _student_args(deconly, 2, out))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli(repo_root, "train", _student_args(deconly, 3, out))  # restarted: continues
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from the checkpoint of step 2" in r.stdout + r.stderr
    online = _train_rows(out)
    assert [row["step"] for row in online] == [1, 2, 3]

    logits = str(tmp_path / "logits")
    r = _cli(repo_root, "teacher-logits", _student_args(deconly, 2, "")[:-1]
             + [f"--output_dir={logits}", "--top_k=16"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MB per 1k steps" in r.stdout
    offline_dir = str(tmp_path / "s_offline")
    r = _cli(repo_root, "train", _student_args(deconly, 2, offline_dir,
                                               f"--gin.TEACHER_LOGITS_DIR={logits}"))
    assert r.returncode == 0, r.stderr[-3000:]
    offline = _train_rows(offline_dir)
    # same stream, same teacher: the teacher's cross-entropy is the online one; the KD term
    # is the top-16 renormalised KL (smaller than the full one, still positive)
    assert offline[0]["teacher_ce"] == pytest.approx(online[0]["teacher_ce"], rel=1e-4)
    assert 0 < offline[0]["kd_loss"] < online[0]["kd_loss"]
    # asking for more steps than were written is refused with one line
    r = _cli(repo_root, "train", _student_args(deconly, 4, offline_dir,
                                               f"--gin.TEACHER_LOGITS_DIR={logits}"))
    assert r.returncode == 2 and "cover fewer steps" in r.stderr

    other = _teacher(repo_root, str(tmp_path / "t_other"),
                     vocabulary=os.path.join(repo_root, DEMO_VOCAB.replace(".model", ".vocab")))
    refused = str(tmp_path / "s_refused")
    r = _cli(repo_root, "train", _student_args(other, 1, refused))
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SentencePiece model" in errors[0], r.stderr[-2000:]
    assert not os.path.exists(refused)
