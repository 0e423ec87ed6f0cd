"""Broken checkpoint steps and full disks while saving: detection and setting aside.

Used only by `t5lite.checkpoint`, the one public owner of checkpoints, which re-exports the
public names (`Broken`, `BrokenCheckpointError`, `scan`, `set_aside_broken`, ...) and resolves a
model dir to its checkpoints dir before calling in here. Every function of this module takes the
checkpoints dir itself (`MODEL_DIR/checkpoints`) and never talks to Orbax; it reads step dirs as
plain files and reads Orbax's errors as text.

A step dir is *broken* when it has a zero-length file, unreadable or missing metadata, a missing
item, or arrays that cannot be read; a `<step>.orbax-checkpoint-tmp*` dir (Orbax 0.12 names it
`<step>.orbax-checkpoint-tmp`, older versions add `-<timestamp>`) is a save that never
finished. Broken dirs are moved, never deleted, to `MODEL_DIR/checkpoints_broken/` with a
`.why.txt` note and a warning naming the step and what is wrong. The one exception: the partial
save of a step whose save failed on a full disk is deleted by the process that was writing it
(`disk_full_guard`), since it holds nothing that the earlier steps do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

from t5lite.disk import disk_full_error, is_disk_full
from t5lite.errors import UserError

log = logging.getLogger("t5lite.checkpoint")  # the owner's logger: one name for its warnings

BROKEN_DIRNAME = "checkpoints_broken"
UNFINISHED = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
_REQUIRED_ITEMS = {"params": ("params",), "train": ("params", "train")}


@dataclasses.dataclass(frozen=True)
class Broken:
    """A step dir that cannot be used: its name inside the checkpoints dir and why."""

    name: str
    step: int
    reason: str


class BrokenCheckpointError(UserError):
    """A checkpoint that passed the structural checks could not be read."""

    def __init__(self, broken: Broken, directory: str):
        super().__init__(f"checkpoint {directory}/{broken.name} is broken: {broken.reason}")
        self.broken = broken


def read_json_file(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def step_problem(step_dir: str) -> str | None:
    """What is wrong with a finalised step dir (cheap structural checks, no array reads), or
    None. Checked: readable step and item metadata, the items its kind needs, no empty file."""
    try:
        read_json_file(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
    except FileNotFoundError:
        return "its _CHECKPOINT_METADATA file is missing"
    except (ValueError, OSError) as e:
        return f"its _CHECKPOINT_METADATA file is unreadable ({type(e).__name__})"
    try:
        meta = read_json_file(os.path.join(step_dir, "meta", "metadata"))
        kind = meta["kind"]
    except FileNotFoundError:
        return "its meta/metadata file is missing"
    except (ValueError, OSError, KeyError, TypeError) as e:
        return f"its meta/metadata file is unreadable ({type(e).__name__})"
    for item in _REQUIRED_ITEMS.get(kind, ("params",)):
        try:
            read_json_file(os.path.join(step_dir, item, "_METADATA"))
        except FileNotFoundError:
            return f"its {item}/_METADATA file is missing"
        except (ValueError, OSError) as e:
            return f"its {item}/_METADATA file is unreadable ({type(e).__name__})"
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                return f"{os.path.relpath(path, step_dir)} is empty (0 bytes)"
    return None


def scan(directory: str, unfinished: bool = True) -> tuple[list[int], list[Broken]]:
    """(intact steps, ascending; broken step dirs) of the checkpoints dir `directory`. Reads
    only. `unfinished`: also list `<step>.orbax-checkpoint-tmp-*` dirs (a save that never
    finished)."""
    if not os.path.isdir(directory):
        return [], []
    intact, broken = [], []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        if name.isdigit():
            problem = step_problem(path)
            if problem is None:
                intact.append(int(name))
            else:
                broken.append(Broken(name, int(name), problem))
        elif unfinished and (m := UNFINISHED.match(name)):
            broken.append(Broken(name, int(m[1]), "an unfinished save (the process writing it "
                                                  "died before the checkpoint was complete)"))
    return sorted(intact), sorted(broken, key=lambda b: (b.step, b.name))


def broken_dir(directory: str) -> str:
    """Where the broken step dirs of the checkpoints dir `directory` are moved:
    MODEL_DIR/checkpoints_broken/."""
    return os.path.join(os.path.dirname(directory), BROKEN_DIRNAME)


def set_aside_broken(directory: str, unfinished: bool = True,
                     extra: tuple[Broken, ...] = ()) -> list[Broken]:
    """Move every broken step dir of the checkpoints dir `directory` (see `scan`, plus `extra`)
    to MODEL_DIR/checkpoints_broken/, never deleting anything, and log a warning per step naming
    what is wrong. All processes call it; the primary one moves. Returns what was (or, on other
    hosts, will be) moved.

    `unfinished=False` leaves `*.orbax-checkpoint-tmp-*` dirs alone: readers (`t5lite eval`)
    use it, since a `t5lite train` writing into the same model dir may still be saving.
    """
    from t5lite.parallel.hosts import is_primary, sync_hosts

    sync_hosts("t5lite:checkpoint:before_scan")
    broken = scan(directory, unfinished)[1] + [b for b in extra]
    if broken and is_primary():
        target = broken_dir(directory)
        os.makedirs(target, exist_ok=True)
        for b in broken:
            source = os.path.join(directory, b.name)
            if not os.path.exists(source):
                continue
            dest = os.path.join(target, b.name)
            n = 1
            while os.path.exists(dest):
                n += 1
                dest = os.path.join(target, f"{b.name}.{n}")
            os.rename(source, dest)
            try:
                with open(dest + ".why.txt", "w", encoding="utf-8") as f:
                    f.write(f"step {b.step}: {b.reason}\nmoved from {source} at "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
            except OSError:
                pass
            log.warning("checkpoint step %d in %s is broken: %s; moved it to %s (not deleted); "
                        "using the newest intact checkpoint instead.", b.step, directory,
                        b.reason, dest)
    sync_hosts("t5lite:checkpoint:after_set_aside")
    return broken


# ---------------------------------------------------------------- reading a step's arrays

@contextlib.contextmanager
def read_of_step(step: int, directory: str) -> Iterator[None]:
    """Turn a failure to read the stored arrays or metadata of `step` (a missing, empty or
    truncated file) into `BrokenCheckpointError`; other errors pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        if not is_read_failure(e):
            raise
        raise BrokenCheckpointError(Broken(str(step), step, "its arrays cannot be read "
                                           f"({_brief(e)})"), directory) from None


def _brief(exc: BaseException) -> str:
    while exc.__cause__ is not None:  # the root cause names the file
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def is_read_failure(exc: BaseException) -> bool:
    """True for errors of reading stored arrays (a missing, empty or truncated file), as opposed
    to a restore target that does not match the checkpoint's structure."""
    markers = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "Error reading",
               "error while reading", "Error opening", "No such file", "corrupt", "Truncated",
               "truncated", "unexpected end")
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OSError, EOFError)) or any(m in str(exc) for m in markers):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ---------------------------------------------------------------- a full disk while saving

def _partial_saves(directory: str, step: int | None) -> list[str]:
    """Names of the `<step>.orbax-checkpoint-tmp*` dirs of `step` (any step: None)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [n for n in names
            if (m := UNFINISHED.match(n)) and (step is None or int(m[1]) == step)]


def remove_partial_saves(directory: str, step: int | None, quiet: float = 2.0,
                         limit: float = 60.0) -> list[str]:
    """Delete the partial `<step>.orbax-checkpoint-tmp*` dirs of a save that failed, and keep
    deleting them until none has come back for `quiet` seconds (at most `limit` seconds).
    Returns the names still there after `limit` (empty: all gone).

    When one write of an async Orbax save fails, the error surfaces at once while the save's
    other writes (its other items, the sharding and array metadata, TensorStore's own threads)
    are still running; they re-create the tmp dir they write into (seen: `2.orbax-checkpoint-tmp
    /train.orbax-checkpoint-tmp/_sharding` 0.1 s after it was deleted). Only the process whose
    save failed calls this, for its own step: a finished step is never touched.
    """
    deadline = time.monotonic() + limit
    quiet_since = time.monotonic()
    while True:
        names = _partial_saves(directory, step)
        for name in names:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        now = time.monotonic()
        if names:
            quiet_since = now
        elif now - quiet_since >= quiet:
            return []
        if now >= deadline:
            return _partial_saves(directory, step)
        time.sleep(0.05)


class disk_full_guard:
    """Turn a full disk during a save into `DiskFullError`, removing this process's partial
    `<step>.orbax-checkpoint-tmp*` dirs (see `remove_partial_saves`; the earlier, finished steps
    are untouched). A partial dir that keeps coming back is left with a warning: the next start
    moves it to `checkpoints_broken/` like any unfinished save."""

    def __init__(self, directory: str, step: int | None):
        self.directory, self.step = directory, step

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not is_disk_full(exc):
            return False
        from t5lite.parallel.hosts import is_primary

        if is_primary():
            left = remove_partial_saves(self.directory, self.step)
            if left:
                log.warning("could not remove the partial save %s in %s (still being written "
                            "after the disk filled up); the next start moves it to %s.",
                            ", ".join(left), self.directory, broken_dir(self.directory))
        where = (f"checkpoint step {self.step} to" if self.step is not None
                 else "saving a checkpoint to")
        raise disk_full_error(self.directory, f"writing {where}" if self.step is not None
                              else where) from None
