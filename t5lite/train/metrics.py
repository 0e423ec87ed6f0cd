"""Metrics output: `metrics.jsonl`, TensorBoard event files and the console progress bar.

`MODEL_DIR/metrics.jsonl` (**contract**) holds one JSON object per line with at least `step`,
`split` ("train" or "eval"), `loss`, `accuracy`, `learning_rate` (train), `tokens_per_sec`
(train) and `mfu` (train, where the device peak is known). The file is appended to, so a resumed
run continues it. Only the primary host writes.

    {"step": 200, "split": "train", "loss": 4.12, "accuracy": 0.31, "learning_rate": 0.01,
     "tokens_per_sec": 41000.0, "time": 1732797000.2, ...}
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from typing import Any, TextIO

from t5lite import storage
from t5lite.model_dir import METRICS_FILE, TENSORBOARD_SUBDIR


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf: keep them readable
    return value


class MetricsWriter:
    """Appends metrics to metrics.jsonl and TensorBoard (`tensorboard/`) on the primary host."""

    def __init__(self, model_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._path = os.path.join(model_dir, METRICS_FILE)
        self._tb = None
        self._log = None
        if enabled:
            from t5lite.disk import writing

            with writing(os.path.join(model_dir, TENSORBOARD_SUBDIR), "creating"):
                storage.makedirs(model_dir)
                # local: appended per record; gs://: buffered segment objects (t5lite.storage)
                self._log = storage.AppendLog(self._path)
                if tensorboard:
                    from tensorboardX import SummaryWriter

                    storage.register_tensorboard_writer()  # gs:// event files as segment objects

                    self._tb = SummaryWriter(os.path.join(model_dir, TENSORBOARD_SUBDIR),
                                             flush_secs=30)

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: _clean(v) for k, v in metrics.items()})
        record["time"] = round(time.time(), 3)
        from t5lite.disk import writing

        with writing(self._path, "appending metrics to"):
            self._log.write(json.dumps(record, sort_keys=False) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key in ("step", "split", "time") or not isinstance(value, (int, float)):
                    continue
                self._tb.add_scalar(f"{split}/{key}", value, int(step))

    def _append_line(self, line: str) -> None:
        """Append one whole line: on a full disk, cut the file back to its last complete line
        (so metrics.jsonl stays readable) and raise DiskFullError naming the path."""
        data = line.encode("utf-8")
        with open(self._path, "ab") as f:
            size = f.tell()
            try:
                f.write(data)
                f.flush()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                try:
                    f.truncate(size)
                except OSError:
                    pass
                raise _disk_full(self._path, "appending metrics to") from None

    def flush(self) -> None:
        if self._log is not None:
            self._log.flush()
        if self._tb is not None:
            try:
                self._tb.flush()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise _disk_full(os.path.dirname(self._path), "writing TensorBoard events in"
                                 ) from None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise _disk_full(os.path.dirname(self._path), "writing TensorBoard events in"
                                 ) from None


def _disk_full(path: str, what: str):
    from t5lite.disk import disk_full_error

    return disk_full_error(path, what)


def read_metrics(model_dir: str) -> list[dict[str, Any]]:
    """All records of MODEL_DIR/metrics.jsonl (empty list when there is none)."""
    path = os.path.join(model_dir, METRICS_FILE)
    return [json.loads(line) for line in storage.read_lines(path) if line.strip()]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_rate(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class ProgressBar:
    """One console line: `step 120/2000 [####----] loss 3.21 | 45.1k tok/s | ETA 4m12s`.

    On a terminal the line is redrawn in place; otherwise (logs, CI) a line is printed every
    `every` updates.
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, every: int = 50, width: int = 24):
        self.total, self.start = total, start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self.width = width
        self._t0 = time.time()
        self._last_line = ""

    def update(self, step: int, loss: float | None, tokens_per_sec: float | None,
               extra: str = "") -> None:
        if not self.enabled:
            return
        done = max(step - self.start, 0)
        elapsed = time.time() - self._t0
        eta = elapsed / done * (self.total - step) if done else float("nan")
        frac = step / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [f"step {step}/{self.total} [{bar}]"]
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        if tokens_per_sec:
            parts.append(f"{format_rate(tokens_per_sec)} tok/s")
        parts.append("ETA " + (format_duration(eta) if math.isfinite(eta) else "?"))
        if extra:
            parts.append(extra)
        line = " | ".join(parts)
        if self.tty:
            pad = max(0, len(self._last_line) - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
        elif step == self.total or done % self.every == 0:
            self.stream.write(line + "\n")
            self.stream.flush()
        self._last_line = line

    def message(self, text: str) -> None:
        """Print a line above the bar (e.g. eval results)."""
        if not self.enabled:
            return
        if self.tty and self._last_line:
            self.stream.write("\r" + " " * len(self._last_line) + "\r")
        self.stream.write(text + "\n")
        if self.tty and self._last_line:
            self.stream.write(self._last_line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._last_line:
            self.stream.write("\n")
            self.stream.flush()
