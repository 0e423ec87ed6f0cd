"""A plain JAX T5 v1.1 train step, timed alternately with t5lite's: the MFU reference point.

    .venv/bin/python benchmarks/plain_jax_t5.py --rounds=3          # T5 v1.1-small, batch 8

The plain model is the textbook one in ~70 lines: Python loops over unscanned layers, dense
matmuls on `[B, T, d]` activations, float32 softmax attention with a relative-position bias
(bucketed as in T5) and a causal mask, gated-GELU (tanh), RMSNorm, untied output layer,
mean token cross-entropy, and a plain SGD update (`w - lr * g`, the cheapest optimiser, so any
gap to t5lite is in the model, not the update). No custom gradients, no layout tricks.

Both steps see the same full-length synthetic batch (512 inputs / 114 targets by default) and are
timed one after the other in each round (medians reported), with the same model-FLOP count
(`t5lite.train.flops`) and the best `jnp.dot` rate measured in the same run, so the two MFUs are
directly comparable. Writes benchmarks/results/plain_jax_t5.json.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

if __name__ == "__main__":  # the allocator the `t5lite` command runs with (t5lite/host_malloc.py)
    from t5lite.host_malloc import reexec_with_chosen_malloc

    reexec_with_chosen_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from t5lite.config import ModelConfig  # noqa: E402
from train_step import (TrainStepBench, machine, model_config_from_gin, peak_flops,  # noqa: E402
                        synthetic_batch, write_result)


def relative_bucket(relative: jax.Array, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> jax.Array:
    """T5's log-spaced relative-position buckets (memory position minus query position)."""
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = (relative > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = jnp.maximum(-relative, 0)
    exact = num_buckets // 2
    scaled = exact + (jnp.log(jnp.maximum(distance, 1) / exact)
                      / math.log(max_distance / exact) * (num_buckets - exact)).astype(jnp.int32)
    return offset + jnp.where(distance < exact, distance, jnp.minimum(scaled, num_buckets - 1))


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    d, f, inner = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.head_dim
    keys = iter(jax.random.split(key, 64 * (cfg.num_encoder_layers + cfg.num_decoder_layers)))

    def normal(shape, scale):
        return jax.random.normal(next(keys), shape, jnp.float32) * scale

    def attention():
        return {"q": normal((d, inner), (d * cfg.head_dim) ** -0.5),
                "k": normal((d, inner), d ** -0.5), "v": normal((d, inner), d ** -0.5),
                "o": normal((inner, d), inner ** -0.5)}

    def mlp():
        return {"wi_0": normal((d, f), d ** -0.5), "wi_1": normal((d, f), d ** -0.5),
                "wo": normal((f, d), f ** -0.5)}

    def ones():  # a fresh buffer each (the step donates its parameters)
        return jnp.ones((d,), jnp.float32)

    return {
        "embed": normal((cfg.vocab_size, d), 1.0),
        "lm_head": normal((d, cfg.vocab_size), d ** -0.5),
        "enc_bias": normal((cfg.relative_num_buckets, cfg.num_heads), 0.1),
        "dec_bias": normal((cfg.relative_num_buckets, cfg.num_heads), 0.1),
        "enc_norm": ones(), "dec_norm": ones(),
        "encoder": [{"norm1": ones(), "attn": attention(), "norm2": ones(), "mlp": mlp()}
                    for _ in range(cfg.num_encoder_layers)],
        "decoder": [{"norm1": ones(), "self": attention(), "norm2": ones(), "cross": attention(),
                     "norm3": ones(), "mlp": mlp()} for _ in range(cfg.num_decoder_layers)],
    }


def make_loss(cfg: ModelConfig):
    heads, head_dim = cfg.num_heads, cfg.head_dim

    def norm(x, scale):
        variance = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(variance + cfg.layer_norm_eps) * scale

    def attend(p, x, memory, bias, mask):
        b, t, _ = x.shape
        s = memory.shape[1]
        q = (x @ p["q"]).reshape(b, t, heads, head_dim)
        k = (memory @ p["k"]).reshape(b, s, heads, head_dim)
        v = (memory @ p["v"]).reshape(b, s, heads, head_dim)
        logits = jnp.einsum("btnh,bsnh->bnts", q, k)
        if bias is not None:
            logits = logits + bias
        if mask is not None:
            logits = jnp.where(mask, logits, -1e9)
        out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
        return out.reshape(b, t, heads * head_dim) @ p["o"]

    def feed_forward(p, x):
        return (jax.nn.gelu(x @ p["wi_0"], approximate=True) * (x @ p["wi_1"])) @ p["wo"]

    def position_bias(table, length, bidirectional):
        pos = jnp.arange(length)
        buckets = relative_bucket(pos[None, :] - pos[:, None], bidirectional,
                                  cfg.relative_num_buckets, cfg.relative_max_distance)
        return table[buckets].transpose(2, 0, 1)[None]  # [1, heads, q, k]

    def loss(params, inputs, decoder_inputs, targets):
        x = params["embed"][inputs]
        enc_bias = position_bias(params["enc_bias"], inputs.shape[1], True)
        for p in params["encoder"]:
            h = norm(x, p["norm1"])
            x = x + attend(p["attn"], h, h, enc_bias, None)
            x = x + feed_forward(p["mlp"], norm(x, p["norm2"]))
        memory = norm(x, params["enc_norm"])
        y = params["embed"][decoder_inputs]
        length = decoder_inputs.shape[1]
        dec_bias = position_bias(params["dec_bias"], length, False)
        causal = (jnp.arange(length)[None, :] <= jnp.arange(length)[:, None])[None, None]
        for p in params["decoder"]:
            h = norm(y, p["norm1"])
            y = y + attend(p["self"], h, h, dec_bias, causal)
            y = y + attend(p["cross"], norm(y, p["norm2"]), memory, None, None)
            y = y + feed_forward(p["mlp"], norm(y, p["norm3"]))
        logits = norm(y, params["dec_norm"]) @ params["lm_head"]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))

    return loss


def make_plain_step(cfg: ModelConfig, learning_rate: float = 1e-3):
    loss = make_loss(cfg)

    def step(params, inputs, decoder_inputs, targets):
        value, grads = jax.value_and_grad(loss)(params, inputs, decoder_inputs, targets)
        return jax.tree.map(lambda w, g: w - learning_rate * g, params, grads), value

    return jax.jit(step, donate_argnums=(0,))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", default="gin/models/t5_1_1/small.gin")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "plain_jax_t5.json"))
    args = parser.parse_args(argv)

    cfg = model_config_from_gin([args.gin_file]).replace(dtype="float32")
    b, s, t = args.batch_size, args.inputs_length, args.targets_length
    t5lite = TrainStepBench(cfg, batch_size=b, inputs_length=s, targets_length=t)
    host = synthetic_batch(b, s, t, cfg.vocab_size)
    batch = [jnp.asarray(host[k]) for k in ("encoder_input_tokens", "decoder_input_tokens",
                                            "decoder_target_tokens")]
    plain = make_plain_step(cfg)
    params = init_params(cfg, jax.random.key(0))

    start = time.perf_counter()
    t5lite.compile()
    t5lite_compile = time.perf_counter() - start
    start = time.perf_counter()
    params, loss = plain(params, *batch)
    jax.block_until_ready(loss)
    plain_compile = time.perf_counter() - start
    t5lite.step()  # warm-up
    times: dict[str, list[float]] = {"t5lite": [], "plain": []}
    for r in range(args.rounds):
        times["t5lite"] += t5lite.time_steps(1)
        start = time.perf_counter()
        params, loss = plain(params, *batch)
        jax.block_until_ready(loss)
        times["plain"].append(time.perf_counter() - start)
        print(f"round {r + 1}: t5lite {times['t5lite'][-1]:.2f} s, "
              f"plain {times['plain'][-1]:.2f} s", flush=True)
    peak = peak_flops(True)
    result = {"benchmark": "plain_jax_t5", "gin_file": args.gin_file, "batch_size": b,
              "inputs_length": s, "targets_length": t, "model_flops": t5lite.model_flops,
              "peak_flops_per_s": peak["flops_per_sec"], "peak_source": peak["source"],
              "compile_s": {"t5lite": t5lite_compile, "plain": plain_compile},
              "step_times_s": times, "machine": machine(),
              "command": "python benchmarks/plain_jax_t5.py " + " ".join(
                  sys.argv[1:] if argv is None else argv)}
    for name, values in times.items():
        step_s = statistics.median(values)
        result[f"{name}_step_s"] = step_s
        result[f"{name}_mfu"] = t5lite.model_flops / step_s / peak["flops_per_sec"]
        print(f"{name:7s} {step_s:.3f} s/step (median of {len(values)}), "
              f"{t5lite.model_flops / step_s / 1e9:.1f} GFLOP/s, MFU "
              f"{100 * result[f'{name}_mfu']:.1f} % of {peak['flops_per_sec'] / 1e9:.1f} GFLOP/s "
              f"({peak['source']})")
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
