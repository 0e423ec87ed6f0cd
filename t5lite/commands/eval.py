"""`t5lite eval`: teacher-forced evaluation of a model dir's checkpoint.

    t5lite eval --model_dir=runs/demo [--gin_file=gin/runs/eval.gin] [--gin.EVAL_STEPS=50]

The architecture comes from `model_config.json`, the task, vocabulary and feature lengths from
`run_info.json` (override with `EvalConfig.mixture_or_task_name` / `task_feature_lengths`);
gin sets `EvalConfig` and `MeshConfig`. Prints the loss (nats per target token) and token
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
common.use_shared_flags(FLAGS, "gin_file", "module_import", "model_dir",
                        model_dir="the one to evaluate")


def evaluate_model_dir(model_dir: str, eval_config: Any, mesh_config: Any,
                       module_imports: list[str], predict_eval_fn=None) -> dict[str, Any]:
    """Evaluate the checkpoint of `model_dir`; returns the metrics (also appended to
    metrics.jsonl). `predict_eval_fn(model, step) -> {name: value}` adds decoding metrics;
    "auto" builds one from the task's metric_fns (t5lite.inference_eval; none without them)."""
    from t5lite import checkpoint
    from t5lite.data.pipeline import DataConfig
    from t5lite.data.registry import get_task_or_mixture, import_task_modules
    from t5lite.model_dir import read_model_config, read_run_info
    from t5lite.parallel.hosts import data_shard_info, is_primary
    from t5lite.parallel.mesh import make_mesh
    from t5lite.train.config import TrainConfig
    from t5lite.train.data_source import SeqioData
    from t5lite.train.teacher_forced_eval import Evaluator
    from t5lite.train.metrics import MetricsWriter
    from t5lite.train.setup import make_setup

    if not os.path.isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} does not exist; train a model first "
                        "(`t5lite train`).")
    model_config = read_model_config(model_dir)
    run_info = read_run_info(model_dir)
    task = eval_config.mixture_or_task_name or run_info.task
    if not task:
        raise UserError(f"{model_dir} records no task; set "
                        "--gin.EvalConfig.mixture_or_task_name=NAME.")
    lengths = dict(eval_config.task_feature_lengths or run_info.task_feature_lengths)
    import_task_modules(module_imports)
    get_task_or_mixture(task)
    step = eval_config.step if eval_config.step is not None else checkpoint.latest_step(
        model_dir)
    if step is None:
        raise UserError(f"no checkpoint in {model_dir}; train one with `t5lite train`.")
    mesh = make_mesh(mesh_config)
    setup = make_setup(model_config, TrainConfig(train_steps=1, batch_size=eval_config.batch_size,
                                                 partitioning=eval_config.partitioning), mesh)
    params = checkpoint.restore_params(model_dir, setup.abstract_state.params,
                                       setup.state_shardings.params, step)
    data = SeqioData(DataConfig(task, lengths, split=eval_config.split,
                                feature_converter=run_info.feature_converter),
                     eval_split=eval_config.split)
    shard = data_shard_info(setup.batch_sharding, eval_config.batch_size)
    evaluator = Evaluator(setup.eval_step, setup.batch_sharding, eval_config.batch_size,
                          model_config.vocab_size)
    metrics: dict[str, Any] = evaluator(params, data.eval_batches(shard), eval_config.eval_steps)
    if predict_eval_fn == "auto":  # decode the split when the task has metric_fns
        from t5lite.inference_eval import make_predict_eval_fn

        predict_eval_fn = make_predict_eval_fn(
            task, lengths, split=eval_config.split, mesh=mesh, rules=eval_config.partitioning,
            num_examples=(eval_config.eval_steps * eval_config.batch_size
                          if eval_config.eval_steps else None))
    if predict_eval_fn is not None:
        metrics.update(predict_eval_fn(setup.model(params), step))
    metrics.update({"task": task, "eval_split": eval_config.split, "source": "t5lite eval"})
    writer = MetricsWriter(model_dir, enabled=is_primary(), tensorboard=False)
    writer.write(step, "eval", metrics)
    writer.close()
    metrics["step"] = step
    return metrics


def format_report(m: dict[str, Any]) -> str:
    lines = [f"eval of step {m['step']} on {m['task']}/{m['eval_split']} "
             f"({m['eval_batches']} batches, {int(m['target_tokens'])} target tokens):",
             f"  loss      {m['loss']:.4f} nats/token (perplexity {_exp(m['loss']):.1f})",
             f"  accuracy  {m['accuracy']:.4f}"]
    if "unigram_entropy" in m:
        ent = m["unigram_entropy"]
        gap = ent - m["loss"]
        lines.append(f"  unigram entropy of these targets {ent:.4f} nats/token (the loss of a "
                     f"model that ignores context); the model's loss is {abs(gap):.4f} "
                     f"{'below' if gap >= 0 else 'above'} it")
    for key, value in m.items():
        if key not in ("loss", "accuracy", "unigram_entropy", "target_tokens", "eval_batches",
                       "task", "eval_split", "source", "step") and isinstance(value, float):
            lines.append(f"  {key:<9} {value:.4f}")
    return "\n".join(lines)


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 50.0))


def main(gin_bindings: Sequence[str]) -> None:
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required.")
    from t5lite.parallel.hosts import initialize_distributed

    initialize_distributed()
    gin_setup.parse_gin(FLAGS.gin_file, gin_bindings)
    eval_config = gin_setup.build("EvalConfig")
    mesh_config = gin_setup.build("MeshConfig")
    metrics = evaluate_model_dir(FLAGS.model_dir, eval_config, mesh_config, FLAGS.module_import,
                                 predict_eval_fn="auto")
    print(format_report(metrics))


