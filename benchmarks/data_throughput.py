"""Input-pipeline throughput: packed batches/s and tokens/s of the demo tasks on this machine.

    .venv/bin/python benchmarks/data_throughput.py            # all cases, batch 8, 200 batches
    .venv/bin/python benchmarks/data_throughput.py --batches=500 --cases=demo_ul2:512:512

Each case builds the training stream (`t5lite.data.pipeline.make_batch_stream`: shuffle, packing,
int32 NumPy batches, exactly what the trainer consumes), discards the first `--warmup` batches
(graph tracing, shuffle-buffer fill) and times the next `--batches`. Tokens/s counts non-padding
encoder input and decoder target tokens. Results are printed and appended as one JSON line per
case to benchmarks/results/data_throughput.jsonl.

UL2 at 512 inputs needs 127 sentinels for its μ=3, d=0.5 denoiser; the default cases use a
vocabulary with 128 extra ids for it (registered here as `bench_ul2_128x`), since the demo
vocabulary's 100 are not enough (t5lite refuses to run out of sentinels silently).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

DEFAULT_CASES = [
    "demo_span_corruption:512:114",
    "demo_span_corruption:512:512",
    "bench_ul2_128x:512:512",
    "demo_ul2:384:384",
]


def register_bench_tasks() -> None:
    import seqio
    from t5lite_tasks import demo

    from t5lite.data import denoisers, tasks

    vocab = seqio.SentencePieceVocabulary(demo.VOCABULARY_PATH, extra_ids=128)
    tasks.add_pretraining_task("bench_ul2_128x", demo.source(), vocab, denoisers.ul2(),
                               default_sequence_length={"inputs": 512, "targets": 512})


def run_case(name: str, inputs: int, targets: int, batch_size: int, batches: int,
             warmup: int) -> dict:
    from t5lite.data.pipeline import DataConfig, make_batch_stream

    config = DataConfig(name, {"inputs": inputs, "targets": targets},
                        host_batch_size=batch_size)
    start = time.perf_counter()
    stream = make_batch_stream(config)
    for _ in range(warmup):
        next(stream)
    ready = time.perf_counter()
    tokens = rows_used = 0
    for _ in range(batches):
        batch = next(stream)
        tokens += int((batch["encoder_input_tokens"] != 0).sum())
        tokens += int((batch["decoder_target_tokens"] != 0).sum())
        rows_used += int(batch["encoder_segment_ids"].max(axis=1).sum())
    elapsed = time.perf_counter() - ready
    return {
        "case": f"{name} {inputs}/{targets}", "batch_size": batch_size, "batches": batches,
        "startup_s": round(ready - start, 2),
        "batches_per_s": round(batches / elapsed, 1),
        "tokens_per_s": round(tokens / elapsed),
        "examples_per_row": round(rows_used / (batches * batch_size), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help="comma-separated TASK:INPUTS:TARGETS")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results",
                                                          "data_throughput.jsonl"))
    args = parser.parse_args()

    from t5lite.data.registry import import_task_modules

    import_task_modules(["t5lite_tasks"])
    register_bench_tasks()
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    machine = f"{platform.node()} {os.cpu_count()} CPUs"
    print(f"{'case':<36} {'startup s':>9} {'batches/s':>10} {'tokens/s':>10} {'ex/row':>7}")
    for case in args.cases.split(","):
        name, inputs, targets = case.split(":")
        result = run_case(name, int(inputs), int(targets), args.batch_size, args.batches,
                          args.warmup)
        result.update(machine=machine, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        print(f"{result['case']:<36} {result['startup_s']:>9} {result['batches_per_s']:>10} "
              f"{result['tokens_per_s']:>10} {result['examples_per_row']:>7}")
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
