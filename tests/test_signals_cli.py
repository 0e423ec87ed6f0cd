"""Signals and divergence through the real `t5lite train` command (issue #13 item 5).

Each test resumes a copy of a trained model dir (checkpoint of step 6) with a long TRAIN_STEPS
and no periodic checkpoints, waits until the run has made progress (metrics.jsonl), then:
SIGTERM / SIGINT -> the current step is saved, exit 0; two Ctrl-C -> exit 130 without saving,
step 6 stays the newest checkpoint; a diverging learning rate -> exit 3, step 6 kept."""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time

import jax
import numpy as np
import pytest

from cli_util import TINY_GIN, checkpoint_steps, copy_model_dir, error_lines, start

pytestmark = pytest.mark.slow

LONG = ["--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=100000", "--gin.EVAL_PERIOD=None"]


def _last_train_step(model_dir: str) -> int:
    path = os.path.join(model_dir, "metrics.jsonl")
    steps = [0]
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if r["split"] == "train":
                        steps.append(r["step"])
    return max(steps)


def _wait_for_step(proc, model_dir: str, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while _last_train_step(model_dir) < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.2)


class _Lines:
    """stderr of a process read line by line in a thread (so the test can wait for a line)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while True:
            line = self._queue.get(timeout=max(1.0, deadline - time.time()))
            if line is None:
                raise AssertionError(f"{text!r} never appeared:\n" + "".join(self.lines)[-3000:])
            self.lines.append(line)
            if text in line:
                return line

    def rest(self) -> str:
        self._thread.join(timeout=600)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


def _final_params_finite(model_dir: str, step: int) -> bool:
    from flax import nnx

    from t5lite.inference import load_model

    model, _ = load_model(model_dir, step=step)
    return all(np.isfinite(np.asarray(x)).all()
               for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_the_current_step_and_exits_zero(cli_trained, tmp_path, sig):
    from t5lite import checkpoint

    model_dir = copy_model_dir(cli_trained[0], str(tmp_path / "run"))
    proc = start("train", TINY_GIN, f"--model_dir={model_dir}", *LONG)
    _wait_for_step(proc, model_dir, 8)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"{signal.Signals(sig).name} received: saving the current step" in err
    steps = checkpoint_steps(model_dir)
    saved = steps[-1]
    assert saved >= 8 and steps == [6, saved]  # keep_checkpoints=2
    assert f"saved step {saved} in" in out + err
    assert _last_train_step(model_dir) == saved  # metrics of every step up to the saved one
    ckpt = checkpoint.TrainCheckpointer(model_dir)
    assert ckpt.restore_meta(saved)["data_position"] == saved  # resumes with the next batch
    ckpt.close()
    assert "Traceback" not in err and not error_lines(err)


def test_second_ctrl_c_aborts_without_saving(cli_trained, tmp_path):
    model_dir = copy_model_dir(cli_trained[0], str(tmp_path / "run"))
    proc = start("train", TINY_GIN, f"--model_dir={model_dir}", *LONG,
                 "--module_import=t5lite_tasks", "--module_import=slow_save_hook")
    stderr = _Lines(proc.stderr)
    _wait_for_step(proc, model_dir, 8)
    proc.send_signal(signal.SIGINT)
    stderr.wait_for("press Ctrl-C again to stop without saving")
    stderr.wait_for("SLOW_SAVE_HOOK")  # on its way to saving (the hook waits 120 s)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=600)
    err = stderr.rest()
    assert proc.returncode == 130, err[-3000:]
    assert time.time() - t0 < 100  # did not wait for the save
    assert ("interrupted: stopped without saving; the newest checkpoint is step 6 in"
            in err), err[-3000:]
    assert checkpoint_steps(model_dir) == [5, 6]
    assert "Traceback" not in err


def test_nan_loss_exits_3_and_keeps_the_last_good_checkpoint(cli_trained, tmp_path):
    model_dir = copy_model_dir(cli_trained[0], str(tmp_path / "run"))
    # a learning rate that overflows the parameters in the first resumed step
    proc = start("train", TINY_GIN, f"--model_dir={model_dir}", *LONG,
                 "--gin.CHECKPOINT_PERIOD=1", "--gin.ScheduleConfig.base_learning_rate=1e30")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 3, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "at step 7" in lines[0], err[-3000:]
    assert "the last good checkpoint is step 6" in lines[0]
    assert "Traceback" not in err
    assert checkpoint_steps(model_dir) == [5, 6]
    assert _final_params_finite(model_dir, 6)
