"""Collective bytes of saved compiled HLO (`t5lite plan --save_hlo=DIR`), with the current
parser (`t5lite.plan.hlo.collective_bytes`), so the figures can be recomputed without compiling.

    PYTHONPATH=. python benchmarks/plan_rescan_hlo.py benchmarks/results/plan/hlo/*.hlo.txt.gz

One JSON line per file: {"file", "collective_bytes"}.
"""

from __future__ import annotations

import gzip
import json
import sys

from t5lite.plan.hlo import collective_bytes


def main(paths: list[str]) -> None:
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            text = f.read()
        print(json.dumps({"file": path, "collective_bytes": collective_bytes(text)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
