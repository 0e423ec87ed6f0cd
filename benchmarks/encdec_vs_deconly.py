"""Encoder-decoder vs decoder-only on this CPU: parameters, FLOPs, train step, decoding.

    .venv/bin/python benchmarks/encdec_vs_deconly.py [--size=demo|small] \
        [--lengths=256,512,1024,2048,4096] [--batches=1,8] [--new_tokens=64] \
        [--train_input=256 --train_target=64 --train_batch=8] [--skip_timing]

Three models with random weights (speed does not depend on them):

  encdec        the encoder-decoder (E encoder + E decoder layers)
  deconly_param a decoder-only model with about as many parameters (more layers)
  deconly_flops a decoder-only model with about the encoder-decoder's FLOPs per token: E
                layers, so every token goes through as many layers as in the encoder-decoder
                (where input tokens go through the encoder, target tokens the decoder) and it
                has about half the parameters — the design report's "an encoder-decoder has
                ~2x the parameters of a compute-matched decoder-only model"

Per model: parameter count; matmul FLOPs of one request (`request_flops`: encode the input once
+ decode `new_tokens` tokens for the encoder-decoder; prefill the input + decode for the
decoder-only) for each input length; the train step time (forward + backward + AdamW on a
batch of `train_batch` x (train_input + train_target) tokens; the decoder-only sees the
concatenation as a prefix-LM); and for each input length and batch the first-token latency
(a request decoding 1 token) and the decode throughput (batch * new_tokens / time of a request
decoding new_tokens tokens), greedy, EOS disabled, median of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # the allocator the `t5lite` command runs with (t5lite/host_malloc.py)
    from t5lite.host_malloc import reexec_with_chosen_malloc

    reexec_with_chosen_malloc()

from t5lite.config import ModelConfig  # noqa: E402
from t5lite.train import flops as F  # noqa: E402
from timing import median_seconds  # noqa: E402

SIZES = {
    # the demo student (gin/demo.gin): d_model 256, 4 heads of 64, d_ff 768, 3 + 3 layers
    "demo": dict(vocab_size=8192, d_model=256, num_heads=4, head_dim=64, d_ff=768, layers=3),
    # T5 v1.1-small shapes (8 + 8 layers), for FLOPs tables (too slow to time on 2 cores)
    "small": dict(vocab_size=32128, d_model=512, num_heads=6, head_dim=64, d_ff=1024, layers=8),
}


def configs(size: str) -> dict[str, ModelConfig]:
    s = dict(SIZES[size])
    layers = s.pop("layers")
    encdec = ModelConfig(num_encoder_layers=layers, num_decoder_layers=layers, **s)
    target = param_count(encdec)
    best = min(range(1, 8 * layers), key=lambda n: abs(param_count(ModelConfig(
        architecture="decoder_only", num_encoder_layers=0, num_decoder_layers=n, **s)) - target))
    return {
        "encdec": encdec,
        "deconly_param": ModelConfig(architecture="decoder_only", num_encoder_layers=0,
                                     num_decoder_layers=best, **s),
        "deconly_flops": ModelConfig(architecture="decoder_only", num_encoder_layers=0,
                                     num_decoder_layers=layers, **s),
    }


def param_count(cfg: ModelConfig) -> int:
    from t5lite.models.info import param_count as count

    return count(cfg)


def request_flops(cfg: ModelConfig, input_len: int, new_tokens: int) -> float:
    """Matmul FLOPs of one request: read `input_len` tokens, generate `new_tokens` (with the
    KV cache: each generated token attends to everything before it once)."""
    ffn = F._ffn_flops(cfg, False)
    proj = F._attention_proj_flops(cfg)
    logits = 2 * cfg.d_model * cfg.vocab_size
    total = 0.0
    if cfg.architecture == "encoder_decoder":
        # encoder over the input (bidirectional: every token attends to input_len keys)
        total += cfg.num_encoder_layers * input_len * (
            proj + F._attention_core_flops(cfg, input_len) + ffn)
        # cross-attention K/V of every decoder layer, once per request
        k_v = 2 * cfg.d_model * cfg.head_dim * 2 * cfg.kv_heads
        q_o = 2 * cfg.d_model * cfg.head_dim * 2 * cfg.num_heads
        total += cfg.num_decoder_layers * input_len * k_v
        for t in range(new_tokens):
            total += cfg.num_decoder_layers * (
                proj + F._attention_core_flops(cfg, t + 1) + q_o
                + F._attention_core_flops(cfg, input_len) + ffn) + logits
    else:
        prompt = input_len + 1  # the start token, then the inputs (prefix-LM layout)
        total += cfg.num_decoder_layers * prompt * (
            proj + F._attention_core_flops(cfg, prompt) + ffn) + logits
        for t in range(1, new_tokens):
            total += cfg.num_decoder_layers * (
                proj + F._attention_core_flops(cfg, prompt + t) + ffn) + logits
    return total


def _model(cfg: ModelConfig):
    from flax import nnx

    from t5lite.models import build_model

    return build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))


def train_step_seconds(cfg: ModelConfig, batch: int, input_len: int, target_len: int,
                       repeats: int) -> float:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from t5lite.train.distill import prefix_lm_teacher_batch
    from t5lite.train.losses import LossConfig, token_loss_sums
    from t5lite.train.steps import model_forward

    rng = np.random.default_rng(0)
    enc = rng.integers(3, 8000, (batch, input_len)).astype(np.int32)
    tgt = rng.integers(3, 8000, (batch, target_len)).astype(np.int32)
    b = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
         "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
         "decoder_loss_weights": np.ones_like(tgt)}
    if cfg.architecture == "decoder_only":
        view = {k: np.asarray(v) for k, v in prefix_lm_teacher_batch(
            {k: jnp.asarray(v) for k, v in b.items()}).items()}
        view["decoder_target_tokens"] = np.concatenate([enc, tgt], axis=1)
        view["decoder_loss_weights"] = np.concatenate([np.zeros_like(enc), np.ones_like(tgt)], 1)
        b = view
    model = _model(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        def loss(p):
            logits, _ = model_forward(nnx.merge(graphdef, p, rest), batch, None)
            s = token_loss_sums(logits, batch["decoder_target_tokens"],
                                batch["decoder_loss_weights"], LossConfig())
            return s["loss"] / s["weight"]

        g = jax.grad(loss)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt

    batch_j = {k: jnp.asarray(v) for k, v in b.items()}
    return median_seconds(lambda: jax.block_until_ready(step(params, opt, batch_j)), repeats)


def decode_seconds(cfg: ModelConfig, input_len: int, batch: int, new_tokens: int,
                   repeats: int) -> tuple[float, float]:
    """(first-token latency, request time for new_tokens) in seconds."""
    from t5lite.data.vocab import load_vocabulary
    from t5lite.inference import Generator
    from t5lite.models.decoding import DecodeConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vocab = load_vocabulary(os.path.join(root, "tasks", "t5lite_tasks", "demo", "data",
                                         "demo_8k.model"), extra_ids=100)
    gen = Generator(_model(cfg), vocab, max_input_len=input_len, batch_size=batch)
    rng = np.random.default_rng(1)
    rows = [list(rng.integers(3, 8000, size=input_len - 1)) + [1] for _ in range(batch)]

    def run(n: int) -> None:
        gen.generate_ids(rows, DecodeConfig(method="greedy", max_decode_len=n, eos_id=-1))

    return median_seconds(lambda: run(1), repeats), median_seconds(lambda: run(new_tokens), repeats)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    return f"{name}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="demo", choices=sorted(SIZES))
    parser.add_argument("--lengths", default="256,512,1024,2048,4096")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--train_input", type=int, default=256)
    parser.add_argument("--train_target", type=int, default=64)
    parser.add_argument("--train_batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--models", default="encdec,deconly_param,deconly_flops")
    parser.add_argument("--skip_timing", action="store_true", help="parameters and FLOPs only")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    cfgs = {k: v for k, v in configs(args.size).items() if k in args.models.split(",")}
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                   time.gmtime()),
                     "size": args.size, "models": {}}
    print(f"# {results['machine']}; {results['date']}")
    print(f"{'model':<15}{'layers':>8}{'params':>12}  request GFLOPs at input lengths "
          f"{lengths} (+{args.new_tokens} new tokens)")
    for name, cfg in cfgs.items():
        layers = (f"{cfg.num_encoder_layers}+{cfg.num_decoder_layers}"
                  if cfg.architecture == "encoder_decoder" else str(cfg.num_decoder_layers))
        fl = [request_flops(cfg, n, args.new_tokens) for n in lengths]
        results["models"][name] = {"layers": layers, "params": param_count(cfg),
                                   "request_flops": dict(zip(map(str, lengths), fl))}
        print(f"{name:<15}{layers:>8}{param_count(cfg) / 1e6:>11.2f}M  "
              + " ".join(f"{f / 1e9:8.2f}" for f in fl))
    ed = results["models"].get("encdec")
    for name in ("deconly_param", "deconly_flops"):
        if ed and name in results["models"]:
            ratios = [results["models"][name]["request_flops"][str(n)]
                      / ed["request_flops"][str(n)] for n in lengths]
            print(f"compute per request {name} / encdec: "
                  + " ".join(f"{n}:{r:.2f}x" for n, r in zip(lengths, ratios)))
    if not args.skip_timing:
        for name, cfg in cfgs.items():
            t = train_step_seconds(cfg, args.train_batch, args.train_input, args.train_target,
                                   args.repeats)
            results["models"][name]["train_step_s"] = t
            print(f"train step {name}: {t * 1e3:.0f} ms (batch {args.train_batch} x "
                  f"({args.train_input} + {args.train_target}) tokens)", flush=True)
        print(f"{'model':<15}{'input':>7}{'batch':>6}{'first-token ms':>16}{'request s':>11}"
              f"{'tokens/s':>10}")
        for n in lengths:
            for b in batches:
                for name, cfg in cfgs.items():
                    first, full = decode_seconds(cfg, n, b, args.new_tokens, args.repeats)
                    tps = b * args.new_tokens / full
                    results["models"][name].setdefault("decode", {})[f"{n}x{b}"] = {
                        "first_token_s": first, "request_s": full, "tokens_per_s": tps}
                    print(f"{name:<15}{n:>7}{b:>6}{first * 1e3:>16.1f}{full:>11.3f}"
                          f"{tps:>10.1f}", flush=True)
        print(f"# load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
