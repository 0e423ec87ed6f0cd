"""The persistent compilation cache: compiled programs kept on disk (or in a bucket), so a
restarted or re-launched job loads its train step instead of compiling it again.

A pod job compiles its train step on every start: after a preemption, after a crash, on every
host of every re-launch. Unrolled layers (`ModelConfig.scan_layers=False`) can make that compile
take minutes. With a cache directory, the first process to compile a program writes the
executable there (JAX's persistent cache: the key covers the program, its shardings, the
devices, the compiler flags and the JAX/XLA versions), and every later process with the same
program loads it:

    t5lite train ... --compilation_cache_dir=gs://my-bucket/xla_cache   # every host, one cache
    t5lite train ... --compilation_cache_dir=~/.cache/t5lite/xla          # one machine

    from t5lite import compile_cache
    compile_cache.enable("/tmp/xla_cache")     # before the first compile of the process
    ...                                        # jit / compile as usual
    compile_cache.summary()                    # 'compilation cache /tmp/xla_cache: 1 loaded, ...'

Several processes (multi-host): JAX writes entries from process 0 only, and each process looks
its programs up under a key that includes the devices it compiles for (on TPU, the slice's
topology fingerprint, meant to be the same on every host; not verified here, no TPU). In a
multi-process CPU rehearsal (launch/local_multiprocess.sh) the keys differ per process, so there
only process 0 loads; the others compile as before.

Only programs that took at least `min_compile_seconds` to compile are written (JAX's default of
1 s, or JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS: small helper programs are cheaper to compile
than to fetch). A cache is trusted code: anyone who can write to the directory can make the
job run what they wrote, so keep it in a bucket or directory only the job's own account can
write.
"""

from __future__ import annotations

import os
import threading

from t5lite import storage
from t5lite.errors import UserError

_HITS = "/jax/compilation_cache/cache_hits"
_MISSES = "/jax/compilation_cache/cache_misses"

_lock = threading.Lock()
_counts = {_HITS: 0, _MISSES: 0}
_listening = False
_directory: str | None = None


def _count(event: str, **_kwargs) -> None:
    if event in _counts:
        with _lock:
            _counts[event] += 1


def _check_local(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--compilation_cache_dir={path} is a file, not a directory; give a "
                        "directory (it is created if missing).")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--compilation_cache_dir={path}: cannot create it ({e.strerror}); give "
                        "a directory this user can write.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--compilation_cache_dir={path} is not writable by this user; give a "
                        "directory this user can write.")


def enable(directory: str, *, min_compile_seconds: float | None = None) -> str:
    """Keep compiled programs in `directory` (a local path, `~` expanded, or `gs://...`) and
    load them from there; returns the directory as used. Call it before the process compiles
    anything: JAX reads the setting at its first compile. `min_compile_seconds`: store only
    programs whose compile took at least this long (None: JAX's setting, 1 s unless
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise).

    Raises UserError for a directory that cannot be created or written.
    """
    global _listening, _directory
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    if min_compile_seconds is not None and min_compile_seconds < 0:
        raise UserError(f"min_compile_seconds must be >= 0, not {min_compile_seconds}.")
    if storage.is_remote(directory):  # JAX reaches it through etils.epath -> gcsfs, which
        path = directory.rstrip("/")     # t5lite.storage configured when it was imported
    else:
        path = os.path.abspath(os.path.expanduser(directory))
        _check_local(path)
    if min_compile_seconds is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(min_compile_seconds))
    jax_cache.reset_cache()  # a directory set earlier in this process must not linger
    jax.config.update("jax_enable_compilation_cache", True)  # `t5lite plan` switches it off
    jax_cache.set_cache_dir(path)
    with _lock:
        for key in _counts:
            _counts[key] = 0
        if not _listening:
            jax.monitoring.register_event_listener(_count)
            _listening = True
    _directory = path
    return path


def disable() -> None:
    """Stop using the persistent cache in this process (the directory's files stay)."""
    global _directory
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    if _directory is None:
        return
    jax.config.update("jax_compilation_cache_dir", None)
    jax_cache.reset_cache()
    _directory = None


def directory() -> str | None:
    """The cache directory in use (None when the persistent cache is off)."""
    return _directory


def counts() -> dict[str, int]:
    """Programs loaded from the cache ("loaded") and compiled because they were not in it
    ("compiled") since `enable`."""
    with _lock:
        return {"loaded": _counts[_HITS], "compiled": _counts[_MISSES]}


def is_first_process() -> bool:
    """Whether this is process 0 of the job: the one that writes the cache and reports on it."""
    import jax

    return jax.process_index() == 0


def summary() -> str:
    """One line for logs, e.g. 'compilation cache gs://b/xla: 2 loaded, 1 compiled'; '' when
    the cache is off."""
    if _directory is None:
        return ""
    c = counts()
    return f"compilation cache {_directory}: {c['loaded']} loaded, {c['compiled']} compiled"


__all__ = ["counts", "directory", "disable", "enable", "is_first_process", "summary"]
