"""Attention cores on CPU: blocked vs whole-tensor einsums vs jax.nn.dot_product_attention.

T5 v1.1-small shapes (6 heads of 64, batch 8): encoder self-attention 512x512 with padding mask
and relative bias, decoder self-attention 114x114 causal with relative bias, cross-attention
114x512 with the padding mask. Times the three attentions, forward alone and forward + backward
(gradients of q, k and the relative biases), in float32 and bfloat16; median of `--repeats`.

Cores: "blocked" (`t5lite.models.blocked_attention`, what `attention_impl="einsum"` runs on one
CPU device), "einsum" (`einsum_attention_core`, the whole-tensor form it runs elsewhere) and
"xla" (`jax.nn.dot_product_attention(implementation="xla")`); "torch_sdpa" is the reference
PyTorch reaches on the same CPU (`torch.nn.functional.scaled_dot_product_attention` with the
bias and mask as one additive mask, its fused CPU kernel where it applies), when torch is
installed.

    .venv/bin/python benchmarks/attention_impl.py [--repeats=5] [--out=FILE.json]
    .venv/bin/python benchmarks/attention_impl.py --model_rounds=3   # + whole-model A/B

`--model_rounds=N` also times T5 v1.1-small's Adafactor train step (batch 8, 512/114) and its
encoder pass (batch 8 x 512) with the blocked core on and off (the einsum core everywhere),
alternating N times in one process, in both dtypes, and reports the train step's compiled
temporary memory for each.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_info import cpu_model  # noqa: E402
from timing import median_seconds  # noqa: E402

from t5lite.models.attention import attention_core, einsum_attention_core  # noqa: E402
from t5lite.models.blocked_attention import blocked_attention_core  # noqa: E402

CORES = {
    "blocked": blocked_attention_core,
    "einsum": einsum_attention_core,
    "xla": lambda q, k, v, *, bias, mask: attention_core(q, k, v, bias=bias, mask=mask,
                                                         impl="xla"),
}


def bench(core_name: str, dtype, repeats: int = 5) -> dict:
    """Median seconds of the forward pass and of forward + backward for one core."""
    if core_name in REFERENCES:
        return REFERENCES[core_name](dtype, repeats)
    core = CORES[core_name]
    b, n, h, s, t = 8, 6, 64, 512, 114
    ks = jax.random.split(jax.random.key(0), 6)
    qe = jax.random.normal(ks[0], (b, s, n, h), dtype)
    ke = jax.random.normal(ks[1], (b, s, n, h), dtype)
    qd = jax.random.normal(ks[2], (b, t, n, h), dtype)
    kd = jax.random.normal(ks[3], (b, t, n, h), dtype)
    bias_e = jax.random.normal(ks[4], (1, n, s, s), jnp.float32)
    bias_d = jax.random.normal(ks[5], (1, n, t, t), jnp.float32)
    valid = jnp.arange(s)[None, :] < jnp.array([512, 400, 300, 512, 256, 480, 512, 100])[:, None]
    enc_mask = valid[:, None, None, :]
    causal = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None, None]

    def loss(qe, ke, qd, kd, bias_e, bias_d):
        e = core(qe, ke, ke, bias=bias_e, mask=enc_mask)
        d = core(qd, kd, kd, bias=bias_d, mask=causal)
        c = core(qd, e, e, bias=None, mask=enc_mask)
        return (jnp.sum(e.astype(jnp.float32)) + jnp.sum(d.astype(jnp.float32))
                + jnp.sum(c.astype(jnp.float32)))

    args = (qe, ke, qd, kd, bias_e, bias_d)
    forward, forward_backward = jax.jit(loss), jax.jit(jax.value_and_grad(loss, range(6)))
    return {"forward_s": median_seconds(lambda: jax.block_until_ready(forward(*args)), repeats),
            "forward_backward_s": median_seconds(
                lambda: jax.block_until_ready(forward_backward(*args)), repeats)}


def bench_torch(dtype, repeats: int = 5) -> dict:
    """`bench`'s three attentions through PyTorch's scaled_dot_product_attention."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    tdtype = torch.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else torch.float32
    b, n, h, s, t = 8, 6, 64, 512, 114
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dt=tdtype):
        return torch.randn(*shape, generator=gen).to(dt).requires_grad_()

    qe, ke, qd, kd = randn(b, n, s, h), randn(b, n, s, h), randn(b, n, t, h), randn(b, n, t, h)
    bias_e, bias_d = randn(1, n, s, s, dt=torch.float32), randn(1, n, t, t, dt=torch.float32)
    lengths = torch.tensor([512, 400, 300, 512, 256, 480, 512, 100])
    pad = torch.where(torch.arange(s)[None, :] < lengths[:, None], 0.0, -1e9)[:, None, None, :]
    causal = torch.from_numpy(np.where(np.tril(np.ones((t, t), bool)), 0.0, -1e9)
                              .astype(np.float32))[None, None]

    def loss():
        e = F.scaled_dot_product_attention(qe, ke, ke, attn_mask=(bias_e + pad).to(tdtype),
                                           scale=1.0)
        d = F.scaled_dot_product_attention(qd, kd, kd, attn_mask=(bias_d + causal).to(tdtype),
                                           scale=1.0)
        c = F.scaled_dot_product_attention(qd, e, e, attn_mask=pad.to(tdtype), scale=1.0)
        return e.float().sum() + d.float().sum() + c.float().sum()

    def forward():
        with torch.no_grad():
            loss()

    def forward_backward():
        torch.autograd.grad(loss(), (qe, ke, qd, kd, bias_e, bias_d))

    return {"forward_s": median_seconds(forward, repeats),
            "forward_backward_s": median_seconds(forward_backward, repeats)}


# other frameworks' attention on the same shapes, for reference (need their packages)
REFERENCES = {"torch_sdpa": bench_torch}
OPTIONAL_PACKAGE = {"torch_sdpa": "torch"}


def model_ab(dtype: str, rounds: int) -> dict:
    """Median train-step and encoder-pass seconds of T5 v1.1-small, blocked core on vs off, and
    the train step's compiled temporary memory (XLA's `memory_analysis`)."""
    import numpy as np
    from flax import nnx
    from train_step import TrainStepBench, model_config_from_gin

    from t5lite.models import attention, build_model

    cfg = model_config_from_gin(["gin/models/t5_1_1/small.gin"]).replace(dtype=dtype)
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 32000, size=(8, 512)), jnp.int32)
    saved = attention._BLOCKED_MIN_LOGITS
    runs, memory = {}, {}
    try:  # the choice of core is made while tracing: trace each variant with its setting
        for name, threshold in (("blocked", saved), ("einsum", 1 << 62)):
            attention._BLOCKED_MIN_LOGITS = threshold
            bench = TrainStepBench(cfg, batch_size=8, inputs_length=512, targets_length=114)
            bench.compile()
            bench.time_steps(1)
            encode = jax.jit(lambda st, t: nnx.merge(graphdef, st).encode(t))
            jax.block_until_ready(encode(state, tokens))
            runs[name] = (bench, encode)
            memory[name] = bench.compiled.memory_analysis().temp_size_in_bytes / 2**20
    finally:
        attention._BLOCKED_MIN_LOGITS = saved
    times: dict = {name: {"train_step_s": [], "encoder_s": []} for name in runs}
    for _ in range(rounds):
        for name, (bench, encode) in runs.items():
            times[name]["train_step_s"] += bench.time_steps(1)
            start = time.perf_counter()
            jax.block_until_ready(encode(state, tokens))
            times[name]["encoder_s"].append(time.perf_counter() - start)
    return {name: {"train_step_temp_mib": memory[name],
                   **{k: statistics.median(v) for k, v in t.items()},
                   **{k.replace("_s", "_times_s"): v for k, v in t.items()}}
            for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cores", default="blocked,einsum,xla,torch_sdpa",
                        help="torch_sdpa is skipped when torch is not installed")
    parser.add_argument("--model_rounds", type=int, default=0,
                        help="also A/B the whole model's train step and encoder (N rounds)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    cores = args.cores.split(",")
    cores = [c for c in cores if importlib.util.find_spec(OPTIONAL_PACKAGE.get(c, "jax"))]
    if unknown := sorted(set(cores) - set(CORES) - set(REFERENCES)):
        raise SystemExit(f"error: unknown core(s) {', '.join(unknown)}; use some of "
                         f"{', '.join([*CORES, *REFERENCES])}")
    machine = {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__,
               "load_average_1min": round(os.getloadavg()[0], 2),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"{machine['cpu_model']}, {machine['cpus']} CPUs, jax {jax.__version__}, load average "
          f"{machine['load_average_1min']}")
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        for core in cores:
            r = {"dtype": jnp.dtype(dtype).name, "core": core, **bench(core, dtype, args.repeats)}
            rows.append(r)
            print(f"{r['dtype']:9s} {core:10s} forward {r['forward_s'] * 1e3:7.1f} ms   "
                  f"forward+backward {r['forward_backward_s'] * 1e3:7.1f} ms", flush=True)
    models = {}
    for dtype in ("float32", "bfloat16") if args.model_rounds else ():
        models[dtype] = r = model_ab(dtype, args.model_rounds)
        for what in ("train_step_s", "encoder_s"):
            print(f"{dtype:9s} T5 v1.1-small {what[:-2].replace('_', ' '):10s} blocked "
                  f"{r['blocked'][what]:6.3f} s, einsum {r['einsum'][what]:6.3f} s: "
                  f"{r['einsum'][what] / r['blocked'][what]:.2f}x", flush=True)
        print(f"{dtype:9s} T5 v1.1-small train step compiled temporaries: blocked "
              f"{r['blocked']['train_step_temp_mib']:.0f} MiB, einsum "
              f"{r['einsum']['train_step_temp_mib']:.0f} MiB")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"benchmark": "attention_impl", "machine": machine, "results": rows,
                       "model_ab": models,
                       "command": "python benchmarks/attention_impl.py " + " ".join(
                           sys.argv[1:] if argv is None else argv)}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
