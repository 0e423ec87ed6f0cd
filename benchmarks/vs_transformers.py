"""t5lite vs `transformers` (PyTorch) in the same run: AdamW train steps and greedy decoding.

    .venv/bin/python benchmarks/vs_transformers.py            # T5 v1.1-small, batch 8, 512/114

Train: the same architecture (T5 v1.1 shape from the gin file: gated-GELU, untied embeddings,
relative bias), both initialised with T5's init scales, the same random full-length batch, AdamW
(lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay) and plain cross-entropy (t5lite's z-loss
off). Steps alternate, t5lite then transformers, after warm-up steps on each side (t5lite's
compile is timed separately). Throughput = batch * (inputs + targets) / median step time.
By default both run in this process, so both run with the allocator t5lite re-executed itself
with (`t5lite/host_malloc.py`). `--transformers_process=separate` runs transformers' steps in a
worker process of its own, started with the allocator this benchmark was started with: one
framework per process, as users run them (steps still alternate, so both see the same machine).

Decode: greedy, batch 8, 512 input tokens, 64 new tokens, on the *same weights* (the
transformers model's weights converted with `t5lite.export.hf_mapping`); EOS is disabled on both
sides (t5lite `eos_id=-1`, transformers `min_new_tokens=64`) so both produce exactly 64 tokens.
The request is split into "encoder + first token" (a 1-token request) and the further tokens;
the encoder pass alone is also timed (t5lite `encode` vs transformers `model.encoder`).
transformers runs `generate(use_cache=True)`; t5lite runs `t5lite.inference.Generator` (one jitted
encode + cross-K/V precompute + `lax.while_loop` over cached decoder steps). The fraction of
identical greedy tokens is reported as a sanity check of the conversion.

Results are printed and written to benchmarks/results/vs_transformers_<dtype>.json.
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

if __name__ == "__main__":  # the allocator the `t5lite` command runs with (t5lite/host_malloc.py)
    from t5lite.host_malloc import reexec_with_chosen_malloc

    reexec_with_chosen_malloc()

import jax  # noqa: E402

from hf_reference import (HFGenerate, HFTrainStep, HFTrainStepProcess,  # noqa: E402
                          build_hf_model)
from train_step import (TrainStepBench, adamw_config, machine, write_result,  # noqa: E402
                        model_config_from_gin, synthetic_batch)

from t5lite.config import ModelConfig  # noqa: E402
from t5lite.host_malloc import allocator_variables, environment_as_started  # noqa: E402
from t5lite.train.losses import LossConfig  # noqa: E402


def compare_train(cfg: ModelConfig, *, batch_size: int, inputs_length: int, targets_length: int,
                  steps: int, warmup: int, threads: int, mesh=None, log=print,
                  transformers_dtype: str = "float32",
                  transformers_process: str = "shared") -> dict:
    """Alternate t5lite and transformers AdamW steps on the same batch; medians and ratio.

    `transformers_dtype="bfloat16"`: transformers trains under `torch.autocast` (bfloat16
    compute, float32 weights), as t5lite does with `cfg.dtype="bfloat16"`.
    `transformers_process="separate"`: transformers' steps run in a worker process of their own
    (`HFTrainStepProcess`), with the allocator the benchmark was started with, not the one
    t5lite re-executed itself with; the steps still alternate."""
    host = synthetic_batch(batch_size, inputs_length, targets_length, cfg.vocab_size)
    ours = TrainStepBench(cfg, batch_size=batch_size, inputs_length=inputs_length,
                          targets_length=targets_length, optimizer=adamw_config(),
                          loss=LossConfig(z_loss=0.0), mesh=mesh)
    compile_s = ours.compile()
    log(f"t5lite train step compiled in {compile_s:.1f} s")
    autocast = "bfloat16" if transformers_dtype == "bfloat16" else None
    if transformers_process == "separate":
        theirs = HFTrainStepProcess(cfg, host, threads=threads, autocast=autocast,
                                    env=environment_as_started(os.environ))
    else:
        theirs = HFTrainStep(cfg, host, threads=threads, autocast=autocast)
    try:
        ours.time_steps(warmup)
        theirs.time(warmup)
        t_ours, t_theirs = [], []
        for i in range(steps):
            t_ours += ours.time_steps(1)
            t_theirs += theirs.time(1)
            log(f"  train step {i + 1}/{steps}: t5lite {t_ours[-1]:.2f} s, "
                f"transformers {t_theirs[-1]:.2f} s", flush=True)
    finally:
        if transformers_process == "separate":
            theirs.close()
    tokens = batch_size * (inputs_length + targets_length)
    ours_s, theirs_s = statistics.median(t_ours), statistics.median(t_theirs)
    return {
        "t5lite_step_s": ours_s, "transformers_step_s": theirs_s,
        "t5lite_step_times_s": t_ours, "transformers_step_times_s": t_theirs,
        "t5lite_tokens_per_s": tokens / ours_s, "transformers_tokens_per_s": tokens / theirs_s,
        "ratio": theirs_s / ours_s, "t5lite_compile_s": compile_s,
        "transformers_dtype": transformers_dtype,
        "transformers_process": transformers_process,
        "transformers_allocator_env": (theirs.worker_env if transformers_process == "separate"
                                       else allocator_variables(os.environ)),
        "t5lite_model_flops_per_s": ours.model_flops / ours_s,
        "transformers_model_flops_per_s": ours.model_flops / theirs_s,
        "t5lite_last_loss": ours.last_loss,
        "transformers_params": theirs.num_params,
    }


def t5lite_generator_from_hf(cfg: ModelConfig, hf_model, batch_size: int, input_len: int,
                             quantize: str | None = None, cross_kv_dtype: str = "float",
                             cross_attention: str = "auto"):
    """A t5lite Generator holding the transformers model's weights (int8-quantized after
    loading with quantize="int8")."""
    from flax import nnx

    from t5lite.export.hf_mapping import hf_state_dict_to_params
    from t5lite.inference import Generator
    from t5lite.models import build_model
    from t5lite.models.layout import load_params

    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    state = {k: v.detach().cpu().numpy() for k, v in hf_model.state_dict().items()}
    load_params(model, hf_state_dict_to_params(state, cfg))
    if quantize:
        from t5lite.models.quant import QuantConfig, quantize_model

        quantize_model(model, QuantConfig())
    return Generator(model, None, max_input_len=input_len, batch_size=batch_size,
                     cross_kv_dtype=cross_kv_dtype, cross_attention=cross_attention)


def compare_encoder(gen, hf_model, ids: np.ndarray, repeats: int) -> tuple[list, list]:
    """Seconds of the encoder pass alone (batch x input ids, no padding), t5lite's jitted
    `encode` on the Generator's model vs transformers' `model.encoder`, alternating."""
    import jax.numpy as jnp
    import torch
    from flax import nnx

    graphdef, state = nnx.split(gen.model)
    encode = jax.jit(lambda st, t: nnx.merge(graphdef, st).encode(t))
    tokens, torch_ids = jnp.asarray(ids), torch.from_numpy(ids.astype(np.int64))

    def ours():
        jax.block_until_ready(encode(state, tokens))

    def theirs():
        with torch.inference_mode():
            hf_model.encoder(input_ids=torch_ids)

    ours(), theirs()  # compile / warm up
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return t_ours, t_theirs


def compare_decode(cfg: ModelConfig, *, batch_size: int, input_len: int, new_tokens: int,
                   repeats: int, threads: int, with_transformers: bool = True,
                   quantize: str | None = None, cross_kv_dtype: str = "float",
                   transformers_dtype: str = "float32", cross_attention: str = "auto",
                   log=print) -> dict:
    """Greedy decoding, t5lite Generator vs transformers generate, same weights, alternating.

    with_transformers=False times t5lite alone on random weights (accelerator machines, where
    transformers is not installed)."""
    from t5lite.models.decoding import DecodeConfig

    if with_transformers:
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        hf_model = build_hf_model(cfg).eval()
        gen = t5lite_generator_from_hf(cfg, hf_model, batch_size, input_len, quantize,
                                       cross_kv_dtype, cross_attention)
        if transformers_dtype == "bfloat16":  # after t5lite took the float32 weights
            hf_model = hf_model.to(torch.bfloat16)
    else:
        from flax import nnx

        from t5lite.inference import Generator
        from t5lite.models import build_model

        gen = Generator(build_model(cfg, rngs=nnx.Rngs(params=0)), None,
                        max_input_len=input_len, batch_size=batch_size,
                        cross_attention=cross_attention)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, min(cfg.vocab_size, 32000), size=(batch_size, input_len),
                       dtype=np.int32)
    ids[:, -1] = 1  # EOS ends every input, as tokenised text does
    rows = [list(r) for r in ids]
    config = DecodeConfig(method="greedy", max_decode_len=new_tokens, eos_id=-1)

    form = gen.cross_attention_form()

    def ours():
        return gen.generate_ids(rows, config)[0][:, 0]

    start = time.perf_counter()
    our_tokens = ours()  # compile + first run
    first_s = time.perf_counter() - start
    if not with_transformers:
        log(f"t5lite decode compiled + ran once in {first_s:.1f} s")
        t_ours = []
        for _ in range(repeats):
            start = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - start)
        ours_s = statistics.median(t_ours)
        return {"t5lite_decode_s": ours_s, "t5lite_decode_times_s": t_ours,
                "cross_attention": form,
                "t5lite_tokens_per_s": batch_size * new_tokens / ours_s,
                "t5lite_first_call_s": first_s, "new_tokens": [int(our_tokens.shape[1])]}
    hf_gen = HFGenerate(hf_model, ids, new_tokens)
    # encoder + first token alone, to split the request time into encoder and decoding loop
    first_config = DecodeConfig(method="greedy", max_decode_len=1, eos_id=-1)
    gen.generate_ids(rows, first_config)  # compile
    hf_first = HFGenerate(hf_model, ids, 1)
    hf_first.run()
    f_ours, f_theirs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        gen.generate_ids(rows, first_config)
        f_ours.append(time.perf_counter() - start)
        f_theirs += hf_first.time(1)
    e_ours, e_theirs = compare_encoder(gen, hf_model, ids, max(repeats, 5))
    hf_tokens = hf_gen.run().numpy()[:, 1:]  # warm-up; drop the decoder start token
    log(f"t5lite decode compiled + ran once in {first_s:.1f} s")
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - start)
        t_theirs += hf_gen.time(1)
    ours_s, theirs_s = statistics.median(t_ours), statistics.median(t_theirs)
    n = min(our_tokens.shape[1], hf_tokens.shape[1])
    agree = float(np.mean(our_tokens[:, :n] == hf_tokens[:, :n]))
    return {
        "t5lite_decode_s": ours_s, "transformers_decode_s": theirs_s,
        "t5lite_decode_times_s": t_ours, "transformers_decode_times_s": t_theirs,
        "t5lite_tokens_per_s": batch_size * new_tokens / ours_s,
        "transformers_tokens_per_s": batch_size * new_tokens / theirs_s,
        "ratio": theirs_s / ours_s, "t5lite_first_call_s": first_s,
        "t5lite_first_token_s": statistics.median(f_ours),
        "transformers_first_token_s": statistics.median(f_theirs),
        "t5lite_encoder_s": statistics.median(e_ours),
        "transformers_encoder_s": statistics.median(e_theirs),
        "t5lite_encoder_times_s": e_ours, "transformers_encoder_times_s": e_theirs,
        # one decoding-loop iteration: (request - encoder and first token) / remaining tokens
        "t5lite_step_ms": 1e3 * (ours_s - statistics.median(f_ours)) / max(new_tokens - 1, 1),
        "transformers_step_ms": (1e3 * (theirs_s - statistics.median(f_theirs))
                                 / max(new_tokens - 1, 1)),
        "new_tokens": [int(our_tokens.shape[1]), int(hf_tokens.shape[1])],
        "token_agreement": agree, "cross_attention": form,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", action="append", default=None)
    parser.add_argument("--gin", action="append", default=[], help="extra gin binding")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="t5lite compute dtype (transformers: --transformers_dtype)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode_batch", type=int, default=8)
    parser.add_argument("--decode_input_len", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--decode_repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch intra-op threads (default: all cores, as JAX uses)")
    parser.add_argument("--skip_train", action="store_true")
    parser.add_argument("--skip_decode", action="store_true")
    parser.add_argument("--skip_transformers", action="store_true",
                        help="t5lite decoding alone, random weights (no torch needed)")
    parser.add_argument("--quantize", default=None, choices=["int8"],
                        help="decode with t5lite's int8 weights (t5lite.models.quant); "
                        "transformers stays float32")
    parser.add_argument("--cross_kv_dtype", default="float", choices=["float", "bfloat16"],
                        help="t5lite's cross-attention K/V cache dtype")
    parser.add_argument("--cross_attention", default="auto", choices=["auto", "kv", "absorbed"],
                        help="how t5lite's decoding steps read the encoder "
                        "(t5lite.inference.CROSS_ATTENTION_FORMS)")
    parser.add_argument("--transformers_dtype", default="float32",
                        choices=["float32", "bfloat16"],
                        help="transformers' dtype: for decoding its weights are cast after "
                        "t5lite took the float32 ones; for training, bfloat16 is torch.autocast "
                        "(float32 weights, bfloat16 compute)")
    parser.add_argument("--transformers_process", default="shared",
                        choices=["shared", "separate"],
                        help="train: transformers in this process (shared) or in a worker "
                        "process of its own with the allocator this benchmark was started with "
                        "(separate: one framework per process, as users run them)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    files = args.gin_file or ["gin/models/t5_1_1/small.gin"]
    cfg = model_config_from_gin(files, args.gin)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    where = machine()
    print(f"{files[-1]} t5lite dtype={cfg.dtype}; {where['cpu_model']}, {where['cpus']} CPUs, "
          f"load average {where['load_average_1min']}, torch threads {args.threads}, t5lite's "
          f"allocator {where['malloc_chosen'] or 'as started'}", flush=True)
    if where["load_average_1min"] > 1.0:
        print("warning: the machine is busy; PyTorch's threads slow down far more than XLA's "
              "under contention, so the ratios below are not comparable to an idle run",
              flush=True)
    result = {"benchmark": "vs_transformers", "gin_files": files, "dtype": cfg.dtype,
              "batch_size": args.batch_size, "inputs_length": args.inputs_length,
              "targets_length": args.targets_length, "machine": machine()}
    if not args.skip_transformers:
        import torch
        import transformers

        result["machine"].update(torch=torch.__version__,
                                 transformers=transformers.__version__)
    if not args.skip_train and not args.skip_transformers:
        train = compare_train(cfg, batch_size=args.batch_size, inputs_length=args.inputs_length,
                              targets_length=args.targets_length, steps=args.steps,
                              warmup=args.warmup, threads=args.threads,
                              transformers_dtype=args.transformers_dtype,
                              transformers_process=args.transformers_process)
        result["train"] = train
        print(f"train  t5lite {train['t5lite_tokens_per_s']:.0f} tokens/s "
              f"({train['t5lite_step_s']:.2f} s/step), transformers "
              f"{train['transformers_tokens_per_s']:.0f} tokens/s "
              f"({train['transformers_step_s']:.2f} s/step): ratio {train['ratio']:.2f}x",
              flush=True)
    if not args.skip_decode:
        dec = compare_decode(cfg, batch_size=args.decode_batch, input_len=args.decode_input_len,
                             new_tokens=args.new_tokens, repeats=args.decode_repeats,
                             threads=args.threads,
                             with_transformers=not args.skip_transformers,
                             quantize=args.quantize, cross_kv_dtype=args.cross_kv_dtype,
                             transformers_dtype=args.transformers_dtype,
                             cross_attention=args.cross_attention)
        dec.update(quantize=args.quantize, cross_kv_dtype=args.cross_kv_dtype,
                   transformers_dtype=args.transformers_dtype)
        result["decode"] = dec
    if not args.skip_decode and args.skip_transformers:
        print(f"decode t5lite {dec['t5lite_tokens_per_s']:.1f} tokens/s "
              f"({dec['t5lite_decode_s']:.3f} s for batch {args.decode_batch} x "
              f"{args.new_tokens} tokens)", flush=True)
    elif not args.skip_decode:
        print(f"decode t5lite {dec['t5lite_tokens_per_s']:.1f} tokens/s "
              f"({dec['t5lite_decode_s']:.2f} s), transformers "
              f"{dec['transformers_tokens_per_s']:.1f} tokens/s "
              f"({dec['transformers_decode_s']:.2f} s): ratio {dec['ratio']:.2f}x; "
              f"greedy tokens identical: {100 * dec['token_agreement']:.1f} %", flush=True)
        print(f"       encoder + first token: t5lite {dec['t5lite_first_token_s']:.2f} s, "
              f"transformers {dec['transformers_first_token_s']:.2f} s; per further token: "
              f"t5lite {dec['t5lite_step_ms']:.1f} ms, transformers "
              f"{dec['transformers_step_ms']:.1f} ms", flush=True)
        print(f"       encoder pass alone: t5lite {dec['t5lite_encoder_s']:.3f} s, transformers "
              f"{dec['transformers_encoder_s']:.3f} s: ratio "
              f"{dec['transformers_encoder_s'] / dec['t5lite_encoder_s']:.2f}x", flush=True)
    result["command"] = "python benchmarks/vs_transformers.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"vs_transformers_{cfg.dtype}"
                                   f"{'_' + args.quantize if args.quantize else ''}.json")
    if args.skip_transformers and not args.out:
        out = out.replace("vs_transformers_", "decode_t5lite_only_")
    write_result(result, out)
    return result


if __name__ == "__main__":
    main()
