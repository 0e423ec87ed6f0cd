"""Where one greedy decoding step spends its time: the loop's ops, per step, from a trace.

    python benchmarks/decode_profile.py                          # T5 v1.1-small, float32
    python benchmarks/decode_profile.py --dtype=bfloat16 [--cross_attention=kv] [--quantize=int8]

Builds the model of the gin file (default `gin/models/t5_1_1/small.gin`) with random weights
and a `t5lite.inference.Generator` (batch --batch_size x --input_len, EOS disabled so the loop
runs exactly --new_tokens iterations), times requests of 1 and --new_tokens tokens (--repeats,
medians), then traces one --new_tokens request with `jax.profiler`.

The decoding loop is found in the trace by the output layer's dot, which ends every step and
nothing else: from one step before its first event to the end of its last one. Every op event
of any thread inside that window belongs to the loop (the encoder and the loop's preparation
run before it).
Those events are grouped by what they compute (`profile_summary.hlo_labels` on the compiled
program: JAX op path, result shape, fused ops) and divided by the number of iterations, so
each row is milliseconds per decoding step. Reported with them:

  step wall ms      the traced loop's duration / iterations (tracing adds some overhead;
                    the untraced figure is (N-token request - 1-token request) / (N - 1))
  op ms per step    summed op time of all threads per step: twice the wall time would mean
                    both cores always busy inside ops; the rest is executor and waiting
  op events         op events per step (each is at least one hand-off of the thunk executor)

Needs the XPlane protobuf module (see `profile_summary.py`). Writes
benchmarks/results/decode_profile_<dtype>.json (or --out) with the CPU model.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cross_attention_ab import random_model_and_inputs  # noqa: E402
from profile_summary import (find_xplane, hlo_labels, load_space,  # noqa: E402
                             planes_to_summarize)
from train_step import machine, model_config_from_gin, write_result  # noqa: E402


def loop_window(plane, labels: dict[str, str], batch: int, vocab: int,
                steps: int) -> tuple[int, int]:
    """(start, end) in picoseconds of the decoding loop: every step ends with the output
    layer's dot, a [batch, vocab] result (int8 weights: [parts, batch, vocab]) that nothing
    else in the program has; the loop runs from one step before the first of them to the end
    of the last."""
    names = {k: v.name or v.display_name for k, v in plane.event_metadata.items()}
    pattern = re.compile(rf"dot_general \w+\[(\d+,)?{batch},{vocab}\]")
    spans = []
    for line in plane.lines:
        base = line.timestamp_ns * 1000
        for event in line.events:
            if pattern.search(labels.get(names.get(event.metadata_id, ""), "")):
                spans.append((base + event.offset_ps, base + event.offset_ps + event.duration_ps))
    if len(spans) < steps:
        raise SystemExit(f"error: found {len(spans)} events of the output layer's dot "
                         f"([{batch}, {vocab}]) in the trace, expected {steps} (one per step)")
    spans.sort()
    first, last = spans[0][0], spans[-1][1]
    step = (last - first) / (steps - 1)
    return int(first - step), last


def ops_in_window(plane, labels: dict[str, str], window: tuple[int, int]):
    """Seconds and counts per label of the op events inside `window` (loops themselves and
    events that are not instructions of the program left out)."""
    names = {k: v.name or v.display_name for k, v in plane.event_metadata.items()}
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for line in plane.lines:
        base = line.timestamp_ns * 1000
        for event in line.events:
            name = names.get(event.metadata_id, "")
            label = labels.get(name)
            if label is None or name.startswith("while"):
                continue
            start = base + event.offset_ps
            if start >= window[0] and start + event.duration_ps <= window[1]:
                seconds[label] = seconds.get(label, 0.0) + event.duration_ps * 1e-12
                counts[label] = counts.get(label, 0) + 1
    return seconds, counts


def profile(cfg, *, batch_size: int, input_len: int, new_tokens: int, repeats: int,
            cross_attention: str = "auto", quantize: str | None = None, top: int = 30,
            log=print) -> dict:
    from t5lite.inference import Generator
    from t5lite.models.decoding import DecodeConfig

    if new_tokens < 2:
        raise SystemExit(f"error: --new_tokens={new_tokens} must be at least 2")
    model, rows = random_model_and_inputs(cfg, batch_size=batch_size, input_len=input_len,
                                          quantize=quantize)
    gen = Generator(model, None, max_input_len=input_len, batch_size=batch_size,
                    cross_attention=cross_attention)
    configs = {n: DecodeConfig(method="greedy", max_decode_len=n, eos_id=-1)
               for n in (1, new_tokens)}
    times: dict[int, list[float]] = {n: [] for n in configs}
    for n, config in configs.items():
        gen.generate_ids(rows, config)  # compile
    for _ in range(repeats):
        for n, config in configs.items():
            start = time.perf_counter()
            gen.generate_ids(rows, config)
            times[n].append(time.perf_counter() - start)
    request = {n: statistics.median(t) for n, t in times.items()}
    untraced_step_ms = 1e3 * (request[new_tokens] - request[1]) / (new_tokens - 1)

    config = configs[new_tokens]
    hlo = gen._jitted.lower(gen._state, jnp.asarray(rows, jnp.int32),
                            jnp.full((batch_size,), input_len, jnp.int32), jax.random.key(0),
                            config=config).compile().as_text()
    labels = hlo_labels(hlo)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        gen.generate_ids(rows, config)
        jax.profiler.stop_trace()
        plane = planes_to_summarize(load_space(find_xplane(trace_dir)))[0]
    window = loop_window(plane, labels, batch_size, cfg.vocab_size, new_tokens)
    seconds, counts = ops_in_window(plane, labels, window)
    steps = new_tokens
    wall_ms = (window[1] - window[0]) * 1e-9 / steps
    op_ms = 1e3 * sum(seconds.values()) / steps
    events = sum(counts.values()) / steps
    rows_out = [{"op": label, "ms_per_step": 1e3 * secs / steps,
                 "calls_per_step": counts[label] / steps}
                for label, secs in sorted(seconds.items(), key=lambda kv: -kv[1])]
    log(f"request: 1 token {request[1]:.3f} s, {new_tokens} tokens {request[new_tokens]:.3f} s;"
        f" one step {untraced_step_ms:.2f} ms untraced")
    log(f"traced loop: {wall_ms:.2f} ms wall per step; op time of all threads "
        f"{op_ms:.2f} ms per step; {events:.0f} op events per step")
    log(f"{'ms/step':>9}  {'share':>5}  {'calls':>6}  what the ops compute")
    for row in rows_out[:top]:
        log(f"{row['ms_per_step']:9.3f}  {100 * row['ms_per_step'] / op_ms:4.1f}%  "
            f"{row['calls_per_step']:6.1f}  {row['op'][:120]}")
    return {"request_s": {str(n): t for n, t in request.items()},
            "untraced_step_ms": untraced_step_ms, "traced_step_wall_ms": wall_ms,
            "op_ms_per_step": op_ms, "op_events_per_step": events, "ops": rows_out,
            "cross_attention": gen.cross_attention_form(), "quantize": quantize}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", action="append", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cross_attention", default="auto", choices=["auto", "kv", "absorbed"])
    parser.add_argument("--quantize", default=None, choices=["int8"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    files = args.gin_file or ["gin/models/t5_1_1/small.gin"]
    cfg = model_config_from_gin(files).replace(dtype=args.dtype)
    where = machine()
    print(f"{files[-1]} {args.dtype}, greedy, batch {args.batch_size} x {args.input_len}, "
          f"{args.new_tokens} tokens; {where['cpu_model']}, {where['cpus']} CPUs, load average "
          f"{where['load_average_1min']}", flush=True)
    result = {"benchmark": "decode_profile", "gin_files": files, "dtype": args.dtype,
              "batch_size": args.batch_size, "input_len": args.input_len,
              "new_tokens": args.new_tokens, "machine": where,
              **profile(cfg, batch_size=args.batch_size, input_len=args.input_len,
                        new_tokens=args.new_tokens, repeats=args.repeats,
                        cross_attention=args.cross_attention, quantize=args.quantize,
                        top=args.top)}
    result["command"] = "python benchmarks/decode_profile.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_result(result, args.out or os.path.join(
        ROOT, "benchmarks", "results", f"decode_profile_{args.dtype}.json"))
    return result


if __name__ == "__main__":
    main()
