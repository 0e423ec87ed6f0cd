"""Cost of appending metrics.jsonl records on gs://: t5lite's segment log vs rewriting one object.

    python benchmarks/gcs_append.py [--records=2000] [--segment_bytes=1048576]

Starts fake-gcs-server on 127.0.0.1 (tests/gcs_emulator.py) and writes `--records` records of
a real train-metrics line (~300 bytes) three ways, flushing after every record (the worst case:
the trainer flushes at most every 30 s):
  rewrite   the whole object uploaded again on every record (what an "append" on an object
            store costs without segments; also tensorboardX's own gs:// event writer)
  segments  storage.AppendLog: the current segment uploaded again, a new one every
            `--segment_bytes`
  segments/30s  storage.AppendLog with its default flush_secs=30, records 1 s apart (simulated
            clock), i.e. a run that logs every second
Prints bytes uploaded, uploads and wall time of each.
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
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--segment_bytes", type=int, default=1 << 20)
    args = parser.parse_args()
    with GcsEmulator() as gcs:
        gcs.create_bucket("bench")
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
        from t5lite import storage

        storage.configure()
        results = {}
        t0 = time.perf_counter()
        content, sent = b"", 0
        for _ in range(args.records):
            content += RECORD.encode()
            storage.write_atomic("gs://bench/rewrite/metrics.jsonl", content)
            sent += len(content)
        results["rewrite"] = (sent, args.records, time.perf_counter() - t0)

        t0 = time.perf_counter()
        log = storage.AppendLog("gs://bench/seg/metrics.jsonl", flush_secs=0,
                                segment_bytes=args.segment_bytes)
        for _ in range(args.records):
            log.write(RECORD)
        log.close()
        results["segments"] = (log.uploaded_bytes, log.uploads, time.perf_counter() - t0)

        clock = [0.0]
        real_monotonic = time.monotonic
        time.monotonic = lambda: clock[0]
        try:
            t0 = time.perf_counter()
            log = storage.AppendLog("gs://bench/seg30/metrics.jsonl",
                                    segment_bytes=args.segment_bytes)
            for _ in range(args.records):
                clock[0] += 1.0
                log.write(RECORD)
            log.close()
            results["segments/30s"] = (log.uploaded_bytes, log.uploads,
                                       time.perf_counter() - t0)
        finally:
            time.monotonic = real_monotonic
        assert len(storage.read_lines("gs://bench/seg/metrics.jsonl")) == args.records
    print(f"{args.records} records of {len(RECORD)} bytes "
          f"({args.records * len(RECORD) / 1e6:.2f} MB of metrics), segment {args.segment_bytes} B")
    for name, (sent, uploads, wall) in results.items():
        print(f"{name:>13}: {sent / 1e6:9.2f} MB uploaded in {uploads:5d} uploads, {wall:6.1f} s")


if __name__ == "__main__":
    main()
