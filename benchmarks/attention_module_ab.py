"""The blocked attention core of this checkout against the same module at another git revision,
in one process, alternating: the way to measure a change to `t5lite/models/blocked_attention.py`.

    python benchmarks/attention_module_ab.py --rev=4db88a3          # encoder self-attention
    python benchmarks/attention_module_ab.py --rev=HEAD~1 --batch=8 --length=512 --heads=6
    python benchmarks/attention_module_ab.py --rev=4db88a3 --backward   # + gradients

The old module is read with `git show REV:t5lite/models/blocked_attention.py` and imported
beside the current one. Both run T5 v1.1-small's encoder self-attention shapes by default (one
layer: batch 8 x 512, 6 heads of 64, a [1, heads, T, S] relative bias shared by the rows and a
per-row key padding mask with one padded row), forward only, jitted, in float32 and bfloat16.
Reported per dtype: the median seconds of each version over `--repeats` alternating calls and
the largest difference between their outputs. JSON to `--out` when given.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from train_step import machine, write_result  # noqa: E402

MODULE = "t5lite/models/blocked_attention.py"


def module_at(rev: str):
    """The blocked attention module as it was at git revision `rev`."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{MODULE}"], check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"blocked_attention_at_{rev}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def compare(old_core, new_core, *, batch: int, length: int, heads: int, head_dim: int,
            repeats: int, dtypes=("float32", "bfloat16"), backward: bool = False) -> dict:
    """{dtype: {"before_s", "after_s", "before_times_s", "after_times_s", "max_abs_diff"}}.
    backward=True times the gradients of sum(out * w) with respect to q, k, v and the bias
    (forward and backward pass) and compares the gradients instead of the outputs."""
    keys = jax.random.split(jax.random.key(0), 4)
    results = {}
    for name in dtypes:
        dtype = jnp.dtype(name)
        q, k = (0.3 * jax.random.normal(key, (batch, length, heads, head_dim)) for key in keys[:2])
        v = jax.random.normal(keys[2], (batch, length, heads, head_dim))
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
        bias = jax.random.normal(keys[3], (1, heads, length, length))
        mask = jnp.ones((batch, 1, 1, length), bool).at[min(1, batch - 1), :, :,
                                                       length * 3 // 4:].set(False)
        weights = jax.random.normal(keys[0], q.shape).astype(dtype)

        def run(core, q, k, v, b, m):
            if not backward:
                return core(q, k, v, bias=b, mask=m)
            loss = lambda q, k, v, b: jnp.sum(  # noqa: E731
                (core(q, k, v, bias=b, mask=m) * weights).astype(jnp.float32))
            return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, b)

        fns = {side: jax.jit(lambda *a, core=core: run(core, *a))
               for side, core in (("before", old_core), ("after", new_core))}
        outs = {side: jax.block_until_ready(fn(q, k, v, bias, mask)) for side, fn in fns.items()}
        times = {side: [] for side in fns}
        for _ in range(repeats):
            for side, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(q, k, v, bias, mask))
                times[side].append(time.perf_counter() - start)
        diff = max(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                   for a, b in zip(jax.tree.leaves(outs["before"]),
                                   jax.tree.leaves(outs["after"])))
        results[name] = {"before_s": statistics.median(times["before"]),
                         "after_s": statistics.median(times["after"]),
                         "before_times_s": times["before"], "after_times_s": times["after"],
                         "max_abs_diff": float(diff)}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", required=True, help="git revision of the 'before' module")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--backward", action="store_true",
                        help="time forward + backward (gradients of q, k, v and the bias)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from t5lite.models.blocked_attention import blocked_attention_core

    where = machine()
    print(f"{where['cpu_model']}, {where['cpus']} CPUs, load average "
          f"{where['load_average_1min']}; before = {args.rev}, after = this checkout; "
          f"{'forward + backward' if args.backward else 'forward'}",
          flush=True)
    results = compare(module_at(args.rev).blocked_attention_core, blocked_attention_core,
                      batch=args.batch, length=args.length, heads=args.heads,
                      head_dim=args.head_dim, repeats=args.repeats, backward=args.backward)
    for name, r in results.items():
        print(f"{name:9s} before {r['before_s'] * 1e3:7.2f} ms   after {r['after_s'] * 1e3:7.2f} ms"
              f"   ({r['before_s'] / r['after_s']:.2f}x; results differ by at most "
              f"{r['max_abs_diff']:.2e})", flush=True)
    result = {"benchmark": "attention_module_ab", "rev": args.rev, "batch": args.batch,
              "length": args.length, "heads": args.heads, "head_dim": args.head_dim,
              "backward": args.backward,
              "machine": where, "results": results}
    if args.out:
        write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
