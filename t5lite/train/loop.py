"""The training loop: steps, metrics, periodic eval, checkpoints, preemption, NaN guard.

    result = train(model_config, train_config, mesh, data, model_dir,
                   run_info=..., operative_config=gin_text, predict_eval_fn=None)

- Train until `train_config.train_steps`; a run restarted on the same `model_dir` continues from
  its newest checkpoint (see `t5lite.train.setup.plan_start` for the rules, logged at start).
- Every `log_period` steps (and at the last step) the averaged train metrics go to
  `metrics.jsonl` / TensorBoard with `tokens_per_sec` (encoder + decoder positions of the global
  batch per second, padding included) and, where the device peak is known, `mfu`.
- Every `eval_period` steps (and at the end) a teacher-forced eval on the validation split;
  then `predict_eval_fn(model, step) -> {name: value}` if given (e.g. decoding + the task's
  metric functions), logged in the same "eval" record.
- Every `checkpoint_period` steps and at the end an asynchronous checkpoint.
- SIGTERM / SIGINT: save the current step, wait for the write, return with `preempted=True`
  (the command exits 0, and the next start continues from there).
- A non-finite loss stops the run with `NonFiniteLossError` naming the step; the bad state is
  never saved, the newest checkpoint stays the last good one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from t5lite import checkpoint, model_dir as md
from t5lite.config import ModelConfig
from t5lite.inference_eval import PredictEvalFn
from t5lite.errors import UserError
from t5lite.parallel.hosts import (DataShard, any_host, data_shard_info, host_to_global,
                                   is_primary, sync_hosts)
from t5lite.train.config import TrainConfig
from t5lite.train.teacher_forced_eval import Evaluator
from t5lite.train.flops import device_peak_flops, train_flops_per_step
from t5lite.train.metrics import MetricsWriter, ProgressBar, format_duration
from t5lite.train.setup import TrainSetup, load_start, make_setup, plan_start

log = logging.getLogger("t5lite.train")

HostBatch = dict[str, np.ndarray]


class DataSource(Protocol):
    """Where a run's batches come from (host-local numpy dicts of [rows, length] int32)."""

    def train_batches(self, shard: DataShard, start_batch: int) -> Iterator[HostBatch]:
        """Infinite iterator of this host's training batches, starting at batch `start_batch`."""

    def eval_batches(self, shard: DataShard) -> Iterable[HostBatch] | None:
        """A fresh finite pass over this host's validation batches (None: no eval data)."""


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    step: int
    preempted: bool
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    wall_seconds: float
    start: str  # how the run started (the StartPlan reason)


class _StopFlag:
    """Set by SIGTERM / SIGINT; installed only while the loop runs (main thread only).
    The loop saves and stops at the next step boundary; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def write_model_dir_files(model_dir: str, setup: TrainSetup, run_info: md.RunInfo | None,
                          operative_config: str | None) -> None:
    """model_config.json, run_info.json, operative_config.gin, model-info.txt (primary host)."""
    from t5lite.models import model_info

    md.write_model_config(model_dir, setup.model_config)
    if run_info is not None:
        md.write_run_info(model_dir, run_info)
    if operative_config is not None:
        with open(os.path.join(model_dir, md.OPERATIVE_GIN_FILE), "w", encoding="utf-8") as f:
            f.write(operative_config)
    mesh_line = ("mesh: " + ", ".join(f"{k}={v}" for k, v in setup.mesh.shape.items())
                 + f" on {setup.mesh.size} {jax.devices()[0].platform} devices "
                 f"({jax.process_count()} process(es)); partitioning="
                 f"{setup.train_config.partitioning}")
    text = model_info(setup.model_config, setup.mesh, setup.rules)
    with open(os.path.join(model_dir, md.MODEL_INFO_FILE), "w", encoding="utf-8") as f:
        f.write(mesh_line + "\n\n" + text + "\n")


def _tokens_per_batch(batch: HostBatch, global_rows: int) -> tuple[int, int, int]:
    """(positions per global batch, input length, target length)."""
    target_len = batch["decoder_target_tokens"].shape[1]
    input_len = batch["encoder_input_tokens"].shape[1] if "encoder_input_tokens" in batch else 0
    return global_rows * (input_len + target_len), input_len, target_len


def _mean_metrics(window: list[dict[str, np.ndarray]]) -> dict[str, float]:
    keys = [k for k in window[0] if k not in ("finite",)]
    out = {k: float(np.mean([float(m[k]) for m in window])) for k in keys}
    out["target_tokens"] = float(np.sum([float(m["target_tokens"]) for m in window]))
    return out


def train(model_config: ModelConfig, train_config: TrainConfig, mesh: Mesh, data: DataSource,
          model_dir: str, *, run_info: md.RunInfo | None = None,
          operative_config: str | None = None, predict_eval_fn: PredictEvalFn | None = None,
          console: bool = True) -> TrainResult:
    """Train (or continue training) into `model_dir`. See the module docstring."""
    t_start = time.time()
    primary = is_primary()
    tc = train_config
    setup = make_setup(model_config, tc, mesh)
    # Every host must take the same decision from the same file-system state: the barriers keep
    # the primary host from creating model_dir/checkpoints while another host is still looking.
    sync_hosts("t5lite:train:before_plan")
    plan = plan_start(setup, model_dir, tc.init_from)  # validates before anything is written
    sync_hosts("t5lite:train:after_plan")
    if primary:
        os.makedirs(model_dir, exist_ok=True)
        write_model_dir_files(model_dir, setup, run_info, operative_config)
    ckpt = checkpoint.TrainCheckpointer(model_dir, keep=tc.keep_checkpoints,
                                        async_save=tc.async_checkpointing)
    writer = MetricsWriter(model_dir, enabled=primary)
    bar = ProgressBar(tc.train_steps, enabled=primary and console)
    try:
        bar.message(f"t5lite train: {plan.reason}")
        log.info("start: %s", plan.reason)
        state, data_position = load_start(setup, plan, ckpt)
        return _run(setup, state, data_position, plan, data, model_dir, ckpt, writer, bar,
                    predict_eval_fn, t_start)
    finally:
        ckpt.close()
        writer.close()
        bar.close()


def _run(setup: TrainSetup, state, data_position: int, plan, data: DataSource, model_dir: str,
         ckpt: checkpoint.TrainCheckpointer, writer: MetricsWriter, bar: ProgressBar,
         predict_eval_fn: PredictEvalFn | None, t_start: float) -> TrainResult:
    tc = setup.train_config
    shard = data_shard_info(setup.batch_sharding, tc.batch_size)
    step = int(jax.device_get(state.step))
    bar.start = step
    last_saved = step if plan.source == "checkpoint" else None
    evaluator = Evaluator(setup.eval_step, setup.batch_sharding, tc.batch_size,
                          setup.model_config.vocab_size)
    eval_cache: list[HostBatch] | None = None
    peak = device_peak_flops()
    flops_per_step: float | None = None
    tokens_per_step = 0
    window: list[dict] = []
    window_steps: list[int] = []
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    last_loss: float | None = None
    t_window = time.time()
    timed_steps = 0
    paused = 0.0  # seconds of eval / checkpointing inside the current timing window
    start_step = step
    train_iter = data.train_batches(shard, data_position) if step < tc.train_steps else None

    def check_window() -> None:
        """Fetch pending step metrics; stop on a non-finite loss."""
        nonlocal window, window_steps, train_metrics, last_loss
        if not window:
            return
        fetched = jax.device_get(window)
        for s, m in zip(window_steps, fetched):
            if not bool(m["finite"]):
                ckpt.wait()
                good = ckpt.latest_step()
                where = (f"the last good checkpoint is step {good} in {ckpt.directory}"
                         if good is not None else "no checkpoint was written")
                raise NonFiniteLossError(
                    f"loss became {float(m['loss'])} at step {s} (grad norm "
                    f"{float(m['grad_norm'])}); stopped without saving the bad state; {where}. "
                    "Lower the learning rate, enable grad_clip_norm, or check the data.")
        train_metrics = _mean_metrics(fetched)
        last_loss = train_metrics["loss"]
        window, window_steps = [], []

    def save() -> None:
        nonlocal last_saved
        check_window()
        if last_saved != step:
            ckpt.save(state, data_position)
            last_saved = step

    def run_eval() -> None:
        nonlocal eval_cache, eval_metrics, paused
        if eval_cache is not None:
            batches: Iterable[HostBatch] | None = eval_cache
        else:
            batches = data.eval_batches(shard)
            if batches is None:
                return
            if tc.cache_eval_batches and tc.eval_steps is not None:
                batches = list(_take(batches, tc.eval_steps))
                eval_cache = batches
        t0 = time.time()
        metrics = evaluator(state.params, batches, tc.eval_steps)
        if predict_eval_fn is not None:
            metrics.update(predict_eval_fn(setup.model(state.params), step))
        metrics["eval_seconds"] = time.time() - t0
        paused += metrics["eval_seconds"]
        eval_metrics = metrics
        writer.write(step, "eval", metrics)
        writer.flush()
        ent = metrics.get("unigram_entropy")
        bar.message(f"eval step {step}: loss {metrics['loss']:.4f} accuracy "
                    f"{metrics['accuracy']:.4f}"
                    + (f" (unigram entropy of the targets {ent:.4f})" if ent else ""))

    with _StopFlag() as stop:
        while step < tc.train_steps:
            if any_host(stop.signal is not None):
                save()
                ckpt.wait()
                bar.message(f"t5lite train: stop signal received; saved step {step} in "
                            f"{ckpt.directory}; the next start continues from there.")
                return TrainResult(step, True, train_metrics, eval_metrics,
                                   time.time() - t_start, plan.reason)
            host_batch = next(train_iter, None)
            if host_batch is None:
                raise UserError(f"the training data ran out at step {step} (batch "
                                f"{data_position}); use an infinite stream (num_epochs=None).")
            if flops_per_step is None:
                tokens_per_step, in_len, tg_len = _tokens_per_batch(
                    host_batch, tc.batch_size)
                if setup.model_config.architecture == "decoder_only":
                    in_len, tg_len = 0, tg_len
                flops_per_step = train_flops_per_step(setup.model_config, tc.batch_size,
                                                      in_len, tg_len)
            batch = host_to_global(host_batch, setup.batch_sharding, tc.batch_size)
            state, metrics = setup.train_step(state, batch)
            step += 1
            data_position += 1
            window.append(metrics)
            window_steps.append(step)
            if timed_steps == 0 and step == bar.start + 1:
                jax.block_until_ready(metrics)  # leave compilation out of the rates
                t_window = time.time()
            else:
                timed_steps += 1
            if step % tc.log_period == 0 or step == tc.train_steps:
                check_window()
                elapsed = time.time() - t_window - paused
                record = dict(train_metrics)
                if timed_steps and elapsed > 0:
                    record["tokens_per_sec"] = tokens_per_step * timed_steps / elapsed
                    record["steps_per_sec"] = timed_steps / elapsed
                    if peak is not None:
                        record["mfu"] = (flops_per_step * timed_steps / elapsed
                                         / (peak * setup.mesh.size))
                writer.write(step, "train", record)
                train_metrics = record
                t_window, timed_steps, paused = time.time(), 0, 0.0
            bar.update(step, last_loss, train_metrics.get("tokens_per_sec"))
            if tc.eval_period and step % tc.eval_period == 0 and step < tc.train_steps:
                check_window()
                run_eval()
            if step % tc.checkpoint_period == 0:
                t0 = time.time()
                save()
                paused += time.time() - t0
        if step > start_step:
            check_window()
            run_eval()
            save()
        ckpt.wait()
    wall = time.time() - t_start
    bar.message(f"t5lite train: done at step {step} in {format_duration(wall)}; checkpoints "
                f"in {ckpt.directory}")
    return TrainResult(step, False, train_metrics, eval_metrics, wall, plan.reason)


def _take(batches: Iterable[HostBatch], limit: int | None) -> Iterator[HostBatch]:
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            return
        yield batch


__all__ = ["DataSource", "NonFiniteLossError", "PredictEvalFn", "TrainResult", "train",
           "write_model_dir_files"]
