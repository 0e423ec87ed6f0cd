"""The host allocator chosen by the `t5lite` entry point's re-exec (t5lite/host_malloc.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from t5lite import host_malloc as hm
from t5lite import native
from t5lite.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JEMALLOC = hm.find_jemalloc()
HUGEPAGES_HELP = (hm.transparent_hugepage_mode() == "madvise"
                  and (hm.glibc_version() or (0, 0)) >= hm.MIN_GLIBC)
needs_madvise_thp = pytest.mark.skipif(
    not HUGEPAGES_HELP, reason="needs transparent huge pages in `madvise` mode and glibc >= 2.35")
needs_jemalloc = pytest.mark.skipif(
    JEMALLOC is None, reason="libjemalloc.so.2 is not installed (apt-get install libjemalloc2)")
LIB = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
BLOCK_CACHE_BUILDS = (sys.platform.startswith("linux") and hm.glibc_version() is not None
                      and native.c_compiler() is not None)


def plan(environ, thp="madvise", glibc=(2, 36), jemalloc=LIB, accelerator=False,
         block_cache=None):
    return hm.malloc_plan(environ, thp_mode=thp, glibc=glibc, jemalloc=jemalloc,
                          accelerator=accelerator, block_cache=block_cache)


def test_auto_takes_the_block_cache_where_jemalloc_is_missing_and_it_builds():
    built = "/cache/t5lite/native/block_cache-0123456789abcdef-x86_64.so"
    calls = []

    def builder():
        calls.append(1)
        return built

    def no_compiler():
        raise UserError("building t5lite's block cache needs a C compiler")

    p = plan({"LD_PRELOAD": "/opt/libfoo.so"}, jemalloc=None, block_cache=builder)
    assert p.name == "blockcache" and p.env[hm.CHOSEN] == "blockcache"
    assert p.env["LD_PRELOAD"] == f"{built}:/opt/libfoo.so" and "GLIBC_TUNABLES" not in p.env
    assert hm.environment_as_started(p.env) == {"LD_PRELOAD": "/opt/libfoo.so"}
    # jemalloc first; an accelerator host keeps glibc's huge pages: the builder is not called
    assert plan({}, block_cache=builder).name == "jemalloc"
    assert plan({}, jemalloc=None, accelerator=True, block_cache=builder).name == "hugepages"
    assert plan({}, jemalloc=None, glibc=None, block_cache=builder) is None  # not glibc
    assert len(calls) == 1
    # no compiler: auto falls back; by name it is one clear error
    assert plan({}, jemalloc=None, block_cache=no_compiler).name == "hugepages"
    assert plan({hm.CHOICE: "blockcache"}, block_cache=builder).name == "blockcache"
    named = plan({hm.CHOICE: "blockcache", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
                 block_cache=builder)  # by name, beside the user's own huge-page tunable
    assert named.name == "blockcache" and named.env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert plan({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, jemalloc=None,
                block_cache=builder) is None  # auto keeps the user's setting as it is
    with pytest.raises(UserError, match="needs a C compiler"):
        plan({hm.CHOICE: "blockcache"}, block_cache=no_compiler)
    with pytest.raises(UserError, match="blockcache needs Linux with glibc"):
        plan({hm.CHOICE: "blockcache"}, glibc=None, block_cache=builder)
    # the user's own preload of it (or of another allocator) is kept as it is
    assert plan({"LD_PRELOAD": built}, jemalloc=None, block_cache=builder) is None


def test_auto_prefers_jemalloc_on_cpu_hosts_then_glibc_huge_pages():
    p = plan({"PATH": "/bin"})
    assert p.name == "jemalloc"
    assert p.env == {"PATH": "/bin", "LD_PRELOAD": LIB, "MALLOC_CONF": hm.JEMALLOC_CONF,
                     hm.CHOSEN: "jemalloc", hm.STARTED_WITH: json.dumps(
                         {"LD_PRELOAD": None, "GLIBC_TUNABLES": None, "MALLOC_CONF": None})}
    assert hm.environment_as_started(p.env) == {"PATH": "/bin"}
    p = plan({"LD_PRELOAD": "/opt/libfoo.so", "MALLOC_CONF": "narenas:2"})
    assert p.env["LD_PRELOAD"] == f"{LIB}:/opt/libfoo.so"
    assert p.env["MALLOC_CONF"] == "narenas:2"  # the user's
    assert hm.environment_as_started(p.env) == {"LD_PRELOAD": "/opt/libfoo.so",
                                                "MALLOC_CONF": "narenas:2"}
    for no_jemalloc in ({"jemalloc": None}, {"accelerator": True}):
        p = plan({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **no_jemalloc)
        assert p.name == "hugepages" and "LD_PRELOAD" not in p.env
        assert p.env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
        assert p.env[hm.CHOSEN] == "hugepages"
        assert hm.environment_as_started(p.env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    for thp, glibc in (("always", (2, 36)),   # the kernel already gives huge pages
                       ("never", (2, 36)),    # it cannot
                       (None, (2, 36)),       # no THP at all
                       ("madvise", (2, 34)),  # glibc without the tunable
                       ("madvise", None)):    # not glibc
        assert plan({}, thp=thp, glibc=glibc, jemalloc=None) is None


def test_retain_is_chosen_by_name_and_keeps_the_users_tunables():
    """`retain` (never picked by auto: its resident set can grow past the step's peak)."""
    p = plan({hm.CHOICE: "retain", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert p.name == "retain" and "LD_PRELOAD" not in p.env and p.env[hm.CHOSEN] == "retain"
    assert p.env["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:"
                                       f"glibc.malloc.trim_threshold={1 << 44}:"
                                       "glibc.malloc.hugetlb=1")
    assert hm.environment_as_started(p.env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
                                                hm.CHOICE: "retain"}
    # the user's own huge-page setting stays, and retain's tunables go beside it
    p = plan({hm.CHOICE: "retain", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert p.env["GLIBC_TUNABLES"] == ("glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=0:"
                                       f"glibc.malloc.trim_threshold={1 << 44}:"
                                       "glibc.malloc.arena_max=1")
    p = plan({hm.CHOICE: "retain"}, thp="always", glibc=(2, 31))  # no huge-page tunable there
    assert p.name == "retain" and "hugetlb" not in p.env["GLIBC_TUNABLES"]


def test_the_users_choice_and_a_finished_reexec_are_kept():
    for environ in ({hm.CHOICE: "system"},
                    {hm.CHOSEN: "jemalloc"},                        # already re-executed
                    {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"},      # the user's allocator
                    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}):   # the user's tunable
        assert plan(environ) is None
    assert plan({hm.CHOICE: " JEMALLOC "}).name == "jemalloc"
    assert plan({hm.CHOICE: "jemalloc"}, accelerator=True).name == "jemalloc"
    assert plan({hm.CHOICE: "hugepages"}, thp="always").name == "hugepages"
    assert plan({hm.CHOICE: "retain"}, accelerator=True).name == "retain"
    assert plan({hm.CHOICE: "retain"}).name == "retain"  # even where jemalloc is installed


def test_bad_choices_are_refused_with_what_to_do():
    with pytest.raises(UserError, match=r"T5LITE_MALLOC='tcmalloc' is not one of auto, "
                                        r"jemalloc, blockcache, retain, hugepages, system"):
        plan({hm.CHOICE: "tcmalloc"})
    with pytest.raises(UserError, match="no libjemalloc.so.2 is installed.*apt-get install "
                                        "libjemalloc2"):
        plan({hm.CHOICE: "jemalloc"}, jemalloc=None)
    with pytest.raises(UserError, match="needs glibc >= 2.35 \\(this C library: glibc 2.31\\)"):
        plan({hm.CHOICE: "hugepages"}, glibc=(2, 31))
    with pytest.raises(UserError, match="retain needs glibc >= 2.26 \\(this C library: not "
                                        "glibc\\)"):
        plan({hm.CHOICE: "retain"}, glibc=None)


def test_the_t5lite_command_is_recognised_from_the_interpreter_command_line():
    assert hm.is_t5lite_command(["/v/bin/python3", "/v/bin/t5lite", "train", "-m", "x"])
    assert hm.is_t5lite_command(["python", "-X", "importtime", "-m", "t5lite.cli", "info"])
    assert hm.is_t5lite_command(["python", "-m", "t5lite"])
    for other in (["python", "-m", "pytest", "-m", "t5lite.cli"], ["python", "-c", "t5lite"],
                  ["python", "bench.py", "t5lite"], ["python"], []):
        assert not hm.is_t5lite_command(other)


def test_transparent_hugepage_mode_reads_the_bracketed_word(tmp_path):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    assert hm.transparent_hugepage_mode(str(mode_file)) == "madvise"
    mode_file.write_text("[always] madvise never\n")
    assert hm.transparent_hugepage_mode(str(mode_file)) == "always"
    mode_file.write_text("garbage\n")
    assert hm.transparent_hugepage_mode(str(mode_file)) is None
    assert hm.transparent_hugepage_mode(str(tmp_path / "missing")) is None


# Allocates and touches 64 MiB through malloc, then frees it; prints what the process runs
# with as key=value words.
_PROBE = r"""
import ctypes, os, sys
from t5lite.host_malloc import reexec_with_chosen_malloc
print("image", os.getpid(), flush=True)
reexec_with_chosen_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def status(key, path="/proc/self/status"):
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
size = 64 << 20
buf = libc.malloc(size)
ctypes.memset(buf, 1, size)
huge_kb = status("AnonHugePages", "/proc/self/smaps_rollup")
rss_kb = status("VmRSS")
libc.free(buf)
kept_kb = status("VmRSS") - (rss_kb - (size >> 10))  # of the buffer, still resident after free
maps = open("/proc/self/maps").read()
jemalloc = "libjemalloc" in maps
print(f"chosen={os.environ.get('T5LITE_MALLOC_CHOSEN')} jemalloc_mapped={jemalloc} "
      f"block_cache_mapped={'/block_cache-' in maps} "
      f"argv={'|'.join(sys.argv[1:])} huge_kb={huge_kb} kept_kb={kept_kb} "
      f"tunables={os.environ.get('GLIBC_TUNABLES', '')}")
"""


def _probe(extra_env: dict[str, str]) -> tuple[int, dict[str, str]]:
    """(number of process images, key=value words of the final line) of the probe run with
    `extra_env`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", hm.CHOICE, hm.CHOSEN,
                        hm.STARTED_WITH)}
    env.update(extra_env, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _PROBE, "a", "--b=c"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    images = {line for line in lines if line.startswith("image")}
    assert len(images) == 1  # one PID, whether or not it re-executed
    words = dict(word.split("=", 1) for word in lines[-1].split())
    return sum(line.startswith("image") for line in lines), words


@needs_madvise_thp
def test_reexec_with_glibc_huge_pages_keeps_pid_and_argv():
    images, words = _probe({hm.CHOICE: "hugepages"})
    assert images == 2 and words["chosen"] == "hugepages" and words["jemalloc_mapped"] == "False"
    assert words["argv"] == "a|--b=c"
    assert int(words["huge_kb"]) >= 32 << 10  # most of the 64 MiB buffer sits on 2 MiB pages

    images, words = _probe({hm.CHOICE: "system"})  # as started: one image, 4 KiB pages
    assert images == 1 and words["chosen"] == "None" and int(words["huge_kb"]) < 32 << 10


def test_reexec_with_glibc_retaining_what_it_frees():
    """`retain`: a freed 64 MiB buffer stays in the process (glibc as it comes gives it back to
    the kernel with munmap)."""
    if (hm.glibc_version() or (0, 0)) < hm.MIN_GLIBC_TUNABLES:
        pytest.skip("needs glibc >= 2.26")
    images, words = _probe({hm.CHOICE: "retain"})
    assert images == 2 and words["chosen"] == "retain" and words["argv"] == "a|--b=c"
    assert "glibc.malloc.mmap_max=0" in words["tunables"]
    assert int(words["kept_kb"]) >= 60 << 10
    images, words = _probe({hm.CHOICE: "system"})
    assert images == 1 and int(words["kept_kb"]) < 4 << 10


@pytest.mark.skipif(not BLOCK_CACHE_BUILDS, reason="needs Linux, glibc and a C compiler")
def test_reexec_with_the_block_cache(tmp_path):
    """`blockcache`: built on first use into T5LITE_NATIVE_DIR, preloaded by the re-exec; a
    freed 64 MiB buffer stays in the process."""
    images, words = _probe({hm.CHOICE: "blockcache", "T5LITE_NATIVE_DIR": str(tmp_path)})
    assert images == 2 and words["chosen"] == "blockcache" and words["argv"] == "a|--b=c"
    assert words["block_cache_mapped"] == "True" and words["jemalloc_mapped"] == "False"
    assert int(words["kept_kb"]) >= 60 << 10
    assert [n for n in os.listdir(tmp_path) if n.endswith(".so")] == [
        os.path.basename(native.library_path(str(tmp_path)))]
    if not JEMALLOC and not hm.has_accelerator():  # what auto takes on this host
        images, words = _probe({"T5LITE_NATIVE_DIR": str(tmp_path)})
        assert images == 2 and words["chosen"] == "blockcache"


@needs_jemalloc
def test_reexec_with_jemalloc_where_installed():
    images, words = _probe({})  # auto, on this CPU host
    expected = "hugepages" if hm.has_accelerator() else "jemalloc"
    assert images == 2 and words["chosen"] == expected
    assert words["jemalloc_mapped"] == str(expected == "jemalloc")
    images, words = _probe({hm.CHOICE: "jemalloc"})
    assert images == 2 and words["chosen"] == "jemalloc" and words["jemalloc_mapped"] == "True"


def test_t5lite_entry_reexecutes_a_library_call_does_not_and_bad_choices_exit_2():
    probe = ("import atexit, os, sys; sys.argv = ['t5lite', '--help']; "
             "atexit.register(lambda: print('CHOSEN', os.environ.get('T5LITE_MALLOC_CHOSEN'))); "
             "from t5lite.cli import main; main({})")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", hm.CHOICE, hm.CHOSEN)}
    env["PYTHONPATH"] = ROOT
    expected = "None"
    if JEMALLOC and not hm.has_accelerator():
        expected = "jemalloc"
    elif BLOCK_CACHE_BUILDS and not hm.has_accelerator():
        expected = "blockcache"
    elif HUGEPAGES_HELP:
        expected = "hugepages"
    for call, chosen in (("", expected), ("sys.argv", "None")):
        out = subprocess.run([sys.executable, "-c", probe.format(call)], env=env,
                             capture_output=True, text=True, timeout=120).stdout
        assert f"CHOSEN {chosen}" in out, out
    proc = subprocess.run([sys.executable, "-c", probe.format("")],
                          env={**env, hm.CHOICE: "fast"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: T5LITE_MALLOC='fast' is not one of auto, jemalloc, blockcache, retain, "
        "hugepages, system; "
        "unset it for the default (auto)."]
