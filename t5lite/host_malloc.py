"""The host's memory allocator for XLA:CPU's step buffers, chosen by a re-exec at start-up.

XLA:CPU allocates its large step buffers (activations, gradients: gigabytes for T5 v1.1-small at
batch 8 × 512) with `malloc` on every step. glibc serves each from a fresh `mmap` and returns it
on `free`, so the kernel zero-fills every page again on the next step: ~3 M minor page faults
per train step, and more when other work in the process (the data pipeline, another framework)
has fragmented free memory in between. Four remedies, measured on a 2-vCPU AMD EPYC VM
(README, Performance, "AMD EPYC (Zen 5): where things stand, and the host allocator"):

- **jemalloc** preloaded with purging off (`MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`):
  freed memory is kept and reused, so after the first step there is little to fault in. The
  float32 Adafactor step alone: 5.41 / 4.54 → 4.00 / 4.45 s; the float32 AdamW step beside
  transformers in one process: 7.78 / 7.98 → 4.02 / 4.23 s. The price is a larger resident set:
  memory freed once is kept for the process's life (peak RSS 4.4 → 4.6-7.0 GiB for that step).
- **glibc's huge pages** (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc ≥ 2.35, where the
  kernel's transparent-huge-page mode is `madvise`): one 2 MiB page per fault instead of 4 KiB,
  the same resident memory. The float32 Adafactor step alone: 4.3 M → 0.25 M faults, 5.41 / 4.54
  → 4.75 / 4.69 s; beside transformers in one process it does not help (7.25 s).
- **t5lite's block cache** (`t5lite/native/block_cache.c`, built with the host's C compiler on
  first use, `t5lite.native`): a small malloc interposer that keeps freed blocks of 256 KiB and
  more, in 8 size classes per power of two, and hands each back to the next request of its
  class with its pages still mapped; smaller requests go to glibc. The same effect as
  jemalloc's for XLA:CPU's step buffers, on any glibc host with a compiler, no package to
  install. Measured 2026-12-08 on the same kind of VM: the float32 Adafactor step alone
  4.20 / 4.25 → 3.52 / 3.72 s (peak RSS 4.3 → 4.7-7.1 GiB); the float32 AdamW step against
  transformers in a separate process 1.20x / 1.17x with huge pages → 1.62x / 1.59x.
- **glibc keeping what it frees** (`T5LITE_MALLOC=retain`; measured 2026-12-07 on the same kind
  of VM, whose kernel hands freed memory back to the host: "Free page reporting enabled"):
  alone no faster (the float32 Adafactor step 4.86 / 5.01 s against 5.10 / 4.81 s with glibc as
  it comes) and its peak RSS doubled (9.0 GiB) in 3 of 4 runs; it pays only when other
  memory-heavy work alternates with t5lite's steps: the AdamW step against transformers running
  in a separate process 1.58x, against 1.05x / 1.20x with huge pages. Never picked by `auto`.

Each must be in place before the process starts (the dynamic loader reads `LD_PRELOAD`, glibc
reads its tunables once), so the `t5lite` command (and the benchmarks) re-execute themselves
once, before JAX is imported: same PID, same command line (`sys.orig_argv`). For the command
this happens in `import t5lite` itself when the process is `t5lite ...` or `python -m
t5lite.cli ...` (`reexec_if_t5lite_command`), since importing the package imports JAX on hosts
with libtpu installed, and again (a no-op by then) in `t5lite.cli.main`. `T5LITE_MALLOC`
chooses:

| `T5LITE_MALLOC` | what the process runs with |
|---|---|
| `auto` (default) | on a host with no accelerator (CPU work is what the step buffers are for; on a TPU / GPU host they are device memory): jemalloc where installed, else t5lite's block cache where it builds; else glibc's huge pages where they help, else the system's malloc |
| `jemalloc` | jemalloc, or an error when no `libjemalloc.so.2` is installed (`apt-get install libjemalloc2`) |
| `blockcache` | t5lite's block cache, or an error naming what is missing (Linux with glibc, a C compiler); `T5LITE_BLOCK_CACHE_MB` caps the freed bytes it keeps resident (default half the machine's memory), `T5LITE_BLOCK_MIN_KB` the smallest block it serves (256) |
| `hugepages` | glibc's huge pages (an error with another C library or glibc < 2.35) |
| `retain` | glibc keeping what it frees (`RETAIN_TUNABLES`: no mmap'd chunks, no trimming, one arena; huge pages too where they help), for hosts without jemalloc; never picked by `auto`, because its resident set can grow well past the step's peak (the float32 step: 4.3 GiB with glibc as it comes, 9.0 GiB in 3 of 4 runs with `retain`) |
| `system` | whatever the process started with: no re-exec |

A preloaded allocator the user chose (`LD_PRELOAD` naming jemalloc, tcmalloc, mimalloc or
t5lite's block cache) or a `glibc.malloc.hugetlb` tunable already set is kept as it is (`retain`
adds its own tunables beside it; `blockcache`, named, is preloaded beside it), and so is a
`MALLOC_CONF` of the user's. The re-executed process carries `T5LITE_MALLOC_CHOSEN` (which one
it got), which also keeps it, and every process it starts, from re-executing again. It also
carries `T5LITE_MALLOC_STARTED_WITH`, the allocator variables as they were before, so
`environment_as_started` can give a child process (another framework's side of a benchmark)
the allocator its user started with.

Example (a CPU host with jemalloc installed)::

    >>> plan = malloc_plan({"T5LITE_MALLOC": "auto"}, thp_mode="madvise", glibc=(2, 36),
    ...                    jemalloc="/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    ...                    accelerator=False)
    >>> plan.name, plan.env["LD_PRELOAD"], plan.env["MALLOC_CONF"]
    ('jemalloc', '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2', 'dirty_decay_ms:-1,muzzy_decay_ms:-1')
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import glob
import json
import os
import sys
from typing import Callable, Mapping

from t5lite.errors import UserError
from t5lite.native import block_cache_library

CHOICE = "T5LITE_MALLOC"
CHOSEN = "T5LITE_MALLOC_CHOSEN"
STARTED_WITH = "T5LITE_MALLOC_STARTED_WITH"  # what the re-exec changed, as it was before
ALLOCATOR_VARIABLES = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF")
CHOICES = ("auto", "jemalloc", "blockcache", "retain", "hugepages", "system")
TUNABLE = "glibc.malloc.hugetlb"
# glibc keeping what it frees: no mmap'd chunks (munmap gives pages back), no trimming of the
# heap's top, one arena (a buffer freed by one thread is reused by the next, whichever it is)
RETAIN_TUNABLES = {"glibc.malloc.mmap_max": "0", "glibc.malloc.trim_threshold": str(1 << 44),
                   "glibc.malloc.arena_max": "1"}
MIN_GLIBC_TUNABLES = (2, 26)
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2",
                  "/usr/local/lib/libjemalloc.so.2")
USER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "block_cache")
ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


@dataclasses.dataclass(frozen=True)
class MallocPlan:
    """The allocator to re-execute with (`name`) and the environment that selects it."""

    name: str
    env: dict[str, str]


def transparent_hugepage_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's THP mode (`always`, `madvise` or `never`: the bracketed word), else None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, None for another C library (musl, macOS, Windows)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError, TypeError):
        return None


def find_jemalloc() -> str | None:
    """The path of an installed `libjemalloc.so.2`, else None."""
    for path in JEMALLOC_PATHS:
        if os.path.isfile(path):
            return path
    name = ctypes.util.find_library("jemalloc")  # e.g. "libjemalloc.so.2", found by the loader
    return name if name and name.startswith("libjemalloc.so") else None


def has_accelerator() -> bool:
    """Whether this host has NVIDIA GPU or TPU device files (JAX would not run on the CPU)."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def malloc_plan(environ: Mapping[str, str], *, thp_mode: str | None,
                glibc: tuple[int, int] | None, jemalloc: str | None,
                accelerator: bool,
                block_cache: Callable[[], str] | None = None) -> MallocPlan | None:
    """What to re-execute with (see the module doc's table), or None to run as started.

    `block_cache` gives the path of t5lite's block cache library, building it if needed, or
    raises UserError where it cannot (`t5lite.native.block_cache_library`); None: not offered.
    It is called only when the plan would use it.

    Raises UserError for a `T5LITE_MALLOC` that is not one of `CHOICES`, or that names an
    allocator this host cannot give.
    """
    choice = environ.get(CHOICE, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise UserError(f"{CHOICE}={environ[CHOICE]!r} is not one of {', '.join(CHOICES)}; "
                        f"unset it for the default (auto).")
    if choice == "system" or environ.get(CHOSEN):
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(lib in preloaded for lib in USER_ALLOCATORS):
        return None  # the user's own allocator
    if TUNABLE in tunables and choice not in ("retain", "blockcache"):
        return None  # the user's own huge-page setting (`retain` adds its tunables beside it,
        # `blockcache` by name preloads beside it)
    hugepages_possible = glibc is not None and glibc >= MIN_GLIBC
    retain_possible = glibc is not None and glibc >= MIN_GLIBC_TUNABLES
    if choice == "jemalloc" and not jemalloc:
        raise UserError(f"{CHOICE}=jemalloc but no libjemalloc.so.2 is installed (looked in "
                        f"{', '.join(JEMALLOC_PATHS)}); install it (Debian/Ubuntu: `apt-get "
                        f"install libjemalloc2`) or unset {CHOICE}.")
    if choice == "hugepages" and not hugepages_possible:
        raise UserError(f"{CHOICE}=hugepages needs glibc >= 2.35 (this C library: "
                        f"{'glibc %d.%d' % glibc if glibc else 'not glibc'}); unset {CHOICE}.")
    if choice == "retain" and not retain_possible:
        raise UserError(f"{CHOICE}=retain needs glibc >= 2.26 (this C library: "
                        f"{'glibc %d.%d' % glibc if glibc else 'not glibc'}); unset {CHOICE}.")
    huge = hugepages_possible and thp_mode == "madvise"  # where the tunable helps
    cache_library = None
    if choice == "blockcache":
        if glibc is None or block_cache is None:
            raise UserError(f"{CHOICE}=blockcache needs Linux with glibc (this C library: "
                            f"{'glibc %d.%d' % glibc if glibc else 'not glibc'}); unset "
                            f"{CHOICE}.")
        cache_library = block_cache()  # raises UserError naming what is missing
    elif choice == "auto" and not jemalloc and not accelerator and glibc and block_cache:
        try:
            cache_library = block_cache()
        except UserError:
            cache_library = None  # no compiler here: huge pages (or nothing) instead
    env = dict(environ)
    if choice == "jemalloc" or (choice == "auto" and jemalloc and not accelerator):
        env["LD_PRELOAD"] = f"{jemalloc}:{preloaded}" if preloaded else str(jemalloc)
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
        name = "jemalloc"
    elif cache_library:
        env["LD_PRELOAD"] = f"{cache_library}:{preloaded}" if preloaded else cache_library
        name = "blockcache"
    elif choice == "retain":
        ours = {**RETAIN_TUNABLES, **({TUNABLE: "1"} if huge else {})}
        env["GLIBC_TUNABLES"] = with_tunables(tunables, ours)
        name = "retain"
    elif choice == "hugepages" or (choice == "auto" and huge):
        env["GLIBC_TUNABLES"] = with_tunables(tunables, {TUNABLE: "1"})
        name = "hugepages"
    else:
        return None
    env[CHOSEN] = name
    env[STARTED_WITH] = json.dumps({k: environ.get(k) for k in ALLOCATOR_VARIABLES})
    return MallocPlan(name, env)


def allocator_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that choose a process's allocator, "" where unset (for benchmark records)."""
    return {k: environ.get(k, "") for k in ALLOCATOR_VARIABLES}


def environment_as_started(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the allocator variables as they were before t5lite's re-exec (and no
    `T5LITE_MALLOC_CHOSEN`): the environment for a child process that should run with the
    allocator its user gave it, e.g. another framework's side of a benchmark.

    >>> plan = malloc_plan({"PATH": "/bin"}, thp_mode="madvise", glibc=(2, 36), jemalloc=None,
    ...                    accelerator=True)
    >>> plan.env["GLIBC_TUNABLES"], environment_as_started(plan.env)
    ('glibc.malloc.hugetlb=1', {'PATH': '/bin'})
    """
    env = {k: v for k, v in environ.items() if k not in (CHOSEN, STARTED_WITH)}
    saved = environ.get(STARTED_WITH)
    if saved:
        for name, value in json.loads(saved).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
    return env


def with_tunables(tunables: str, ours: Mapping[str, str]) -> str:
    """`GLIBC_TUNABLES` with `ours` added, the user's own settings of the same names kept.

    >>> with_tunables("glibc.malloc.arena_max=4", {"glibc.malloc.arena_max": "1",
    ...                                            "glibc.malloc.mmap_max": "0"})
    'glibc.malloc.arena_max=4:glibc.malloc.mmap_max=0'
    """
    given = [t for t in tunables.split(":") if t]
    names = {t.split("=", 1)[0] for t in given}
    return ":".join(given + [f"{k}={v}" for k, v in ours.items() if k not in names])


def is_t5lite_command(orig_argv: list[str]) -> bool:
    """Whether the command line (`sys.orig_argv`) runs the `t5lite` command.

    >>> is_t5lite_command(["/venv/bin/python", "/venv/bin/t5lite", "train"])
    True
    >>> is_t5lite_command(["python", "-u", "-m", "t5lite.cli", "info"])
    True
    >>> is_t5lite_command(["python", "-m", "pytest", "tests", "-m", "t5lite.cli"])
    False
    """
    args = iter(orig_argv[1:])
    for arg in args:  # the interpreter's options, up to the script or module
        if arg == "-m":
            return next(args, "") in ("t5lite.cli", "t5lite")
        if arg == "-c":
            return False
        if arg in ("-X", "-W", "-Q"):
            next(args, None)  # the option's value
        elif not arg.startswith("-"):
            return os.path.basename(arg) == "t5lite"  # the script
    return False


def reexec_if_t5lite_command() -> None:
    """`reexec_with_chosen_malloc()` when this process is the `t5lite` command, else nothing."""
    if is_t5lite_command(list(getattr(sys, "orig_argv", []))):
        reexec_with_chosen_malloc()


def reexec_with_chosen_malloc() -> None:
    """Replace this process by itself with the allocator `T5LITE_MALLOC` asks for (module doc).

    Call it first thing in a program's entry point: the re-executed process starts from scratch
    (same PID, same command line), so work done before the call is done twice. Returns (does
    nothing) when no re-exec is needed; a bad `T5LITE_MALLOC` is one `error:` line and exit 2.
    """
    if os.environ.get(CHOSEN):
        return  # the re-executed process (or one it started): no probing, no ldconfig call
    try:
        plan = malloc_plan(os.environ, thp_mode=transparent_hugepage_mode(),
                           glibc=glibc_version(), jemalloc=find_jemalloc(),
                           accelerator=has_accelerator(), block_cache=block_cache_library)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if plan is None or not getattr(sys, "orig_argv", None) or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], plan.env)
