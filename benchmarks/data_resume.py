"""Resuming the input stream at batch K: replaying K batches (t5lite before issue #13) versus
restoring the saved tf.data iterator state (now), for the demo run (gin/demo.gin: task
demo_span_corruption, 128 + 32 tokens, batch 16, one host).

    PYTHONPATH=.:tasks .venv/bin/python benchmarks/data_resume.py --batch=10000

What is timed (each from a freshly built pipeline, in one process):
  replay   make_batch_stream(start_batch=K) until its first batch is out (the old resume path:
           tf.data computes and drops K batches)
  restore  make_batch_stream(start_batch=K, state=S) until its first batch is out (the new
           path: build, restore the iterator state S, no batch recomputed)
  save     BatchStream.save_state() of a stream that has handed out K batches (what every
           checkpoint does, on the step thread)
and the size of S (one host's data state per checkpoint). The next 3 batches of both streams
are compared: they must be identical. One JSON line per run is appended to
benchmarks/results/data_resume.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10_000, help="K, the batch to resume at")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "data_resume.jsonl"))
    args = parser.parse_args()

    import numpy as np
    import t5lite_tasks.demo  # noqa: F401

    from t5lite.data.pipeline import DataConfig, make_batch_stream

    config = DataConfig("demo_span_corruption", {"inputs": 128, "targets": 32},
                        host_batch_size=args.batch_size)
    t0 = time.time()
    replayed = make_batch_stream(config, start_batch=args.batch)
    first = next(replayed)
    replay_s = time.time() - t0

    # the state a checkpoint at batch K holds: a stream from batch 0 after K batches
    probe = make_batch_stream(config)
    for _ in range(args.batch):
        next(probe)
    t0 = time.time()
    state = probe.save_state()
    save_s = time.time() - t0
    size = sum(len(v) for v in state.values())

    t0 = time.time()
    restored = make_batch_stream(config, start_batch=args.batch, state=state)
    again = next(restored)
    restore_s = time.time() - t0

    want = [first] + [next(replayed) for _ in range(3)]
    got = [again] + [next(restored) for _ in range(3)]
    identical = all(np.array_equal(a[k], b[k]) for a, b in zip(want, got) for k in a)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                         text=True).stdout.split(":")[-1].strip()
    record = {"batch": args.batch, "batch_size": args.batch_size,
              "replay_first_batch_s": round(replay_s, 2),
              "restore_first_batch_s": round(restore_s, 2), "save_state_s": round(save_s, 2),
              "state_bytes_per_host": size, "identical_next_4_batches": identical,
              "cpu": cpu, "load_avg_1min": round(os.getloadavg()[0], 1),
              "date": time.strftime("%Y-%m-%d"), "host": platform.node()}
    print(json.dumps(record))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
