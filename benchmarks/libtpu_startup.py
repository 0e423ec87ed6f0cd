"""Does installing libtpu (for `t5lite plan`) change `t5lite info` on a host without TPUs?

    .venv/bin/python benchmarks/libtpu_startup.py --rounds=3

Runs `t5lite info --gin_file=gin/models/t5_1_1/small.gin` (which starts JAX's backends to lay
out the model) in fresh processes, alternating three variants per round:

  without_libtpu   libtpu made unimportable (what a `.[test]`-less install sees)
  with_libtpu      libtpu importable, t5lite as it is (JAX's TPU backend disarmed at import)
  with_libtpu_raw  libtpu importable and the disarming skipped: what JAX 0.10.2 does by itself
                   (loads libtpu, prints TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES warnings)

and reports the wall time of each run, whether stderr mentions the TPU runtime, and JSON lines in
benchmarks/results/libtpu_startup.jsonl. Run it where libtpu is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_BLOCK = ("import sys\nclass _No:\n    def find_spec(self, name, path=None, target=None):\n"
          "        if name == 'libtpu': raise ModuleNotFoundError(name)\n"
          "sys.meta_path.insert(0, _No())\n")
_RUN = "import sys; from t5lite.cli import main; main(['t5lite', 'info'] + sys.argv[1:])"
VARIANTS = {
    "without_libtpu": _BLOCK + _RUN,
    "with_libtpu": _RUN,
    # skip t5lite's fix: stub the module before the package's __init__ calls it
    "with_libtpu_raw": ("import sys, types\nm = types.ModuleType('t5lite._platforms')\n"
                        "m.keep_jax_off_absent_tpus = lambda: False\n"
                        "sys.modules['t5lite._platforms'] = m\n" + _RUN),
}
TPU_WORDS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "libtpu", "InitGoogle")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gin_file", default="gin/models/t5_1_1/small.gin")
    ap.add_argument("--out", default="benchmarks/results/libtpu_startup.jsonl")
    args = ap.parse_args()
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    tpu_noise: dict[str, bool] = {k: False for k in VARIANTS}
    for _ in range(args.rounds):
        for name, code in VARIANTS.items():
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code, f"--gin_file={args.gin_file}",
                                  "--sharding=fsdp"], env=env, capture_output=True, text=True)
            times[name].append(time.perf_counter() - t0)
            if out.returncode != 0:
                sys.exit(f"{name} failed: {out.stderr[-2000:]}")
            tpu_noise[name] |= any(w in out.stderr for w in TPU_WORDS)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for name in VARIANTS:
            row = {"variant": name, "seconds": [round(t, 2) for t in times[name]],
                   "median_s": round(statistics.median(times[name]), 2),
                   "tpu_messages_on_stderr": tpu_noise[name], "cpu": cpu,
                   "date": time.strftime("%Y-%m-%d"), "load_avg_1m": os.getloadavg()[0]}
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
