"""The smallest TPU slice (and the recipes) on which a preset's pretraining step fits, found by
`t5lite plan` itself.

    PYTHONPATH=. python benchmarks/plan_sweep.py --preset=gin/models/t5_1_1/small.gin \\
        --generations=v4,v5p --out=benchmarks/results/plan/smallest_slices.jsonl

For each preset (a model gin file, composed with `gin/runs/pretrain.gin`: global batch 128 of
512 / 114 tokens, Adafactor, no remat) and each generation, the standard slices are tried from
the smallest (4 chips: v4-8, v5p-8) upwards. On each slice every recipe (`--partitioning=all`:
dp, dp_tp, fsdp, fsdp_tp, tp on their default meshes) is planned exactly as

    t5lite plan --gin_file=PRESET --gin_file=gin/runs/pretrain.gin --topology=SLICE \\
        --partitioning=all --format=json

would (the same `run_plan` code, in one process so libtpu and JAX start once), except that a
recipe whose per-device parameters + optimiser state + batch alone exceed the chip's HBM is
answered "no" without compiling (`skip_if_arguments_exceed_hbm`; such a plan cannot fit). The
sweep stops at the first slice on which some recipe fits. `--partitioning=first_fit` saves
compiles: on each slice it tries dp, fsdp, fsdp_tp, dp_tp, tp in that order and stops at the
first that fits (the row then names a recipe that fits, not necessarily the one with the least
communication). Every plan is one JSON line (the plan
command's fields plus `preset`, `command`, `date`, `cpu`, `load_avg_1m`), and each
(preset, generation) ends with a `summary` line: the slice, the recipes that fit, and the
best one (fitting, then fewest collective bytes, as `--partitioning=all` sorts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from cpu_info import cpu_model

RUN_GIN = "gin/runs/pretrain.gin"
CHIPS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
# --partitioning=first_fit tries the recipes in this order (least communication first for
# models that fit replicated) and stops at the first that fits on a slice
ORDER = ("dp", "fsdp", "fsdp_tp", "dp_tp", "tp")


def _command(preset: str, topology: str, recipe: str) -> str:
    return (f"t5lite plan --gin_file={preset} --gin_file={RUN_GIN} --topology={topology} "
            f"--partitioning={recipe} --format=json")


def sweep(preset: str, generation: str, max_chips: int, out, bindings: list[str],
          min_chips: int = 4, recipes: str = "all") -> dict:
    """Plan `preset` on slices of `generation` from the smallest up; the summary row."""
    from t5lite.commands.plan import _PLACEHOLDER_TASK, _configure
    from t5lite.errors import UserError
    from t5lite.plan import report
    from t5lite.plan.runner import PlanRequest, compile_plans
    from t5lite.plan.topologies import parse_topology, target_devices

    model, train, mesh, lengths = _configure([preset, RUN_GIN], [_PLACEHOLDER_TASK] + bindings)
    per_chip = 2 if generation in ("v4", "v5p") else 1
    tried = []
    for chips in (c for c in CHIPS if min_chips <= c <= max_chips):
        name = f"{generation}-{chips * per_chip}"
        topo = parse_topology(name)
        devices = target_devices(topo)
        t0 = time.perf_counter()
        results, skipped = [], []
        for recipe in (ORDER if recipes in ("all", "first_fit") else recipes.split(",")):
            req = PlanRequest(model_config=model, train_config=train, mesh_config=mesh,
                              feature_lengths=lengths, topology=topo, partitioning=recipe,
                              skip_if_arguments_exceed_hbm=True)
            try:
                results += compile_plans(req, devices)[0]
            except UserError as e:  # this recipe's mesh / batch split does not work here
                skipped.append((recipe, str(e)))
                continue
            if recipes == "first_fit" and results[-1].fits:
                break
        seconds = time.perf_counter() - t0
        stamp = dict(preset=preset, date=datetime.date.today().isoformat(), cpu=cpu_model(),
                     load_avg_1m=round(os.getloadavg()[0], 2))
        for r in report.sort_rows(results):
            row = dict(r.as_json(), **stamp, command=_command(preset, name, r.partitioning))
            out.write(json.dumps(row) + "\n")
        for recipe, why in skipped:
            out.write(json.dumps(dict(stamp, topology=name, partitioning=recipe, skipped=why,
                                      command=_command(preset, name, recipe))) + "\n")
        out.flush()
        fitting = [r for r in report.sort_rows(results) if r.fits]
        line = (f"{preset} {name}: " + ", ".join(
            f"{r.partitioning} {'fits' if r.fits else 'no'} "
            f"({report.human(r.per_device.get('peak_bytes'))}, "
            f"{r.lower_seconds + r.compile_seconds:.0f} s)" for r in results)
            + f"; slice total {seconds:.0f} s")
        print(line, file=sys.stderr, flush=True)
        tried.append(name)
        if fitting:
            best = fitting[0]
            summary = dict(
                summary="smallest slice that fits", generation=generation,
                batch_size=train.batch_size, slices_tried=tried, topology=name,
                num_devices=best.num_devices, fitting_recipes=[r.partitioning for r in fitting],
                best=best.partitioning, best_mesh={k: v for k, v in best.mesh.items() if v > 1},
                best_params_bytes=best.per_device["params_bytes"],
                best_peak_bytes=best.per_device["peak_bytes"],
                hbm_bytes=best.per_device["hbm_bytes"],
                usable_hbm_bytes=best.per_device.get("usable_hbm_bytes"),
                collective_bytes=best.collective_bytes,
                command=_command(preset, name, "all" if recipes == "all" else best.partitioning),
                recipes_tried=recipes, **stamp)
            out.write(json.dumps(summary) + "\n")
            out.flush()
            return summary
    summary = dict(summary=f"nothing fits from {min_chips} to {max_chips} chips",
                   preset=preset, generation=generation, slices_tried=tried)
    out.write(json.dumps(summary) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", required=True, help="model gin file(s)")
    parser.add_argument("--generations", default="v4,v5p")
    parser.add_argument("--min_chips", type=int, default=4,
                        help="start here (the smaller slices are then not tried: say so)")
    parser.add_argument("--max_chips", type=int, default=512)
    parser.add_argument("--partitioning", default="all",
                        help="all (every recipe on each slice), first_fit (stop at the first "
                        "recipe of ORDER that fits), or a comma-separated list of recipes")
    parser.add_argument("--gin", action="append", default=[], help="extra gin bindings")
    parser.add_argument("--out", default="benchmarks/results/plan/smallest_slices.jsonl")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as out:
        for preset in args.preset:
            for gen in args.generations.split(","):
                s = sweep(preset, gen, args.max_chips, out, args.gin, args.min_chips,
                          args.partitioning)
                print(json.dumps({k: s.get(k) for k in ("preset", "generation", "topology",
                                                        "best", "fitting_recipes")}),
                      flush=True)


if __name__ == "__main__":
    main()
