"""Import TensorFlow without its C++ start-up lines, and keep it off the accelerators.

TensorFlow (used only by the SeqIO data pipeline) prints a handful of lines from C++ when it is
imported -- oneDNN notices, the CUDA driver probe, CPU-feature hints -- and neither
`TF_CPP_MIN_LOG_LEVEL` nor Python logging reaches them in TF 2.21 (they come from absl's C++
logging before it is initialised). `install()` puts a finder on `sys.meta_path` that wraps the
first `import tensorflow`, wherever it happens (seqio, t5lite.data, a task module): while the
module executes, file descriptor 2 goes to a temporary file; afterwards every line that is not
such start-up noise is written back to stderr, so real errors still show. The wrapper also hides
the GPUs from TensorFlow (`tf.config.set_visible_devices([], "GPU")`) so that the input pipeline
never takes accelerator memory from JAX; that call runs inside the capture too, because it is
where TensorFlow probes the CUDA driver.

`t5lite.cli.main` calls `install()` first; library users may call it themselves.

Example::

    >>> from t5lite import quiet_tf
    >>> quiet_tf.install()
    >>> import tensorflow   # nothing printed
    >>> quiet_tf.is_noise("I0000 00:00:1796204152.629 6842 port.cc:153] oneDNN custom ops are on")
    True
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Iterator

_NOISE = [
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    # absl C++ INFO / WARNING lines (I0000 00:00:... file.cc:123] ...)
    re.compile(r"^[IW]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\] "),
    # the CUDA probe on machines without (or hidden) GPUs
    re.compile(r"^E\d{4} .*\] (failed call to cuInit|Unable to register cu\w+ factory)"),
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow"),
    re.compile(r"^(WARNING|E\d{4}).*(cuda_dnn|cuda_fft|cuda_blas|cuda_platform)\.cc"),
]


def is_noise(line: str) -> bool:
    """True for TensorFlow's C++ start-up lines (not for anything else it prints)."""
    return any(p.search(line) for p in _NOISE)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Capture fd 2 (C++ and Python writes alike); re-emit the lines that are not noise."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture, StringIO: nothing to do
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not is_noise(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self._inner = inner

    def create_module(self, spec):  # noqa: D102
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: D102
        with filtered_stderr():
            self._inner.exec_module(module)
            try:
                module.config.set_visible_devices([], "GPU")
            except Exception:  # noqa: BLE001 - a TF build without that API or devices
                pass

    def __getattr__(self, name):  # resource readers etc. go to the real loader
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: D102
        if name != "tensorflow":
            return None
        uninstall()  # one import only; the real finders do the work
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Wrap the first `import tensorflow` of this process (no-op when already imported)."""
    if "tensorflow" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
