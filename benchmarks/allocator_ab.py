"""The CPU train step with glibc's default malloc, huge-page malloc and a caching allocator.

    python benchmarks/allocator_ab.py --rounds=2                        # finds libjemalloc.so.2
    python benchmarks/allocator_ab.py --preload=/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4
    python benchmarks/allocator_ab.py --preload=none                    # no preloaded variant

XLA:CPU allocates its large step buffers fresh on every step; with glibc's malloc they are
`mmap`ed and returned, so the kernel zero-fills every page again (millions of minor page faults
per step, see the README's CPU notes). Four ways around it, one fresh process each (the
allocator must be chosen before Python starts), alternating in every round:

- `default`: glibc as it comes (`T5LITE_MALLOC=system`, so train_step.py does not re-exec);
- `hugepages`: glibc with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`;
- `retain`: glibc keeping what it frees (`host_malloc.RETAIN_TUNABLES`: no mmap'd chunks, no
  trimming, one arena), with the huge-page tunable too, as `T5LITE_MALLOC=retain` sets them;
- `blockcache`: t5lite's block cache (`t5lite/native/block_cache.c`, built here with the C
  compiler; `T5LITE_MALLOC=blockcache`), left out where it cannot be built;
- `preloaded`: a caching allocator that keeps freed memory (jemalloc with
  `dirty_decay_ms:-1,muzzy_decay_ms:-1`, the default `--malloc_conf`), at the price of a larger
  resident set; left out when none is installed and `--preload` is not given.

The `t5lite` command picks one of these for itself (t5lite/host_malloc.py, `T5LITE_MALLOC`).

Each runs `benchmarks/train_step.py` and records its median step time with the child's minor
page faults, system CPU time and peak RSS (`os.wait4`). Writes benchmarks/results/allocator_ab.json
(or --out) with the CPU model; `speedup` maps each variant to default's step time over its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from t5lite.errors import UserError  # noqa: E402
from t5lite.host_malloc import (  # noqa: E402  (no JAX import)
    CHOICE, JEMALLOC_CONF as DEFAULT_MALLOC_CONF, JEMALLOC_PATHS, RETAIN_TUNABLES, TUNABLE,
    with_tunables)
from t5lite.native import block_cache_library  # noqa: E402

CANDIDATES = (*JEMALLOC_PATHS, "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
              "/usr/lib64/libtcmalloc.so.4")


def fail(message: str) -> None:
    """Bad input: one `error:` line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def find_allocator(path: str | None) -> str | None:
    """The library to preload: `path` if given ("none": no library), else the first installed
    candidate, else None (that variant is then left out)."""
    if path == "none":
        return None
    if path:
        if not os.path.isfile(path):
            fail(f"--preload={path!r} does not exist; pass the path of a caching allocator's "
                 "shared library (e.g. libjemalloc.so.2).")
        return path
    for candidate in CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    print(f"no caching allocator found (looked for {', '.join(CANDIDATES)}): timing glibc only "
          "(Debian/Ubuntu: `apt-get install libjemalloc2`, or pass --preload=PATH)", flush=True)
    return None


def allocator_env(preload: str | None, malloc_conf: str, *,
                  tunables: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the parent's with no allocator choice of its own, plus
    LD_PRELOAD (and jemalloc's MALLOC_CONF), or glibc `tunables`."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.pop("GLIBC_TUNABLES", None)
    env[CHOICE] = "system"  # train_step.py would otherwise re-exec with its own choice
    if tunables:
        env["GLIBC_TUNABLES"] = with_tunables("", tunables)
    if preload:
        env["LD_PRELOAD"] = preload
        if "jemalloc" in os.path.basename(preload) and malloc_conf:
            env["MALLOC_CONF"] = malloc_conf
    return env


def run_once(step_args: list[str], env: dict[str, str]) -> dict:
    """One train_step.py process: its JSON result plus the child's resource use."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), *step_args,
               "--no_peak", f"--out={out}"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        stderr = proc.stderr.read() if proc.stderr else ""
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"error: train_step.py failed ({proc.returncode}):\n{stderr[-2000:]}")
        with open(out) as f:
            result = json.load(f)
    return {"step_s": result["step_s"], "minor_faults": usage.ru_minflt,
            "system_s": usage.ru_stime, "user_s": usage.ru_utime,
            "max_rss_mib": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preload", default=None,
                        help="allocator library (default: found; 'none': glibc variants only)")
    parser.add_argument("--malloc_conf", default=DEFAULT_MALLOC_CONF,
                        help="MALLOC_CONF for jemalloc ('' = its defaults)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--step_args", default="--steps=3 --warmup=1",
                        help="more train_step.py arguments (default T5 v1.1-small, batch 8)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "allocator_ab.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        fail(f"--rounds={args.rounds} must be at least 1.")
    preload = find_allocator(args.preload)
    from train_step import machine  # noqa: E402  (after the argument checks: imports jax)

    step_args = [f"--dtype={args.dtype}", *args.step_args.split()]
    variants = {"default": allocator_env(None, ""),
                "hugepages": allocator_env(None, "", tunables={TUNABLE: "1"}),
                "retain": allocator_env(None, "", tunables={**RETAIN_TUNABLES, TUNABLE: "1"})}
    try:
        variants["blockcache"] = allocator_env(block_cache_library(), "")
    except UserError as e:
        print(f"no block cache variant: {e}", flush=True)
    if preload:
        variants["preloaded"] = allocator_env(preload, args.malloc_conf)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, env in variants.items():
            res = run_once(step_args, env)
            runs[name].append(res)
            print(f"round {r + 1} {name:9s}: {res['step_s']:.3f} s/step, "
                  f"{res['minor_faults'] / 1e6:.2f} M minor faults, system {res['system_s']:.1f} s,"
                  f" peak RSS {res['max_rss_mib']:.0f} MiB", flush=True)
    summary = {name: {"step_s": statistics.median(r["step_s"] for r in rs),
                      "minor_faults": statistics.median(r["minor_faults"] for r in rs),
                      "max_rss_mib": max(r["max_rss_mib"] for r in rs)}
               for name, rs in runs.items()}
    speedup = {name: summary["default"]["step_s"] / summary[name]["step_s"] for name in runs}
    where = machine()
    print(f"{where.get('cpu_model')}: " + ", ".join(
        f"{name} {summary[name]['step_s']:.3f} s ({speedup[name]:.2f}x)" for name in runs),
        flush=True)
    result = {"benchmark": "allocator_ab", "preload": preload,
              "malloc_conf": args.malloc_conf, "step_args": step_args, "runs": runs,
              "summary": summary, "speedup": speedup, "machine": where,
              "command": "python benchmarks/allocator_ab.py " + " ".join(argv or sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
