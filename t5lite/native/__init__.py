"""t5lite's native helpers, built from C source on first use with the host's C compiler.

One today: `block_cache.c`, a malloc interposer that keeps large freed blocks for reuse (see
its header comment and `t5lite.host_malloc`). `block_cache_library()` returns the path of the
built shared library, building it once per source version into a cache directory:

    $T5LITE_NATIVE_DIR, else $XDG_CACHE_HOME/t5lite/native, else ~/.cache/t5lite/native

named after the source's hash and the machine (`block_cache-<sha256[:16]>-x86_64.so`), so an
upgraded t5lite builds its own copy and two processes building at once each write a temporary
file and rename it into place (the last rename wins; both files are the same).

Example::

    >>> path = block_cache_library()          # doctest: +SKIP
    >>> os.path.basename(path)                # doctest: +SKIP
    'block_cache-3f1c9a0e7b2d4c55-x86_64.so'
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from t5lite.errors import UserError

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "block_cache.c")
COMPILE_FLAGS = ("-O2", "-shared", "-fPIC", "-Wall")
LIBRARIES = ("-ldl", "-lpthread")


def native_dir(environ: dict[str, str] | None = None) -> str:
    """Where built libraries are kept (see the module doc)."""
    env = os.environ if environ is None else environ
    if env.get("T5LITE_NATIVE_DIR"):
        return env["T5LITE_NATIVE_DIR"]
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "t5lite", "native")


def c_compiler() -> str | None:
    """$CC, else `cc`, `gcc` or `clang` on PATH, else None."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"].split()[0]) and os.environ["CC"]
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def library_path(directory: str | None = None) -> str:
    """The path the block cache library for this source has (built or not)."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return os.path.join(directory or native_dir(), f"block_cache-{digest}-{platform.machine()}.so")


def block_cache_library(directory: str | None = None) -> str:
    """The built block cache library's path, building it first if needed.

    Raises UserError (naming what to do) on a host that cannot build it: not Linux with glibc,
    no C compiler, or the compiler failed.
    """
    path = library_path(directory)
    if os.path.isfile(path):
        return path
    if not sys.platform.startswith("linux"):
        raise UserError(f"t5lite's block cache is for Linux with glibc, not {sys.platform}.")
    compiler = c_compiler()
    if compiler is None:
        raise UserError("building t5lite's block cache needs a C compiler (cc, gcc or clang; "
                        "Debian/Ubuntu: `apt-get install gcc`), or set $CC.")
    try:  # e.g. a read-only home directory: say where, and how to move it
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write t5lite's block cache into {os.path.dirname(path)} ({e}); "
                        f"set T5LITE_NATIVE_DIR to a writable directory.") from e
    cmd = [*compiler.split(), *COMPILE_FLAGS, "-o", tmp, SOURCE, *LIBRARIES]
    try:
        # no allocator of ours in the compiler: it must not load the library it is building
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        if done.returncode != 0:
            raise UserError(f"building t5lite's block cache failed ({' '.join(cmd)}):\n"
                            f"{done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"building t5lite's block cache failed ({' '.join(cmd)}): {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
