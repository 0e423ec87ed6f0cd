"""Distillation cost on this machine: student step time without KD, with an online teacher and
with offline top-k logits, and the disk size of the offline logits per 1k steps.

    .venv/bin/python benchmarks/distill_online_offline.py [--steps=12] [--top_k=64] \
        [--work=/tmp/t5lite_distill_bench]

The student is the demo model (gin/demo.gin: batch 16 x (128 + 32) tokens); the teacher a
decoder-only prefix-LM with random weights (speed does not depend on them): d_model 512,
8 heads of 64, d_ff 2048, 8 layers, the demo vocabulary. Step times are the `steps_per_sec`
of the last train row of each run (compilation excluded), everything through the `t5lite`
command line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_teacher(path: str) -> None:
    from flax import nnx

    from t5lite import checkpoint
    from t5lite.config import ModelConfig
    from t5lite.model_dir import RunInfo, write_model_config, write_run_info
    from t5lite.models import build_model

    cfg = ModelConfig(architecture="decoder_only", vocab_size=8192, d_model=512, num_heads=8,
                      head_dim=64, d_ff=2048, num_encoder_layers=0, num_decoder_layers=8)
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    checkpoint.save_params(path, nnx.to_pure_dict(nnx.state(model, nnx.Param)), step=0)
    write_model_config(path, cfg)
    write_run_info(path, RunInfo(
        task="demo_span_corruption",
        vocabulary=os.path.join(ROOT, "tasks", "t5lite_tasks", "demo", "data", "demo_8k.model"),
        task_feature_lengths={"inputs": 128, "targets": 32}, feature_converter="prefix_lm"))


def cli(verb: str, args: list[str]) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tasks")])
    r = subprocess.run([sys.executable, "-m", "t5lite.cli", verb] + args, cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"t5lite {verb} failed:\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def last_train_row(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--work", default="/tmp/t5lite_distill_bench")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    teacher = os.path.join(args.work, "teacher")
    if not os.path.isdir(teacher):
        make_teacher(teacher)
    common = ["--gin_file=gin/demo.gin", f"--gin.TRAIN_STEPS={args.steps}",
              "--gin.ScheduleConfig.warmup_steps=0",
              f"--gin.LOG_PERIOD={args.steps}", "--gin.EVAL_STEPS=1", "--gin.EVAL_PERIOD=1000"]
    kd = ["--gin_file=gin/runs/distill.gin", f"--gin.TEACHER_MODEL_DIR={teacher}"]
    stamp = time.strftime("%H%M%S")
    logits = os.path.join(args.work, f"logits_{stamp}")
    out = cli("teacher-logits", common + kd + [f"--output_dir={logits}",
                                               f"--top_k={args.top_k}"])
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(logits) for f in fs
               if f.endswith(".npz"))
    print(out.strip().splitlines()[-1])
    results = {"disk_mb_per_1k_steps": size / args.steps * 1000 / 1e6, "top_k": args.top_k}
    for name, extra in (("plain", []), ("online", kd),
                        ("offline", kd + [f"--gin.TEACHER_LOGITS_DIR={logits}"])):
        model_dir = os.path.join(args.work, f"{name}_{stamp}")
        cli("train", common + extra + [f"--model_dir={model_dir}"])
        row = last_train_row(model_dir)
        results[f"{name}_step_s"] = 1.0 / row["steps_per_sec"]
        print(f"{name:<8} step {1.0 / row['steps_per_sec']:.3f} s  loss {row['loss']:.4f}"
              + (f"  kd_loss {row['kd_loss']:.4f}" if "kd_loss" in row else ""), flush=True)
    results["load_average"] = os.getloadavg()[0]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
