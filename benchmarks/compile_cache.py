"""What a restart pays to compile its train step, scanned vs unrolled layers, with and without
the persistent compilation cache (`--compilation_cache_dir`).

    python benchmarks/compile_cache.py --model=t5_1_1_small
    python benchmarks/compile_cache.py --model=t5_1_1_large --batch_size=2 \\
        --variants=scanned,unrolled

Every measurement is a fresh process (a restart is one): for each variant, the first process
starts with an empty cache directory ("cold": it compiles and writes the executable), the second
with the same directory ("warm": it loads it). Each child builds the trainer's real step
(`benchmarks/train_step.py`'s `TrainStepBench`), then reports

  lower_s     tracing the model and lowering it to StableHLO (paid on every start: the cache
              holds compiled executables, keyed by the lowered program)
  compile_s   XLA compilation, or loading the executable from the cache
  first_step_s  process start to the end of the first step (imports, state, compile, one step)
  step_s      median of --steps further steps (what the unrolled program costs or saves per
              step; `loss` differs between variants because the scanned and the unrolled model
              draw their initial parameters from different random streams)
  loaded / compiled  programs taken from / not found in the cache

Variants: `scanned` (the default layer scan), `unrolled` (`ModelConfig.scan_layers=False`), and
`unrollN` (`ModelConfig.scan_unroll=N`). Writes benchmarks/results/compile_cache_<model>.json
(or --out) with the CPU model and date.
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
import time

START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

VARIANT_HELP = "comma-separated: scanned, unrolled, unrollN (N layers per scan iteration)"


def variant_bindings(variant: str) -> list[str]:
    """The gin bindings of a variant name (ValueError for an unknown one)."""
    if variant == "scanned":
        return []
    if variant == "unrolled":
        return ["ModelConfig.scan_layers=False"]
    if variant.startswith("unroll") and variant[len("unroll"):].isdigit():
        return [f"ModelConfig.scan_unroll={int(variant[len('unroll'):])}"]
    raise ValueError(f"unknown variant {variant!r}; {VARIANT_HELP}")


def child(args: argparse.Namespace) -> None:
    """One process: enable the cache, build, lower, compile, step; print one RESULT line."""
    from t5lite import compile_cache

    compile_cache.enable(args.cache_dir)
    from train_step import PRESETS, TrainStepBench, model_config_from_gin

    cfg = model_config_from_gin([args.gin_file or PRESETS[args.model]],
                                variant_bindings(args.variant))
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    bench = TrainStepBench(cfg, batch_size=args.batch_size, inputs_length=args.inputs_length,
                           targets_length=args.targets_length)
    lower_s, compile_s = bench.lower_and_compile()
    counts = compile_cache.counts()  # the step's own compile; steps below compile no program
    bench.step()
    first_step_s = time.perf_counter() - START
    times = bench.time_steps(args.steps)
    print("RESULT " + json.dumps({
        "lower_s": lower_s, "compile_s": compile_s, "first_step_s": first_step_s,
        "step_s": statistics.median(times) if times else None, "loss": bench.last_loss,
        **counts}), flush=True)


def measure(args: argparse.Namespace, variant: str, cache_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--variant={variant}",
           f"--cache_dir={cache_dir}", f"--model={args.model}",
           f"--batch_size={args.batch_size}", f"--inputs_length={args.inputs_length}",
           f"--targets_length={args.targets_length}", f"--steps={args.steps}"]
    cmd += [f"--gin_file={args.gin_file}"] if args.gin_file else []
    cmd += [f"--dtype={args.dtype}"] if args.dtype else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the {variant} child failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "process_s": wall}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t5_1_1_small",
                        help="a preset of benchmarks/train_step.py (default t5_1_1_small)")
    parser.add_argument("--gin_file", default=None, help="a model gin file instead of --model")
    parser.add_argument("--variants", default="scanned,unrolled", help=VARIANT_HELP)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="scanned", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return None

    from train_step import PRESETS, machine, write_result

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        for v in variants:
            variant_bindings(v)
    except ValueError as e:
        parser.error(str(e))
    if args.gin_file is None and args.model not in PRESETS:
        parser.error(f"unknown --model {args.model!r}; presets: {', '.join(sorted(PRESETS))}")
    where = machine()
    print(f"{args.gin_file or args.model}, batch {args.batch_size} "
          f"{args.inputs_length}/{args.targets_length}; {where['cpu_model']}, "
          f"{where['cpus']} CPUs, load average {where['load_average_1min']}", flush=True)
    rows = {}
    for variant in variants:
        with tempfile.TemporaryDirectory(prefix="t5lite-xla-cache-") as cache_dir:
            rows[variant] = {phase: measure(args, variant, cache_dir)
                             for phase in ("cold", "warm")}
        for phase, r in rows[variant].items():
            step = f"{r['step_s']:.2f} s" if r["step_s"] is not None else "n/a"
            print(f"{variant:>9} {phase}: lower {r['lower_s']:6.1f} s, compile "
                  f"{r['compile_s']:6.1f} s ({r['loaded']} loaded, {r['compiled']} compiled), "
                  f"first step after {r['first_step_s']:6.1f} s, step {step}", flush=True)
    result = {
        "model": args.gin_file or args.model, "batch_size": args.batch_size,
        "inputs_length": args.inputs_length, "targets_length": args.targets_length,
        "dtype": args.dtype, "rows": rows, "machine": {**where,
                                                       "load_average_after": os.getloadavg()[0]},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/compile_cache.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
    }
    name = os.path.splitext(os.path.basename(args.gin_file))[0] if args.gin_file else args.model
    write_result(result, args.out or os.path.join(ROOT, "benchmarks", "results",
                                                  f"compile_cache_{name}.json"))
    return result


if __name__ == "__main__":
    main()
