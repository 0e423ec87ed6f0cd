"""Attention core on CPU: einsum path vs jax.nn.dot_product_attention (implementation='xla').

T5-small shapes (6 heads of 64, batch 8): encoder self-attention 512x512 with padding mask and
relative bias, decoder self-attention 114x114 causal, cross-attention 114x512. Times forward +
backward of the three attentions in float32 and bfloat16 (median of repeated runs).

    .venv/bin/python benchmarks/attention_impl.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from t5lite.models.attention import attention_core


def bench(impl: str, dtype, repeats: int = 5) -> float:
    key = jax.random.key(0)
    b, n, h, s, t = 8, 6, 64, 512, 114
    ks = jax.random.split(key, 6)
    qe = jax.random.normal(ks[0], (b, s, n, h), dtype)
    ke = jax.random.normal(ks[1], (b, s, n, h), dtype)
    qd = jax.random.normal(ks[2], (b, t, n, h), dtype)
    kd = jax.random.normal(ks[3], (b, t, n, h), dtype)
    bias_e = jax.random.normal(ks[4], (1, n, s, s), jnp.float32)
    bias_d = jax.random.normal(ks[5], (1, n, t, t), jnp.float32)
    valid = jnp.arange(s)[None, :] < jnp.array([512, 400, 300, 512, 256, 480, 512, 100])[:, None]
    enc_mask = valid[:, None, None, :]
    causal = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None, None]

    def loss(qe, ke, qd, kd):
        e = attention_core(qe, ke, ke, bias=bias_e, mask=enc_mask, impl=impl)
        d = attention_core(qd, kd, kd, bias=bias_d, mask=causal, impl=impl)
        c = attention_core(qd, e, e, bias=None, mask=enc_mask, impl=impl)
        return (jnp.sum(e.astype(jnp.float32)) + jnp.sum(d.astype(jnp.float32))
                + jnp.sum(c.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    jax.block_until_ready(step(qe, ke, qd, kd))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(qe, ke, qd, kd))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    for dtype in (jnp.float32, jnp.bfloat16):
        for impl in ("einsum", "xla"):
            print(f"{jnp.dtype(dtype).name:9s} {impl:7s} fwd+bwd {bench(impl, dtype) * 1e3:8.1f} ms")
