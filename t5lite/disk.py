"""A full disk, reported as one line: which path was being written and how much space is left.

Example::

    >>> with writing("/runs/demo/metrics.jsonl", "appending metrics to"):
    ...     f.write(line)
    DiskFullError: no space left on the device while appending metrics to
        /runs/demo/metrics.jsonl (12.0 kB free); free some space (earlier checkpoints are
        intact) and start the same command again to continue.
"""

from __future__ import annotations

import errno
import os
import shutil

from t5lite.errors import UserError


class DiskFullError(UserError):
    """No space left on the device while writing a checkpoint, metrics or run files."""


def is_disk_full(exc: BaseException | None) -> bool:
    """True when `exc` (or an exception it was raised from) is a full disk (ENOSPC)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc)
        if "No space left on device" in text or "ENOSPC" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_space_text(path: str) -> str:
    """'1.2 MB free' for the file system holding `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if free >= scale:
            return f"{free / scale:.1f} {unit} free"
    return f"{free} bytes free"


def disk_full_error(path: str, what: str) -> DiskFullError:
    """The error for a full disk while `what` (e.g. "appending metrics to") `path`."""
    return DiskFullError(f"no space left on the device while {what} {path} "
                         f"({free_space_text(path)}); free some space (earlier checkpoints are "
                         "intact) and start the same command again to continue.")


class writing:
    """Context manager: an ENOSPC error inside becomes `disk_full_error(path, what)`."""

    def __init__(self, path: str, what: str = "writing"):
        self.path, self.what = path, what

    def __enter__(self) -> "writing":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, DiskFullError) and is_disk_full(exc):
            raise disk_full_error(self.path, self.what) from None
        return False
