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
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from t5lite import checkpoint, compile_cache, disk, storage
from t5lite import model_dir as md
from t5lite.config import ModelConfig, check_feature_converter
from t5lite.errors import UserError
from t5lite.inference_eval import PredictEvalFn
from t5lite.parallel.hosts import (DataShard, any_host, data_shard_info, host_to_global,
                                   is_primary, sync_hosts)
from t5lite.train import data_resume
from t5lite.train.config import TrainConfig
from t5lite.train.flops import device_peak_flops, train_flops_per_step
from t5lite.train.metrics import MetricsWriter, ProgressBar, format_duration
from t5lite.train.setup import StartPlan, TrainSetup, load_start, make_setup, plan_start
from t5lite.train.teacher_forced_eval import Evaluator

log = logging.getLogger("t5lite.train")

HostBatch = dict[str, np.ndarray]


class DataSource(Protocol):
    """Where a run's batches come from (host-local numpy dicts of [rows, length] int32)."""

    def train_batches(self, shard: DataShard, start_batch: int) -> Iterator[HostBatch]:
        """Infinite iterator of this host's training batches, starting at batch `start_batch`."""

    def eval_batches(self, shard: DataShard) -> Iterable[HostBatch] | None:
        """A fresh finite pass over this host's validation batches (None: no eval data)."""

    # Optional: `feature_converter` ("enc_dec" / "prefix_lm"), the batch layout the source
    # makes; when present, `train` checks it against the model's architecture first.


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite (`t5lite train` exits with status 3)."""

    exit_status = 3


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
        if self.signal is None:
            name = signal.Signals(signum).name
            extra = "; press Ctrl-C again to stop without saving" if (
                signum == signal.SIGINT) else ""
            print(f"t5lite train: {name} received: saving the current step, then stopping"
                  f"{extra}.", file=sys.stderr, flush=True)
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
        storage.write_atomic(os.path.join(model_dir, md.OPERATIVE_GIN_FILE), operative_config)
    mesh_line = ("mesh: " + ", ".join(f"{k}={v}" for k, v in setup.mesh.shape.items())
                 + f" on {setup.mesh.size} {jax.devices()[0].platform} devices "
                 f"({jax.process_count()} process(es)); partitioning="
                 f"{setup.train_config.partitioning}")
    text = model_info(setup.model_config, setup.mesh, setup.rules)
    storage.write_atomic(os.path.join(model_dir, md.MODEL_INFO_FILE),
                         mesh_line + "\n\n" + text + "\n")


def _tokens_per_batch(batch: HostBatch, global_rows: int) -> tuple[int, int, int]:
    """(positions per global batch, input length, target length); decoder-only batches have no
    encoder inputs, so their input length is 0."""
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
    for converter in (getattr(data, "feature_converter", None),
                      run_info.feature_converter if run_info is not None else None):
        if converter is not None:  # before anything is built or written
            check_feature_converter(model_config.architecture, converter)
    setup = make_setup(model_config, tc, mesh)
    # Every host must take the same decision from the same file-system state: the barriers keep
    # the primary host from creating model_dir/checkpoints while another host is still looking.
    sync_hosts("t5lite:train:before_plan")
    plan = _plan(setup, model_dir, tc.init_from)  # validates before anything is written
    shard = data_shard_info(setup.batch_sharding, tc.batch_size)
    data_resume.check_data_shards(data, model_dir, _resume_step(plan), shard)
    sync_hosts("t5lite:train:after_plan")
    if primary:
        with disk.writing(model_dir, "writing the run files (model_config.json, ...) in"):
            storage.makedirs(model_dir)
            write_model_dir_files(model_dir, setup, run_info, operative_config)
    ckpt = checkpoint.TrainCheckpointer(model_dir, keep=tc.keep_checkpoints,
                                        async_save=tc.async_checkpointing)
    writer = MetricsWriter(model_dir, enabled=primary)
    bar = ProgressBar(tc.train_steps, enabled=primary and console)
    try:
        ckpt.set_aside_broken()  # broken / unfinished steps -> checkpoints_broken/, warned
        while True:
            try:
                state, data_position = load_start(setup, plan, ckpt)
                break
            except checkpoint.BrokenCheckpointError as e:  # arrays unreadable: next older step
                ckpt.set_aside(e)
                plan = _plan(setup, model_dir, tc.init_from)
                data_resume.check_data_shards(data, model_dir, _resume_step(plan), shard)
        bar.message(f"t5lite train: {plan.reason}")
        log.info("start: %s", plan.reason)
        run = _Run(setup, state, data_position, plan, data, ckpt, writer, bar, predict_eval_fn)
        return run.run(t_start)
    except KeyboardInterrupt:  # a second Ctrl-C: no new checkpoint
        good = ckpt.latest_step()
        where = (f"the newest checkpoint is step {good} in {ckpt.directory}" if good is not None
                 else "no checkpoint was written")
        raise KeyboardInterrupt(f"stopped without saving; {where}") from None
    finally:
        ckpt.close()
        writer.close()
        bar.close()


def _plan(setup: TrainSetup, model_dir: str, init_from: str | None) -> StartPlan:
    """`plan_start`, skipping (and setting aside) a newest step whose arrays are unreadable."""
    while True:
        try:
            return plan_start(setup, model_dir, init_from)
        except checkpoint.BrokenCheckpointError as e:
            if not os.path.isdir(os.path.join(md.checkpoint_dir(model_dir), e.broken.name)):
                raise  # a broken init_from checkpoint: not ours to move
            checkpoint.set_aside_broken(model_dir, extra=(e.broken,))


def _resume_step(plan: StartPlan) -> int | None:
    """The checkpoint step whose data position the run continues from (None: from batch 0)."""
    return plan.step if plan.source == "checkpoint" else None


class _Throughput:
    """Tokens/s, steps/s and MFU over the steps since the last `report`, leaving out the first
    step's compilation and any time spent in evaluation or checkpointing (`pause`)."""

    def __init__(self, setup: TrainSetup, first_step: int):
        self.setup = setup
        self.first_step = first_step
        self.peak = device_peak_flops()
        self.flops_per_step: float | None = None  # known once the first batch is seen
        self.tokens_per_step = 0
        self.t_window = time.time()
        self.timed_steps = 0
        self.paused = 0.0  # seconds of eval / checkpointing inside the current window

    def batch_shape(self, host_batch: HostBatch) -> None:
        """Learn the step's token count and FLOPs from the first batch."""
        if self.flops_per_step is not None:
            return
        tc = self.setup.train_config
        self.tokens_per_step, in_len, tg_len = _tokens_per_batch(host_batch, tc.batch_size)
        self.flops_per_step = train_flops_per_step(self.setup.model_config, tc.batch_size,
                                                   in_len, tg_len)

    def stepped(self, step: int, metrics: Any) -> None:
        if self.timed_steps == 0 and step == self.first_step + 1:
            jax.block_until_ready(metrics)  # leave compilation out of the rates
            self.t_window = time.time()
        else:
            self.timed_steps += 1

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def report(self) -> dict[str, float]:
        """The rates of the window now ending (empty before any timed step); starts a new one."""
        elapsed = time.time() - self.t_window - self.paused
        out: dict[str, float] = {}
        if self.timed_steps and elapsed > 0:
            out["tokens_per_sec"] = self.tokens_per_step * self.timed_steps / elapsed
            out["steps_per_sec"] = self.timed_steps / elapsed
            if self.peak is not None:
                out["mfu"] = (self.flops_per_step * self.timed_steps / elapsed
                              / (self.peak * self.setup.mesh.size))
        self.t_window, self.timed_steps, self.paused = time.time(), 0, 0.0
        return out


class _Run:
    """One run from its first state to its last step. `run` reads top to bottom: per step, train
    (`_train_step`), then as due `_log`, `_evaluate`, `_save`; at the end a final eval and save.
    Step metrics stay on the device until `_fetch_metrics` (at log / eval / save time), which
    also stops the run on a non-finite loss."""

    def __init__(self, setup: TrainSetup, state: Any, data_position: int, plan: StartPlan,
                 data: DataSource, ckpt: checkpoint.TrainCheckpointer, writer: MetricsWriter,
                 bar: ProgressBar, predict_eval_fn: PredictEvalFn | None):
        self.setup, self.tc = setup, setup.train_config
        self.state, self.data_position, self.plan = state, data_position, plan
        self.data, self.ckpt, self.writer, self.bar = data, ckpt, writer, bar
        self.predict_eval_fn = predict_eval_fn
        self.shard = data_shard_info(setup.batch_sharding, self.tc.batch_size)
        self.step = self.start_step = int(jax.device_get(state.step))
        bar.start = self.step
        self.last_saved = self.step if plan.source == "checkpoint" else None
        self.evaluator = Evaluator(setup.eval_step, setup.batch_sharding, self.tc.batch_size,
                                   setup.model_config.vocab_size)
        self.eval_cache: list[HostBatch] | None = None
        self.throughput = _Throughput(setup, self.step)
        self.pending: list[tuple[int, dict]] = []  # (step, device metrics) not fetched yet
        self.train_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self.last_loss: float | None = None
        self.train_iter = (data_resume.open_train_stream(data, self.shard, data_position, ckpt,
                                                         _resume_step(plan))
                           if self.step < self.tc.train_steps else None)

    # ------------------------------------------------------------------ the loop
    def run(self, t_start: float) -> TrainResult:
        tc = self.tc
        with _StopFlag() as stop:
            while self.step < tc.train_steps:
                if any_host(stop.signal is not None):
                    return self._stop_on_signal(t_start)
                self._train_step()
                if self.step % tc.log_period == 0 or self.step == tc.train_steps:
                    self._log()
                self.bar.update(self.step, self.last_loss,
                                self.train_metrics.get("tokens_per_sec"))
                if tc.eval_period and self.step % tc.eval_period == 0 and \
                        self.step < tc.train_steps:
                    self._fetch_metrics()
                    self._evaluate()
                if self.step % tc.checkpoint_period == 0:
                    t0 = time.time()
                    self._save()
                    self.throughput.pause(time.time() - t0)
            if self.step > self.start_step:
                self._fetch_metrics()
                self._evaluate()
                self._save()
            self.ckpt.wait()
        wall = time.time() - t_start
        self.bar.message(f"t5lite train: done at step {self.step} in {format_duration(wall)}; "
                         f"checkpoints in {self.ckpt.directory}")
        return TrainResult(self.step, False, self.train_metrics, self.eval_metrics, wall,
                           self.plan.reason)

    # ------------------------------------------------------------------ the parts
    def _train_step(self) -> None:
        host_batch = next(self.train_iter, None)
        if host_batch is None:
            raise UserError(f"the training data ran out at step {self.step} (batch "
                            f"{self.data_position}); use an infinite stream (num_epochs=None).")
        self.throughput.batch_shape(host_batch)
        batch = host_to_global(host_batch, self.setup.batch_sharding, self.tc.batch_size)
        first = self.step == self.start_step
        t0 = time.time()
        self.state, metrics = self.setup.train_step(self.state, batch)
        self.step += 1
        self.data_position += 1
        self.pending.append((self.step, metrics))
        self.throughput.stepped(self.step, metrics)  # waits for the first step's result
        if first:  # tracing + compiling (or loading from the compilation cache) + one step
            cache = compile_cache.summary()
            self.bar.message(f"first step (compile + run): {time.time() - t0:.1f} s"
                             + (f"; {cache}" if cache else ""))

    def _fetch_metrics(self) -> None:
        """Fetch pending step metrics (averaged into `train_metrics`); stop on a non-finite
        loss without saving the bad state."""
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        for (s, _), m in zip(self.pending, fetched):
            if not bool(m["finite"]):
                self.ckpt.wait()
                good = self.ckpt.latest_step()
                where = (f"the last good checkpoint is step {good} in {self.ckpt.directory}"
                         if good is not None else "no checkpoint was written")
                raise NonFiniteLossError(
                    f"loss became {float(m['loss'])} at step {s} (grad norm "
                    f"{float(m['grad_norm'])}); stopped without saving the bad state; {where}. "
                    "Lower the learning rate, enable grad_clip_norm, or check the data.")
        self.train_metrics = _mean_metrics(fetched)
        self.last_loss = self.train_metrics["loss"]
        self.pending = []

    def _log(self) -> None:
        self._fetch_metrics()
        record = dict(self.train_metrics)
        record.update(self.throughput.report())
        self.writer.write(self.step, "train", record)
        self.train_metrics = record

    def _eval_batches(self) -> Iterable[HostBatch] | None:
        """The validation batches: read once and kept when `cache_eval_batches` (and
        `eval_steps`) allow, else a fresh pass each time; None without eval data."""
        if self.eval_cache is not None:
            return self.eval_cache
        batches = self.data.eval_batches(self.shard)
        if batches is not None and self.tc.cache_eval_batches and self.tc.eval_steps is not None:
            self.eval_cache = list(_take(batches, self.tc.eval_steps))
            return self.eval_cache
        return batches

    def _evaluate(self) -> None:
        batches = self._eval_batches()
        if batches is None:
            return
        t0 = time.time()
        metrics = self.evaluator(self.state.params, batches, self.tc.eval_steps)
        if self.predict_eval_fn is not None:
            metrics.update(self.predict_eval_fn(self.setup.model(self.state.params), self.step))
        metrics["eval_seconds"] = time.time() - t0
        self.throughput.pause(metrics["eval_seconds"])
        self.eval_metrics = metrics
        self.writer.write(self.step, "eval", metrics)
        self.writer.flush()
        ent = metrics.get("unigram_entropy")
        self.bar.message(f"eval step {self.step}: loss {metrics['loss']:.4f} accuracy "
                         f"{metrics['accuracy']:.4f}"
                         + (f" (unigram entropy of the targets {ent:.4f})" if ent else ""))

    def _save(self) -> None:
        self._fetch_metrics()
        if self.last_saved != self.step:
            self.ckpt.save(self.state, self.data_position,
                           data_resume.snapshot(self.train_iter, self.shard, self.data_position))
            self.writer.flush()  # gs:// metrics segments: persisted with each checkpoint
            self.last_saved = self.step

    def _stop_on_signal(self, t_start: float) -> TrainResult:
        self._save()
        self.ckpt.wait()
        self.bar.message(f"t5lite train: stop signal received; saved step {self.step} in "
                         f"{self.ckpt.directory}; the next start continues from there.")
        return TrainResult(self.step, True, self.train_metrics, self.eval_metrics,
                           time.time() - t_start, self.plan.reason)


def _take(batches: Iterable[HostBatch], limit: int | None) -> Iterator[HostBatch]:
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            return
        yield batch


__all__ = ["DataSource", "NonFiniteLossError", "PredictEvalFn", "TrainResult", "train",
           "write_model_dir_files"]
