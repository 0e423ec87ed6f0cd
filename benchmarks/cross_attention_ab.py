"""Decoding with cross K/V against absorbed cross-attention, in one process, alternating.

    python benchmarks/cross_attention_ab.py                       # float32, greedy
    python benchmarks/cross_attention_ab.py --dtype=bfloat16 --decode=beam
    python benchmarks/cross_attention_ab.py --dtype=bfloat16 --quantize=int8

Two `t5lite.inference.Generator`s share one random T5 v1.1-small (gin file, default
`gin/models/t5_1_1/small.gin`): one with `cross_attention="kv"` (every decoder layer's cross K/V
computed once per request), one with `"absorbed"` (the steps read the encoder output itself,
`t5lite.models.attention.absorbed_decode_attention`). Each decodes the same batch (default 8
rows of 512 tokens) for 1 token and for --new_tokens tokens; the two alternate, --repeats
times, and the medians are compared. The 1-token request is the encoder plus what a request
prepares for its decoding loop; (N-token - 1-token) / (N - 1) is one step of the loop.

Also reported: how often the two forms' tokens agree (random weights have tiny argmax margins,
so bfloat16 rounding differences show; on a trained model see `benchmarks/quant_accuracy.py`).
Writes benchmarks/results/cross_attention_ab_<dtype>_<decode>.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from train_step import machine, model_config_from_gin, write_result  # noqa: E402

FORMS = ("kv", "absorbed")


def random_model_and_inputs(cfg, *, batch_size: int, input_len: int,
                            quantize: str | None = None):
    """(model with random weights, int8 with quantize="int8"; `batch_size` random token rows
    of `input_len` ids, each ending with EOS) for the decoding benchmarks."""
    from flax import nnx

    from t5lite.models import build_model

    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    if quantize:
        from t5lite.models.quant import QuantConfig, quantize_model

        quantize_model(model, QuantConfig())
    ids = np.random.default_rng(1).integers(3, min(cfg.vocab_size, 32000),
                                            size=(batch_size, input_len))
    ids[:, -1] = 1  # EOS ends every input
    return model, [list(map(int, r)) for r in ids]


def compare_forms(cfg, *, batch_size: int, input_len: int, new_tokens: int, repeats: int,
                  decode: str = "greedy", beam_size: int = 4, quantize: str | None = None,
                  log=print) -> dict:
    """Time both cross-attention forms on one model (int8 weights with quantize="int8"),
    alternating; medians per request."""
    from t5lite.inference import Generator
    from t5lite.models.decoding import DecodeConfig

    model, rows = random_model_and_inputs(cfg, batch_size=batch_size, input_len=input_len,
                                          quantize=quantize)
    gens = {form: Generator(model, None, max_input_len=input_len, batch_size=batch_size,
                            cross_attention=form) for form in FORMS}
    result: dict = {"decode": decode, "quantize": quantize}
    for n in (1, new_tokens):
        config = DecodeConfig(method=decode, max_decode_len=n, eos_id=-1,
                              beam_size=beam_size if decode == "beam" else 1)
        tokens = {form: gen.generate_ids(rows, config)[0] for form, gen in gens.items()}
        times: dict[str, list[float]] = {form: [] for form in FORMS}
        for _ in range(repeats):
            for form, gen in gens.items():
                start = time.perf_counter()
                gen.generate_ids(rows, config)
                times[form].append(time.perf_counter() - start)
        entry = {f"{form}_s": statistics.median(t) for form, t in times.items()}
        entry.update({f"{form}_times_s": t for form, t in times.items()},
                     token_agreement=float(np.mean(tokens["kv"] == tokens["absorbed"])))
        entry["speedup"] = entry["kv_s"] / entry["absorbed_s"]
        result[f"tokens_{n}"] = entry
        log(f"{n:4d} tokens: kv {entry['kv_s']:.3f} s, absorbed {entry['absorbed_s']:.3f} s "
            f"({entry['speedup']:.2f}x); tokens agreeing {100 * entry['token_agreement']:.1f} %")
    if new_tokens > 1:
        for form in FORMS:
            step = (result[f"tokens_{new_tokens}"][f"{form}_s"] - result["tokens_1"][f"{form}_s"])
            result[f"{form}_step_ms"] = 1e3 * step / (new_tokens - 1)
        log(f"one decoding step: kv {result['kv_step_ms']:.2f} ms, absorbed "
            f"{result['absorbed_step_ms']:.2f} ms")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", action="append", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--decode", default="greedy", choices=["greedy", "beam"])
    parser.add_argument("--beam_size", type=int, default=4)
    parser.add_argument("--quantize", default=None, choices=["int8"],
                        help="int8 weights (t5lite.models.quant, default activations)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    files = args.gin_file or ["gin/models/t5_1_1/small.gin"]
    cfg = model_config_from_gin(files).replace(dtype=args.dtype)
    where = machine()
    print(f"{files[-1]} {args.dtype} {args.decode}, batch {args.batch_size} x "
          f"{args.input_len}; {where['cpu_model']}, {where['cpus']} CPUs, load average "
          f"{where['load_average_1min']}", flush=True)
    result = {"benchmark": "cross_attention_ab", "gin_files": files, "dtype": args.dtype,
              "batch_size": args.batch_size, "input_len": args.input_len,
              "new_tokens": args.new_tokens, "machine": where,
              **compare_forms(cfg, batch_size=args.batch_size, input_len=args.input_len,
                              new_tokens=args.new_tokens, repeats=args.repeats,
                              decode=args.decode, beam_size=args.beam_size,
                              quantize=args.quantize)}
    result["command"] = "python benchmarks/cross_attention_ab.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_result(result, args.out or os.path.join(
        ROOT, "benchmarks", "results", f"cross_attention_ab_{args.dtype}_{args.decode}"
        f"{'_' + args.quantize if args.quantize else ''}.json"))
    return result


if __name__ == "__main__":
    main()
