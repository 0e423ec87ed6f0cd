"""Accuracy of int8 inference (t5lite.models.quant) and of a lower compute dtype against the
float model, on the validation examples of the model's task: greedy token agreement and
teacher-forced eval loss.

    python benchmarks/quant_accuracy.py --model_dir=runs/demo --num_examples=256
    python benchmarks/quant_accuracy.py --model_dir=runs/demo --dtype=bfloat16 \
        --out=runs/acc_bf16.json

The reference is the model as stored: float weights, its own compute dtype (model_config.json).
Compared: "int8" (int8 weights, computing in --dtype, default the model's own), "float_absorbed"
(float weights, absorbed cross-attention: `t5lite.models.attention.absorbed_decode_attention`)
and, when --dtype differs from the model's own, also "<dtype>" and "<dtype>_absorbed" (float
weights, computing in --dtype, cross-attention from K/V / absorbed). The reference and "<dtype>"
read cross-attention K/V. Teacher-forced losses do not depend on the cross-attention form. The
top-level loss_int8 / greedy_*_agreement fields are the int8 variant's; "variants" holds every
compared variant's figures.

Agreement: both models decode the same inputs greedily (max length = the task's target length);
each position of the float output up to and including its EOS counts as agreeing when the
quantized output has the same token there (a strict measure: after a first difference the two
outputs usually part). Loss: mean negative log-likelihood per target token, teacher-forced
(`t5lite.inference_eval.target_log_likelihoods`), float vs quantized, on the same examples.
Writes benchmarks/results/quant_accuracy.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tasks"))


def agreement(ref: np.ndarray, other: np.ndarray, eos: int = 1) -> tuple[float, float]:
    """(token agreement, exact-sequence agreement) over the reference rows up to their EOS."""
    same = total = exact = 0
    for r, o in zip(ref, other):
        hits = np.nonzero(r == eos)[0]
        n = int(hits[0]) + 1 if len(hits) else len(r)
        same += int(np.sum(r[:n] == o[:n]))
        total += n
        exact += int(np.array_equal(r[:n], o[:n]))
    return same / max(total, 1), exact / max(len(ref), 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default="runs/demo")
    parser.add_argument("--num_examples", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--activations", default=None, choices=["int8x2", "int8", "float"])
    parser.add_argument("--cross_kv_dtype", default="bfloat16", choices=["float", "bfloat16"])
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="compute dtype of the compared models (default: the model's own)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "quant_accuracy.json"))
    args = parser.parse_args(argv)

    import t5lite_tasks  # noqa: F401  (registers the demo tasks)
    from t5lite.data.registry import get_task_or_mixture
    from t5lite.inference_eval import load_examples, target_log_likelihoods
    from t5lite.inference import Generator
    from t5lite.model_dir import read_model_config, read_run_info
    from t5lite.models.decoding import DecodeConfig

    info = read_run_info(args.model_dir)
    own_dtype = read_model_config(args.model_dir).dtype
    dtype = args.dtype or own_dtype
    task = get_task_or_mixture(info.task)
    examples = load_examples(task, info.task_feature_lengths, num_examples=args.num_examples)
    config = DecodeConfig(method="greedy", max_decode_len=info.task_feature_lengths["targets"])
    n_tokens = sum(sum(1 for t in row if t != 0) for row in examples.targets_ids)
    result: dict = {"benchmark": "quant_accuracy", "model_dir": args.model_dir,
                    "task": info.task, "examples": len(examples.inputs),
                    "target_tokens": n_tokens, "reference_dtype": own_dtype, "dtype": dtype}
    # (name, weights, Generator options); the first is the reference: float weights, the
    # model's own dtype, cross-attention from per-layer K/V (the form training computes)
    runs = [("float", "float", {"cross_attention": "kv"}),
            ("float_absorbed", "float", {"cross_attention": "absorbed"})]
    if dtype != own_dtype:
        runs.append((dtype, "float", {"dtype": dtype, "cross_attention": "kv"}))
        runs.append((f"{dtype}_absorbed", "float", {"dtype": dtype,
                                                     "cross_attention": "absorbed"}))
    runs.append(("int8", "int8", {"quantize": "int8", "activations": args.activations,
                                  "cross_kv_dtype": args.cross_kv_dtype, "dtype": args.dtype}))
    outputs, losses, variants = {}, {}, {}
    for name, weights, opts in runs:
        gen = Generator.from_model_dir(args.model_dir, batch_size=args.batch_size, **opts)
        want = opts.get("dtype") or own_dtype
        if gen.config.dtype != want:
            raise RuntimeError(f"{name}: the model computes in {gen.config.dtype}, not {want}")
        outputs[name] = gen.generate_ids(examples.inputs, config)[0][:, 0]
        scores = target_log_likelihoods(gen.model, examples, batch_size=args.batch_size)
        losses[name] = -float(np.sum(scores)) / n_tokens
        print(f"{name} ({weights} weights, {gen.config.dtype} compute): eval loss "
              f"{losses[name]:.4f}", flush=True)
        if name == "int8":
            result["activations"] = gen.model.embed.quant_activations
        if name == "float":
            continue
        tokens, exact = agreement(outputs["float"], outputs[name])
        variants[name] = {"weights": weights, "dtype": gen.config.dtype,
                          "cross_attention": opts.get("cross_attention", "auto"),
                          "loss": losses[name],
                          "loss_rise_pct": 100 * (losses[name] / losses["float"] - 1),
                          "greedy_token_agreement": tokens, "greedy_sequence_agreement": exact}
        print(f"{name}: greedy tokens agreeing: {100 * tokens:.2f} % (sequences identical: "
              f"{100 * exact:.1f} %); eval loss {losses['float']:.4f} -> {losses[name]:.4f} "
              f"({variants[name]['loss_rise_pct']:+.2f} %)", flush=True)
    int8 = variants["int8"]
    result.update(loss_float=losses["float"], loss_int8=losses["int8"],
                  loss_rise_pct=int8["loss_rise_pct"],
                  greedy_token_agreement=int8["greedy_token_agreement"],
                  greedy_sequence_agreement=int8["greedy_sequence_agreement"],
                  variants=variants, cross_kv_dtype=args.cross_kv_dtype,
                  command="python benchmarks/quant_accuracy.py " + " ".join(
                      sys.argv[1:] if argv is None else argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")
    return result


if __name__ == "__main__":
    main()
