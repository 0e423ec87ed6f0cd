"""Measured matmul peak of this machine's default JAX device, the MFU reference on CPU.

The peak is the best FLOP/s of a few square `jnp.dot` sizes in one dtype (median of several
timed runs each, after a warm-up). On accelerators with a published peak, MFU uses that instead.

    python benchmarks/matmul_peak.py --dtype=float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

DEFAULT_SIZES = (512, 1024, 2048, 3072)


def time_call(fn, *args, repeats: int = 5, inner: int = 1) -> float:
    """Median wall seconds of one `fn(*args)`, after one warm-up call.

    Each of the `repeats` samples dispatches `inner` calls back to back and blocks on the last,
    so that on an accelerator (asynchronous dispatch) the host's per-call overhead is hidden.
    """
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def matmul_peak(dtype: str = "float32", sizes=DEFAULT_SIZES, repeats: int = 5) -> dict:
    """{"dtype", "flops_per_sec", "best_size", "by_size": {n: flop/s}} for square matmuls.

    On accelerators each sample is 10 back-to-back products (see `time_call`).
    """
    dot = jax.jit(jnp.dot)
    by_size = {}
    for n in sizes:
        key_a, key_b = jax.random.split(jax.random.key(n))
        a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
        inner = 1 if jax.devices()[0].platform == "cpu" else 10
        seconds = time_call(dot, a, b, repeats=repeats, inner=inner)
        by_size[n] = 2.0 * n**3 / seconds
    best = max(by_size, key=by_size.get)
    return {"dtype": dtype, "flops_per_sec": by_size[best], "best_size": best,
            "by_size": by_size, "device": str(jax.devices()[0].device_kind)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    result = matmul_peak(args.dtype)
    print(json.dumps({**result, "by_size": {str(k): v for k, v in result["by_size"].items()}},
                     indent=2))


if __name__ == "__main__":
    main()
