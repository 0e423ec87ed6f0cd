"""t5lite's block cache (t5lite/native/block_cache.c): built on first use, preloaded by the
`blockcache` allocator choice; it must behave as malloc does, and keep large freed blocks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from t5lite import native
from t5lite.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or native.c_compiler() is None,
    reason="the block cache is built with a C compiler on Linux")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> str:
    return native.block_cache_library(str(tmp_path_factory.mktemp("native")))


def run_preloaded(library: str, code: str, **env: str) -> str:
    """Run `code` in a Python process with the block cache preloaded; its stdout."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF")}
    environ.update(env, LD_PRELOAD=library, PYTHONPATH=ROOT, T5LITE_MALLOC="system")
    proc = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_built_once_per_source_and_named_after_it(tmp_path, library):
    assert os.path.basename(library).startswith("block_cache-")
    assert native.library_path(os.path.dirname(library)) == library
    mtime = os.stat(library).st_mtime_ns
    assert native.block_cache_library(os.path.dirname(library)) == library
    assert os.stat(library).st_mtime_ns == mtime  # not built again
    # the build's temporary file was renamed into place: the library is all there is
    assert os.listdir(os.path.dirname(library)) == [os.path.basename(library)]


def test_a_failing_compiler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exits 1 without a word
    with pytest.raises(UserError, match="building t5lite's block cache failed"):
        native.block_cache_library(str(tmp_path))
    assert os.listdir(tmp_path) == []  # no half-written library left behind
    monkeypatch.setenv("CC", "no-such-compiler-t5lite")
    with pytest.raises(UserError, match="needs a C compiler"):
        native.block_cache_library(str(tmp_path / "other"))
    monkeypatch.delenv("CC")
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file
    with pytest.raises(UserError, match="set T5LITE_NATIVE_DIR to a writable directory"):
        native.block_cache_library(str(blocker / "native"))


# malloc's contract, call by call, through ctypes; prints the cache's counters.
_CONTRACT = r"""
import ctypes, os
libc = ctypes.CDLL(None)
for name, res, args in (("malloc", ctypes.c_void_p, [ctypes.c_size_t]),
                        ("calloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
                        ("realloc", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
                        ("aligned_alloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
                        ("malloc_usable_size", ctypes.c_size_t, [ctypes.c_void_p]),
                        ("free", None, [ctypes.c_void_p])):
    getattr(libc, name).restype, getattr(libc, name).argtypes = res, args
stats = (ctypes.c_uint64 * 5)()
def counters():
    libc.t5lite_block_cache_stats(stats)
    return list(stats)
MiB = 1 << 20
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

a = libc.malloc(6 * MiB); ctypes.memset(a, 7, 6 * MiB)
assert libc.malloc_usable_size(a) >= 6 * MiB
libc.free(a)
b = libc.malloc(6 * MiB)  # same class: the same block, its pages still there unless capped
assert b == a, (a, b)
capped = os.environ.get("T5LITE_BLOCK_CACHE_MB") == "0"
assert ctypes.string_at(b, 4) == (bytes(4) if capped else b"\x07" * 4)
c = libc.calloc(3 * MiB, 2)  # a kept block of the same class... zeroed all the same
libc.free(b)
c2 = libc.calloc(3 * MiB, 2)
assert ctypes.string_at(c2, 6 * MiB) == bytes(6 * MiB)
small = libc.malloc(100)  # glibc's
assert libc.malloc_usable_size(small) >= 100
# realloc: grows a block with its bytes, within its class without moving, to glibc and back
ctypes.memset(c2, 5, 6 * MiB)
assert libc.realloc(c2, 6 * MiB + 1000) == c2
d = libc.realloc(c2, 40 * MiB)
assert ctypes.string_at(d, 6 * MiB) == b"\x05" * (6 * MiB)
s = libc.malloc(1000); ctypes.memset(s, 3, 1000)
s = libc.realloc(s, 10 * MiB)
assert ctypes.string_at(s, 1000) == b"\x03" * 1000
for align in (64, 4096):
    p = libc.aligned_alloc(align, 8 * MiB)
    assert p % align == 0
    libc.free(p)
p = libc.aligned_alloc(1 << 16, 8 * MiB)  # more than a page: glibc's
assert p % (1 << 16) == 0
for p in (c, d, s, small, p, None):
    libc.free(p)
# a touched 64 MiB block stays resident after free (kept for the next step), unless capped
rss = status("VmRSS")
big = libc.malloc(64 * MiB); ctypes.memset(big, 1, 64 * MiB)
touched = status("VmRSS") - rss
libc.free(big)
print("kept_kb", status("VmRSS") - rss - (touched - (64 << 10)))
print("counters", *counters())
"""


def test_malloc_contract_and_large_blocks_kept(library):
    out = run_preloaded(library, _CONTRACT).split("\n")
    kept_kb = int(out[0].split()[1])
    new, reused, kept, released, cached = map(int, out[1].split()[1:])
    assert kept_kb >= 60 << 10  # the freed 64 MiB buffer is still resident
    assert new >= 5 and reused >= 2 and kept >= 5 and released == 0 and cached >= 64 << 20


def test_cache_cap_gives_pages_back(library):
    out = run_preloaded(library, _CONTRACT, T5LITE_BLOCK_CACHE_MB="0").split("\n")
    new, reused, kept, released, cached = map(int, out[1].split()[1:])
    assert int(out[0].split()[1]) < 4 << 10  # given back to the kernel
    assert kept == 0 and released >= 5 and cached == 0


_THREADS_AND_FORK = r"""
import ctypes, os, threading
import numpy as np
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def work(seed):
    rng = np.random.default_rng(seed)
    for i in range(150):
        n = int(rng.integers(30_000, 900_000))
        x = rng.random(n); y = x.copy() * 2
        assert np.array_equal(y / 2, x)
        z = np.zeros(n); assert not z.any()
        y.resize(n + 200_000, refcheck=False); assert np.array_equal(y[:n] / 2, x)
threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
for t in threads: t.start()
pid = os.fork()
if pid == 0:  # the child allocates large blocks (malloc itself: numpy's locks do not survive
    for i in range(200):  # a fork of a threaded process) while the parent's threads run on
        p = libc.malloc((1 + i % 7) << 20)
        ctypes.memset(p, i, (1 + i % 7) << 20)
        libc.free(p)
    os._exit(0)
for t in threads: t.join()
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
print("ok")
"""


def test_threads_and_fork(library):
    assert run_preloaded(library, _THREADS_AND_FORK).strip() == "ok"


_JAX = r"""
import jax, jax.numpy as jnp, numpy as np
x = jnp.asarray(np.random.default_rng(0).standard_normal((512, 768)), jnp.float32)
w = jnp.asarray(np.random.default_rng(1).standard_normal((768, 1024)), jnp.float32)
loss = jax.jit(jax.value_and_grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2)))
for _ in range(3):
    value, grad = loss(w)
print(repr(float(value)), repr(float(jnp.sum(grad * grad))))
"""


def test_jax_gives_the_same_numbers_under_it(library):
    environ = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain = subprocess.run([sys.executable, "-c", _JAX], env={**environ, "T5LITE_MALLOC": "system"},
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert run_preloaded(library, _JAX).split() == plain.stdout.split()
    assert len(plain.stdout.split()) == 2 and np.isfinite(float(plain.stdout.split()[0]))
