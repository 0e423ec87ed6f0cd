"""Teacher-forced evaluation over a finite validation stream: loss and token accuracy.

`loss` here is the plain negative log-likelihood per target token in nats (no label smoothing,
no z-loss), so it can be compared directly with the unigram entropy of the same targets, which
`unigram_entropy` computes from the batches' token counts (the loss of a model that ignores all
context and predicts the token frequencies).

Multi-host: each host reads its own shard of the split, and shards may hold different numbers of
batches. Hosts therefore agree after every batch whether anyone still has data; a host that has
run out feeds an all-padding batch (loss weight 0), so every host runs the same steps.

Example::

    >>> evaluator = Evaluator(setup.eval_step, setup.batch_sharding, batch_size=32)
    >>> evaluator(params, iter(validation_batches), max_steps=None)
    {'loss': 2.91, 'accuracy': 0.47, 'target_tokens': 81234.0, 'eval_batches': 40}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from t5lite.errors import ConfigError, UserError
from t5lite.parallel.hosts import any_host, host_to_global
from t5lite.parallel.rules import RECIPES

HostBatch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of `t5lite eval` (teacher-forced evaluation of a model dir's checkpoint)."""

    batch_size: int = 32  # global
    eval_steps: int | None = None  # batches to evaluate (None: the whole split)
    split: str = "validation"
    step: int | None = None  # checkpoint step (None: the newest)
    mixture_or_task_name: str | None = None  # None: the task in the model dir's run_info.json
    task_feature_lengths: dict[str, int] | None = None  # None: as trained
    partitioning: str = "dp"

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"EvalConfig: batch_size={self.batch_size} must be positive.")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise ConfigError(f"EvalConfig: eval_steps={self.eval_steps} must be positive or "
                              "None.")
        if self.partitioning not in RECIPES:
            raise ConfigError(f"EvalConfig: partitioning={self.partitioning!r} is unknown; use "
                              f"one of {sorted(RECIPES)}.")


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the empirical distribution given by token `counts`."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def add_target_counts(counts: np.ndarray | None, batch: HostBatch, vocab_size: int
                      ) -> np.ndarray:
    """Accumulate the weighted counts of target tokens of `batch`."""
    targets = np.asarray(batch["decoder_target_tokens"]).reshape(-1)
    weights = np.asarray(batch["decoder_loss_weights"]).reshape(-1) > 0
    new = np.bincount(np.clip(targets[weights], 0, vocab_size - 1), minlength=vocab_size)
    return new if counts is None else counts + new


class Evaluator:
    """Runs a jitted `eval_step(params, batch) -> sums` over host-local batches."""

    def __init__(self, eval_step: Callable[[Any, dict], dict], batch_sharding: Sharding,
                 batch_size: int, vocab_size: int | None = None):
        self.eval_step = eval_step
        self.batch_sharding = batch_sharding
        self.batch_size = batch_size  # global
        self.vocab_size = vocab_size
        self.counts: np.ndarray | None = None  # target-token counts of the last full pass

    def __call__(self, params: Any, batches: Iterable[HostBatch],
                 max_steps: int | None = None) -> dict[str, float]:
        it: Iterator[HostBatch] = iter(batches)
        totals = {"nll": 0.0, "correct": 0.0, "weight": 0.0}
        pending: list[dict] = []
        template: HostBatch | None = None
        counts = None
        steps = 0
        while max_steps is None or steps < max_steps:
            batch = next(it, None)
            if not any_host(batch is not None):
                break
            if batch is None:  # this host ran out while others have data: feed padding
                if template is None:
                    raise RuntimeError("eval: a host has no validation batch at all")
                batch = {k: np.zeros_like(v) for k, v in template.items()}
            template = batch
            if self.vocab_size:
                counts = add_target_counts(counts, batch, self.vocab_size)
            global_batch = host_to_global(batch, self.batch_sharding, self.batch_size)
            pending.append(self.eval_step(params, global_batch))
            steps += 1
        for sums in jax.device_get(pending):
            for k in totals:
                totals[k] += float(sums[k])
        if counts is not None:
            self.counts = counts
        weight = max(totals["weight"], 1.0)
        out = {"loss": totals["nll"] / weight, "accuracy": totals["correct"] / weight,
               "target_tokens": totals["weight"], "eval_batches": steps}
        if counts is not None:
            out["unigram_entropy"] = unigram_entropy(counts)
        if totals["weight"] == 0:
            out["loss"] = math.nan
        return out


def evaluate_model_dir(model_dir: str, eval_config: EvalConfig, mesh_config: Any,
                       module_imports: Sequence[str] = (),
                       predict_eval_fn: Any = None, dtype: str | None = None
                       ) -> dict[str, Any]:
    """Evaluate the checkpoint of `model_dir` (what `t5lite eval` runs); returns the metrics,
    also appended to its metrics.jsonl (split "eval").

    The architecture comes from model_config.json, the task, feature lengths and feature
    converter from run_info.json (`eval_config` may override the task and lengths).
    `predict_eval_fn(model, step) -> {name: value}` adds decoding metrics; "auto" builds one
    from the task's metric_fns (`t5lite.inference_eval`; none without them). `dtype`
    ("bfloat16" | "float32"): the compute dtype (default: the model's own; the parameters stay
    as stored); recorded as "dtype" in the metrics when given.

    Example::

        >>> m = evaluate_model_dir("runs/demo", EvalConfig(batch_size=8, eval_steps=2),
        ...                        MeshConfig(), ["t5lite_tasks"])
        >>> m["loss"], m["accuracy"], m["step"]
    """
    from t5lite import checkpoint
    from t5lite.config import check_feature_converter
    from t5lite.data.pipeline import DataConfig
    from t5lite.data.registry import get_task_or_mixture, import_task_modules
    from t5lite.model_dir import read_model_config, read_run_info
    from t5lite.parallel.hosts import data_shard_info, is_primary
    from t5lite.parallel.mesh import make_mesh
    from t5lite.train.data_source import SeqioData
    from t5lite.train.metrics import MetricsWriter
    from t5lite.train.setup import make_eval_setup

    from t5lite import storage

    if not storage.isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} does not exist; train a model first "
                        "(`t5lite train`).")
    from t5lite.inference import with_compute_dtype

    model_config = with_compute_dtype(read_model_config(model_dir), dtype)
    run_info = read_run_info(model_dir)
    task = eval_config.mixture_or_task_name or run_info.task
    if not task:
        raise UserError(f"{model_dir} records no task; set "
                        "--gin.EvalConfig.mixture_or_task_name=NAME.")
    lengths = dict(eval_config.task_feature_lengths or run_info.task_feature_lengths)
    check_feature_converter(model_config.architecture, run_info.feature_converter)
    import_task_modules(list(module_imports))
    get_task_or_mixture(task)
    step = eval_config.step if eval_config.step is not None else checkpoint.latest_step(
        model_dir)
    if step is None:
        raise UserError(f"no checkpoint in {model_dir}; train one with `t5lite train`.")
    mesh = make_mesh(mesh_config)
    setup = make_eval_setup(model_config, mesh, eval_config.partitioning, eval_config.batch_size)
    # without an explicit step: the newest intact checkpoint (broken ones are set aside)
    params, step = checkpoint.restore_params_and_step(
        model_dir, setup.abstract_params, setup.param_shardings, eval_config.step)
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
    if dtype is not None:
        metrics["dtype"] = dtype
    writer = MetricsWriter(model_dir, enabled=is_primary(), tensorboard=False)
    writer.write(step, "eval", metrics)
    writer.close()
    metrics["step"] = step
    return metrics
