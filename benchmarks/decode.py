"""Decoding speed of a model dir: tokens/s and first-token latency, greedy and beam search.

    .venv/bin/python benchmarks/decode.py [--model_dir=runs/demo] [--input_len=512]
        [--output_len=64] [--batch_sizes=1,8] [--beam_size=4] [--repeats=3]

Each request is `batch` random inputs of `input_len` tokens (EOS last) decoding exactly
`output_len` tokens (EOS is disabled so every run does the same work). Reported per setting:

  first-token latency  wall time of a request that decodes 1 token: encoder + cross-attention
                       K/V precompute + one decoder step (+ host transfer)
  request time         wall time of a request decoding output_len tokens
  step ms              (request time - first-token latency) / (output_len - 1): one iteration
                       of the decoding loop (all decoder layers + logits + token choice)
  tokens/s             batch * output_len / request time (beam: the returned best beam only)

Times are medians over --repeats runs after one compile/warm-up run. Weights do not matter for
speed; a model dir without a checkpoint is an error, use --random_model to time the demo
architecture (gin/demo.gin sizes) with random weights instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # the allocator the `t5lite` command runs with (t5lite/host_malloc.py)
    from t5lite.host_malloc import reexec_with_chosen_malloc

    reexec_with_chosen_malloc()

import jax  # noqa: E402

from t5lite.inference import Generator  # noqa: E402
from timing import median_seconds  # noqa: E402
from t5lite.models.decoding import DecodeConfig  # noqa: E402


def make_random_demo_dir(directory: str) -> str:
    """A model dir with the demo architecture and random weights (for timing only)."""
    from flax import nnx

    from t5lite import checkpoint
    from t5lite.config import ModelConfig
    from t5lite.model_dir import RunInfo, write_model_config, write_run_info
    from t5lite.models import build_model

    cfg = ModelConfig(vocab_size=8192, d_model=256, num_heads=4, head_dim=64, d_ff=768,
                      num_encoder_layers=3, num_decoder_layers=3)
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    checkpoint.save_params(directory, nnx.state(model, nnx.Param), step=0)
    write_model_config(directory, cfg)
    vocab = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "tasks", "t5lite_tasks", "demo", "data", "demo_8k.model")
    write_run_info(directory, RunInfo(task=None, vocabulary=vocab,
                                      task_feature_lengths={"inputs": 512, "targets": 64}))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default="runs/demo")
    parser.add_argument("--random_model", action="store_true",
                        help="time the demo architecture with random weights")
    parser.add_argument("--input_len", type=int, default=512)
    parser.add_argument("--output_len", type=int, default=64)
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--beam_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model_dir = args.model_dir
    if args.random_model:
        model_dir = make_random_demo_dir(tempfile.mkdtemp(prefix="t5lite_decode_bench_"))
    print(f"model dir {model_dir}; {jax.device_count()} x {jax.devices()[0].platform} "
          f"device(s); input {args.input_len} tokens, output {args.output_len} tokens")
    rng = np.random.default_rng(0)
    header = (f"{'decode':<10}{'batch':>6}{'first-token ms':>16}{'request s':>11}"
              f"{'step ms':>9}{'tokens/s':>10}")
    print(header)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        gen = Generator.from_model_dir(model_dir, batch_size=batch)
        gen.max_input_len = args.input_len  # positions are relative: any length works
        vocab_hi = gen.vocab.vocab_size - gen.vocab.extra_ids
        rows = [list(rng.integers(3, vocab_hi, size=args.input_len - 1)) + [1]
                for _ in range(batch)]
        for method in ("greedy", "beam"):
            beam = args.beam_size if method == "beam" else 1

            def run(length: int) -> None:
                config = DecodeConfig(method=method, max_decode_len=length, beam_size=beam,
                                      eos_id=-1)
                gen.generate_ids(rows, config)

            first = median_seconds(lambda: run(1), args.repeats)
            full = median_seconds(lambda: run(args.output_len), args.repeats)
            label = method if method == "greedy" else f"beam{beam}"
            step_ms = (full - first) / max(args.output_len - 1, 1) * 1e3
            print(f"{label:<10}{batch:>6}{first * 1e3:>16.1f}{full:>11.3f}{step_ms:>9.1f}"
                  f"{batch * args.output_len / full:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
