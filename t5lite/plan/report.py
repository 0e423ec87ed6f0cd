"""Text and JSON output of plans."""

from __future__ import annotations

import json

from t5lite.plan.hlo import KINDS
from t5lite.plan.train import PlanResult


def human(n: float | int | None) -> str:
    """Bytes as a short human string: 1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _mesh_text(mesh: dict[str, int]) -> str:
    parts = [f"{k}={v}" for k, v in mesh.items() if v > 1]
    return ",".join(parts) or "1 device"


def _fits(r: PlanResult) -> str:
    if r.fits is None:
        return "n/a"
    return "yes" if r.fits else "NO"


def to_json_lines(results: list[PlanResult]) -> str:
    return "\n".join(json.dumps(r.as_json(), sort_keys=False) for r in results)


def detail(r: PlanResult) -> str:
    """A multi-line report of one plan."""
    d = r.per_device
    lines = [f"plan: {r.mode} step on {r.topology} ({r.num_devices} x {r.device_kind})"
             + ("  [APPROXIMATE: XLA:CPU compiler, not the target's]" if r.approximate else ""),
             f"  partitioning {r.partitioning}, mesh {_mesh_text(r.mesh)}, global batch "
             f"{r.batch_size}" + (f" in {r.microbatches} microbatches" if r.microbatches > 1
                                  else "") + f", remat {r.remat_policy}",
             "  per device:"]
    rows = [("parameters", d.get("params_bytes")), ("optimiser state", d.get("optimizer_bytes"))]
    if "cache_bytes" in d:
        rows.append(("decoding caches", d.get("cache_bytes")))
    rows += [("batch", d.get("batch_bytes")), ("arguments (compiler)", d.get("argument_bytes")),
             ("outputs", d.get("output_bytes")), ("aliased (donated)", d.get("alias_bytes")),
             ("temporaries", d.get("temp_bytes")), ("generated code", d.get("generated_code_bytes")),
             ("peak", d.get("peak_bytes")), ("HBM (nominal)", d.get("hbm_bytes")),
             ("HBM usable (verdict)", d.get("usable_hbm_bytes", d.get("hbm_bytes")))]
    for name, value in rows:
        lines.append(f"    {name:<22} {human(value):>12}")
    if r.fits is None:
        lines.append("  fits: n/a (no memory size for this target; pass --hbm_gib=N)")
    else:
        lines.append(f"  fits: {'yes' if r.fits else 'NO'}"
                     + (f", headroom {human(r.headroom_bytes)}" if r.headroom_bytes is not None
                        else "")
                     + (f" (against the usable HBM: {r.usable_hbm_source})"
                        if r.usable_hbm_source else ""))
    lines.append(f"  model FLOPs per step: {r.model_flops_per_step:.3e}"
                 + (f"; compiler FLOPs per device: {r.compiler_flops_per_device:.3e} (XLA's cost "
                    "analysis: loop bodies counted once)" if r.compiler_flops_per_device else ""))
    if r.collective_bytes:
        lines.append("  collectives per device per step: " + ", ".join(
            f"{k} {human(r.collective_bytes.get(k, 0))}" for k in KINDS))
    lines.append(f"  compile: {r.lower_seconds:.1f} s tracing + {r.compile_seconds:.1f} s "
                 f"compiling (wall clock; {r.compile_cpu_seconds:.1f} s of CPU time)")
    if r.note:
        lines.append(f"  note: {r.note}")
    return "\n".join(lines)


def sort_rows(results: list[PlanResult]) -> list[PlanResult]:
    """Fitting plans first, then by total collective bytes (fewest first), then peak."""
    def key(r: PlanResult):
        return (0 if r.fits else 1 if r.fits is None else 2,
                sum(r.collective_bytes.values()) if r.collective_bytes else float("inf"),
                r.per_device.get("peak_bytes") or 0)

    return sorted(results, key=key)


def table(results: list[PlanResult], skipped: list[tuple[str, str]] = ()) -> str:
    """One row per plan, sorted by fit then collective bytes."""
    if not results and not skipped:
        return "(no plans)"
    head = ["recipe", "mesh", "params", "optimiser", "temp", "peak", "HBM usable", "fits",
            "all-gather", "red-scatter", "all-reduce", "all-to-all", "compile s"]
    rows = [head]
    for r in sort_rows(results):
        d, c = r.per_device, r.collective_bytes
        rows.append([r.partitioning, _mesh_text(r.mesh), human(d.get("params_bytes")),
                     human(d.get("optimizer_bytes")), human(d.get("temp_bytes")),
                     human(d.get("peak_bytes")),
                     human(d.get("usable_hbm_bytes", d.get("hbm_bytes"))), _fits(r),
                     human(c.get("all-gather")) if c else "-",
                     human(c.get("reduce-scatter")) if c else "-",
                     human(c.get("all-reduce")) if c else "-",
                     human(c.get("all-to-all")) if c else "-",
                     f"{r.lower_seconds + r.compile_seconds:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = []
    first = results[0] if results else None
    if first is not None:
        out.append(f"plan: {first.mode} step on {first.topology} ({first.num_devices} x "
                   f"{first.device_kind}), global batch {first.batch_size}, remat "
                   f"{first.remat_policy}, per-device bytes"
                   + ("  [APPROXIMATE: XLA:CPU compiler]" if first.approximate else ""))
    for row in rows:
        out.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(row, widths))))
    if first is not None and first.usable_hbm_source:
        out.append(f"HBM: {human(first.per_device.get('hbm_bytes'))} nominal per chip; "
                   f"{human(first.per_device.get('usable_hbm_bytes'))} usable "
                   f"({first.usable_hbm_source}), which the verdicts compare with")
    for name, why in skipped:
        out.append(f"skipped {name}: {why}")
    notes = [f"{r.partitioning}: {r.note}" for r in results if r.note and not r.fits]
    out += [f"note {n}" for n in notes]
    return "\n".join(out)
