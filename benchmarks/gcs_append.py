"""Cost of appending metrics.jsonl records on gs://: t5lite's segment log vs one object.

    python benchmarks/gcs_append.py [--records=7200] [--segment_bytes=262144]

Starts fake-gcs-server on 127.0.0.1 (tests/gcs_emulator.py) and logs `--records` real-sized
train-metrics lines (~260 bytes), one per simulated second (the clock is simulated, the
uploads are real), with the trainer's flush period of 30 s, two ways:
  one object  metrics.jsonl uploaded again, whole, at every flush (an "append" on an object
              store without segments; tensorboardX's own gs:// event writer does this)
  segments    storage.AppendLog: only the current segment is uploaded again; a new segment
              starts every `--segment_bytes`
Prints bytes uploaded, uploads, the largest upload and the objects left.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from gcs_emulator import GcsEmulator  # noqa: E402

RECORD = json.dumps({"step": 123400, "split": "train", "loss": 2.3456789, "accuracy": 0.512345,
                     "learning_rate": 0.00123456, "tokens_per_sec": 108512.25, "mfu": 0.257,
                     "z_loss": 0.0001234, "grad_norm": 0.98765, "step_time": 0.18512,
                     "target_tokens": 3648.0, "time": 1796204152.629}) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=7200)
    parser.add_argument("--segment_bytes", type=int, default=256 << 10)
    args = parser.parse_args()
    with GcsEmulator() as gcs:
        gcs.create_bucket("bench")
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
        from t5lite import storage

        storage.configure()
        results = {}
        clock = [0.0]
        real_monotonic = time.monotonic
        time.monotonic = lambda: clock[0]
        try:
            content, sent, uploads, last, t0 = b"", 0, 0, 0.0, time.perf_counter()
            for _ in range(args.records):
                clock[0] += 1.0
                content += RECORD.encode()
                if clock[0] - last >= 30:
                    storage.write_atomic("gs://bench/one/metrics.jsonl", content)
                    sent, uploads, last = sent + len(content), uploads + 1, clock[0]
            storage.write_atomic("gs://bench/one/metrics.jsonl", content)
            results["one object"] = (sent + len(content), uploads + 1, len(content), 1,
                                     time.perf_counter() - t0)

            t0 = time.perf_counter()
            log = storage.AppendLog("gs://bench/seg/metrics.jsonl",
                                    segment_bytes=args.segment_bytes)
            for _ in range(args.records):
                clock[0] += 1.0
                log.write(RECORD)
            log.close()
            objects = len(storage.glob("gs://bench/seg/metrics.jsonl.*"))
            results["segments"] = (log.uploaded_bytes, log.uploads,
                                   min(args.segment_bytes + len(RECORD), len(content)), objects,
                                   time.perf_counter() - t0)
        finally:
            time.monotonic = real_monotonic
        assert len(storage.read_lines("gs://bench/seg/metrics.jsonl")) == args.records
    print(f"{args.records} records of {len(RECORD)} bytes "
          f"({args.records * len(RECORD) / 1e6:.2f} MB of metrics), segment {args.segment_bytes} B")
    for name, (sent, uploads, largest, objects, wall) in results.items():
        print(f"{name:>10}: {sent / 1e6:8.2f} MB uploaded in {uploads:4d} uploads (largest "
              f"{largest / 1e3:.0f} kB), {objects} object(s), {wall:5.1f} s")


if __name__ == "__main__":
    main()
