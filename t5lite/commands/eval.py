"""`t5lite eval`: teacher-forced evaluation of a model dir's checkpoint.

    t5lite eval --model_dir=runs/demo [--gin_file=gin/runs/eval.gin] [--gin.EVAL_STEPS=50]
    t5lite eval --model_dir=runs/demo --dtype=bfloat16   # bf16 compute, weights as stored

The architecture comes from `model_config.json`, the task, vocabulary and feature lengths from
`run_info.json` (override with `EvalConfig.mixture_or_task_name` / `task_feature_lengths`);
gin sets `EvalConfig` and `MeshConfig`. A model fine-tuned on files (task "text2text") is
evaluated with the training run's gin files and flags, which name the files
(`t5lite.commands.task_setup`). Prints the loss (nats per target token) and token
accuracy next to the unigram entropy of the same targets — the loss of a model that ignores all
context — and appends the result to `metrics.jsonl` (split "eval").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from t5lite.commands import common, gin_setup
from t5lite.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = common.new_flags()
common.use_shared_flags(FLAGS, "gin_file", "module_import", "model_dir", "dtype",
                        "compilation_cache_dir", model_dir="the one to evaluate")


def format_report(m: dict[str, Any]) -> str:
    lines = [f"eval of step {m['step']} on {m['task']}/{m['eval_split']} "
             f"({m['eval_batches']} batches, {int(m['target_tokens'])} target tokens"
             + (f", {m['dtype']} compute" if "dtype" in m else "") + "):",
             f"  loss      {m['loss']:.4f} nats/token (perplexity {_exp(m['loss']):.1f})",
             f"  accuracy  {m['accuracy']:.4f}"]
    if "unigram_entropy" in m:
        ent = m["unigram_entropy"]
        gap = ent - m["loss"]
        lines.append(f"  unigram entropy of these targets {ent:.4f} nats/token (the loss of a "
                     f"model that ignores context); the model's loss is {abs(gap):.4f} "
                     f"{'below' if gap >= 0 else 'above'} it")
    shown = ("loss", "accuracy", "unigram_entropy", "target_tokens", "eval_batches", "task",
             "eval_split", "source", "step", "dtype")
    for key, value in m.items():
        if key not in shown and isinstance(value, float):
            lines.append(f"  {key:<9} {value:.4f}")
    return "\n".join(lines)


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 50.0))


def _prepare_task(model_dir: str, eval_config: Any) -> None:
    """Register the task to evaluate on when it comes from files (text2text: the training
    run's gin files and flags name them), as `t5lite train` did."""
    from t5lite import storage
    from t5lite.commands.task_setup import prepare_task
    from t5lite.model_dir import read_run_info

    if not storage.isdir(model_dir):
        return  # evaluate_model_dir says so
    info = read_run_info(model_dir)
    prepare_task(eval_config.mixture_or_task_name or info.task, FLAGS.module_import,
                 eval_config.task_feature_lengths or info.task_feature_lengths)


def main(gin_bindings: Sequence[str]) -> None:
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required.")
    from t5lite.parallel.hosts import initialize_distributed
    from t5lite.train.teacher_forced_eval import evaluate_model_dir

    initialize_distributed()
    gin_setup.parse_gin(FLAGS.gin_file, gin_bindings)
    eval_config = gin_setup.build("EvalConfig")
    mesh_config = gin_setup.build("MeshConfig")
    _prepare_task(FLAGS.model_dir, eval_config)
    metrics = evaluate_model_dir(FLAGS.model_dir, eval_config, mesh_config, FLAGS.module_import,
                                 predict_eval_fn="auto", dtype=FLAGS.dtype)
    print(format_report(metrics))


