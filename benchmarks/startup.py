"""Start-up time of `t5lite` verbs, and whether TensorFlow's C++ start-up lines are printed.

    python benchmarks/startup.py [--reps=5] [--baseline=DIR]

Runs `t5lite info --gin_file=gin/models/t5_1_1/small.gin`, `t5lite infer --help` and
`t5lite data --task=demo_span_corruption --num=1` `--reps` times each from this checkout (and,
with `--baseline`, alternately from another checkout of t5lite, e.g. `git worktree add /tmp/old
<commit>`), each in a fresh process with that checkout first on PYTHONPATH, and prints the median
wall time and the number of TensorFlow start-up lines on stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"info": ["info", "--gin_file=gin/models/t5_1_1/small.gin"],
            "infer --help": ["infer", "--help"],
            "data --num=1": ["data", "--task=demo_span_corruption", "--num=1"]}
TF_MARKERS = ("port.cc", "cudart_stub", "absl::InitializeLog", "cuInit", "cpu_feature_guard")
RUN = "import sys; sys.argv[0] = 't5lite'; from t5lite.cli import main; main()"


def run_once(root: str, args: list[str]) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=f"{root}:{root}/tasks")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN, *args], cwd=root, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0 and "--help" not in args:
        raise SystemExit(f"{root}: t5lite {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return wall, sum(any(m in line for m in TF_MARKERS) for line in r.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="another t5lite checkout to compare")
    args = parser.parse_args()
    trees = {"this": ROOT} | ({"baseline": os.path.abspath(args.baseline)}
                              if args.baseline else {})
    times = {(t, c): [] for t in trees for c in COMMANDS}
    lines = {}
    for rep in range(args.reps):
        for name, cmd in COMMANDS.items():
            order = list(trees.items())
            for tree, root in (order if rep % 2 == 0 else order[::-1]):
                wall, lines[(tree, name)] = run_once(root, cmd)
                times[(tree, name)].append(wall)
    for name in COMMANDS:
        parts = [f"{tree}: median {statistics.median(times[(tree, name)]):6.2f} s "
                 f"(runs {', '.join(f'{x:.1f}' for x in times[(tree, name)])}; "
                 f"TF lines {lines[(tree, name)]})" for tree in trees]
        print(f"t5lite {name:<13} " + " | ".join(parts))


if __name__ == "__main__":
    main()
