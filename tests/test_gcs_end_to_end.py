"""A whole run in a bucket, against fake-gcs-server on 127.0.0.1:

`t5lite train --model_dir=gs://bucket/run --compilation_cache_dir=gs://bucket/xla_cache` ->
kill -9 once a checkpoint is committed -> the same command resumes, loading its train step from
the bucket's compilation cache -> the final parameters equal an uninterrupted run's bit for bit
-> `t5lite eval` -> `t5lite infer --input_file=gs://... --output_file=gs://...` -> `t5lite export
--output=gs://...` -> fine-tuning from the bucket (INIT_FROM) distilled from a teacher in the
bucket -> offline teacher logits written to and read from the bucket. Every child process gets
only STORAGE_EMULATOR_HOST, and nothing may land on the local disk.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from gcs_emulator import GcsEmulator
from t5lite import storage

STEPS = 24
TRAIN_FLAGS = [
    "--gin_file=gin/demo.gin", f"--gin.TRAIN_STEPS={STEPS}", "--gin.BATCH_SIZE=8",
    "--gin.CHECKPOINT_PERIOD=4", "--gin.LOG_PERIOD=2", "--gin.EVAL_PERIOD=None",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.EVAL_STEPS=1",
    "--gin.ModelConfig.d_model=32", "--gin.ModelConfig.num_heads=2",
    "--gin.ModelConfig.head_dim=16", "--gin.ModelConfig.d_ff=64",
    "--gin.ModelConfig.num_encoder_layers=1", "--gin.ModelConfig.num_decoder_layers=1",
]


@pytest.fixture(scope="module")
def gcs():
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    with GcsEmulator() as emulator:
        emulator.create_bucket("bucket")
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url   # for this process's checks
        storage.configure()
        storage._fs.cache_clear()
        try:
            yield emulator
        finally:
            if saved is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = saved
            storage._fs.cache_clear()


def _env(gcs) -> dict[str, str]:
    env = gcs.env()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny step goes in the cache
    return env


def _cli(gcs, repo_root, *args, check=True, **kw):
    env = _env(gcs)
    r = subprocess.run([sys.executable, "-m", "t5lite.cli", *args], cwd=repo_root, env=env,
                       capture_output=True, text=True, timeout=900, **kw)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _committed_steps(run: str) -> list[int]:
    return sorted(int(p.rsplit("/", 2)[-2]) for p in
                  storage.glob(f"{run}/checkpoints/*/commit_success.txt"))


@pytest.mark.slow
def test_train_kill_resume_eval_infer_export_in_a_bucket(gcs, repo_root):
    run, straight = "gs://bucket/run", "gs://bucket/straight"
    local_gs = os.path.join(repo_root, "gs:")  # where a gs:// path given to `os` would land
    assert not os.path.exists(local_gs), "remove the stray local directory gs: first"
    cache = "--compilation_cache_dir=gs://bucket/xla_cache"
    proc = subprocess.Popen([sys.executable, "-m", "t5lite.cli", "train", *TRAIN_FLAGS,
                             f"--model_dir={run}", cache], cwd=repo_root, env=_env(gcs),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not _committed_steps(run):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)                  # a hard crash mid-run
    proc.wait()
    killed_at = _committed_steps(run)
    assert killed_at and killed_at[-1] < STEPS, "the run ended before it could be killed"

    resumed = _cli(gcs, repo_root, "train", *TRAIN_FLAGS, f"--model_dir={run}", cache)
    assert f"resum" in resumed.stderr + resumed.stdout
    # the input position was saved in the bucket and the restart continued from it, no replay
    assert storage.glob(f"{run}/checkpoints/*/data/shard-0-of-1.p0.json")
    assert "restored the input stream at batch" in resumed.stderr, resumed.stderr[-3000:]
    # the restart loaded the train step the killed process compiled into the bucket
    loaded = re.search(r"first step \(compile \+ run\).*xla_cache: (\d+) loaded, (\d+) compiled",
                       resumed.stdout + resumed.stderr)
    assert loaded and int(loaded.group(1)) >= 1 and loaded.group(2) == "0", resumed.stderr[-2000:]
    assert storage.glob("gs://bucket/xla_cache/*step*")
    assert _committed_steps(run)[-1] == STEPS
    _cli(gcs, repo_root, "train", *TRAIN_FLAGS, f"--model_dir={straight}")

    # model-dir files and metrics (segment objects) in the bucket
    names = storage.listdir(run)
    assert {"model_config.json", "run_info.json", "operative_config.gin", "model-info.txt",
            "checkpoints", "tensorboard"} <= set(names)
    assert any(n.startswith("metrics.jsonl.") for n in names)
    steps = [r["step"] for r in map(json.loads, storage.read_lines(f"{run}/metrics.jsonl"))
             if r["split"] == "train"]
    assert steps[-1] == STEPS and set(range(2, STEPS + 1, 2)) <= set(steps)
    assert storage.glob(f"{run}/tensorboard/*tfevents*")
    assert not [p for p in storage.glob(f"{run}/**") if ".tmp" in p]

    ev = _cli(gcs, repo_root, "eval", *TRAIN_FLAGS, f"--model_dir={run}")
    assert "loss" in ev.stdout + ev.stderr

    storage.write_atomic("gs://bucket/prompts.txt", "The <extra_id_0> exits a loop.\nA b c\n")
    _cli(gcs, repo_root, "infer", f"--model_dir={run}", "--input_file=gs://bucket/prompts.txt",
         "--output_file=gs://bucket/out/predictions.txt", "--max_decode_len=4")
    assert len(storage.read_text("gs://bucket/out/predictions.txt").splitlines()) == 2

    # bit-exact resume: the exported weights of the killed+resumed and the straight run
    _cli(gcs, repo_root, "export", f"--model_dir={run}", "--output=gs://bucket/export/run")
    _cli(gcs, repo_root, "export", f"--model_dir={straight}",
         "--output=gs://bucket/export/straight")
    assert set(storage.listdir("gs://bucket/export/run")) >= {"config.json",
                                                             "model.safetensors"}
    assert (storage.read_bytes("gs://bucket/export/run/model.safetensors")
            == storage.read_bytes("gs://bucket/export/straight/model.safetensors"))
    again = _cli(gcs, repo_root, "export", f"--model_dir={run}",
                 "--output=gs://bucket/export/run", check=False)
    assert again.returncode == 2 and "already holds a model" in again.stderr

    # a restart with another architecture is refused before anything is written
    changed = _cli(gcs, repo_root, "train", *TRAIN_FLAGS, "--gin.ModelConfig.d_ff=128",
                   f"--model_dir={run}", check=False)
    assert changed.returncode == 2 and "holds a checkpoint of another architecture" in \
        changed.stderr, changed.stderr[-2000:]
    assert _committed_steps(run)[-1] == STEPS

    # int8 weights: quantized from the bucket into the bucket, then decoded from there
    _cli(gcs, repo_root, "quantize", f"--model_dir={run}", "--output=gs://bucket/int8")
    assert storage.exists("gs://bucket/int8/quantization.json")
    quantized = _cli(gcs, repo_root, "infer", "--model_dir=gs://bucket/int8", "--input=A b c",
                     "--max_decode_len=4", "--format=json")
    assert json.loads(quantized.stdout.strip().splitlines()[-1])["output"] is not None

    # fine-tuning from a model dir in the bucket, distilled from a teacher in the bucket
    tuned = _cli(gcs, repo_root, "train", *TRAIN_FLAGS, "--gin_file=gin/runs/distill.gin",
                 "--gin.TRAIN_STEPS=2", "--gin.ScheduleConfig.warmup_steps=0",
                 "--model_dir=gs://bucket/tuned", f"--gin.INIT_FROM='{run}'",
                 f"--gin.TEACHER_MODEL_DIR='{straight}'")
    out = tuned.stdout + tuned.stderr
    assert f"taking the parameters of step {STEPS} from init_from={run}" in out, out[-3000:]
    logged = [r for r in map(json.loads, storage.read_lines("gs://bucket/tuned/metrics.jsonl"))
              if r["split"] == "train"]
    assert logged and logged[-1]["kd_loss"] > 0 and logged[-1]["teacher_ce"] > 0, logged

    # an offline teacher: its top-k logits written to the bucket, then read back in training
    distill = [*TRAIN_FLAGS, "--gin_file=gin/runs/distill.gin", "--gin.TRAIN_STEPS=2",
               "--gin.ScheduleConfig.warmup_steps=0", f"--gin.TEACHER_MODEL_DIR='{straight}'"]
    wrote = _cli(gcs, repo_root, "teacher-logits", *distill, "--top_k=8",
                 "--output_dir=gs://bucket/logits")
    assert "MB per 1k steps" in wrote.stdout, wrote.stdout + wrote.stderr[-2000:]
    assert storage.exists("gs://bucket/logits/meta.json")
    assert len(storage.glob("gs://bucket/logits/shard-*/step-*.npz")) == 2
    _cli(gcs, repo_root, "train", *distill, "--model_dir=gs://bucket/offline",
         "--gin.TEACHER_LOGITS_DIR='gs://bucket/logits'")
    offline = [r for r in map(json.loads, storage.read_lines("gs://bucket/offline/metrics.jsonl"))
               if r["split"] == "train"]
    assert offline and offline[-1]["kd_loss"] > 0 and offline[-1]["teacher_ce"] > 0, offline
    assert not os.path.exists(local_gs), "a gs:// path was written to the local disk"
