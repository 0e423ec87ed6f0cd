"""Where the time of a `jax.profiler` trace went: top ops per device, as plain text.

    python benchmarks/profile_summary.py PROFILE_DIR_OR_XPLANE_PB [--top=40] [--steps=2]
        [--hlo=OPTIMISED_HLO.txt]

Reads the `*.xplane.pb` that `jax.profiler.start_trace/stop_trace` writes (e.g. through
`benchmarks/train_step.py --profile_dir=DIR`) without TensorBoard: for every device plane
(`/device:GPU:0`, `/device:TPU:0`, ...) it sums event durations per line (a CUDA stream, "XLA Ops",
...) and, on the busiest line kind, per HLO op (the event's `hlo_op` stat when the profiler
recorded one, else the event name, i.e. the kernel). Durations are divided by `--steps`, so with
the two traced steps of train_step.py the figures are per step. On CPU-only traces the host
plane's XLA threads are summarised the same way.

With `--hlo=FILE` (the optimised HLO text of the traced program: `compiled.as_text()`, or the
`*after_optimizations.txt` of `XLA_FLAGS=--xla_dump_to=DIR`), a last section groups the
program's own ops by what they compute: the JAX operation that made them (layer and loop
prefixes dropped), the result shape and, for a fusion, the ops fused into it; e.g. the 24
`dot_general f32[8,512]` dots of a decoding step add up to one row. Library and executor
events (thread-pool waits, "ThunkExecutor") are left out of that section.

Needs the XPlane protobuf module, which TensorFlow ships (`tensorflow.tsl.profiler.protobuf`) and
so does the `xprof`/`tensorboard-plugin-profile` package; the project's test environment has it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import os
import re
import sys


def _xplane_module():
    for name in ("tensorflow.tsl.profiler.protobuf.xplane_pb2", "tsl.profiler.protobuf.xplane_pb2",
                 "xprof.protobuf.xplane_pb2", "tensorboard_plugin_profile.protobuf.xplane_pb2"):
        try:
            return __import__(name, fromlist=["XSpace"])
        except ImportError:
            continue
    raise SystemExit("error: no XPlane protobuf module found; install tensorflow or xprof")


def find_xplane(path: str) -> str:
    """The newest *.xplane.pb(.gz) at or under `path`."""
    if os.path.isfile(path):
        return path
    files = glob.glob(os.path.join(path, "**", "*.xplane.pb*"), recursive=True)
    if not files:
        raise SystemExit(f"error: no *.xplane.pb under {path}; pass the --profile_dir of a "
                         "traced run")
    return max(files, key=os.path.getmtime)


def load_space(path: str):
    data = open(path, "rb").read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    space = _xplane_module().XSpace()
    space.ParseFromString(data)
    return space


def _line_kind(name: str) -> str:
    """Collapse per-stream / per-thread line names into one kind ("Stream #13(...)" -> "Stream")."""
    return re.sub(r"\s*#?\d+.*$", "", name) or name


def kernel_family(name: str) -> str:
    """Group kernels: XLA fusions lose their numeric suffix ("loop_add_fusion_12" ->
    "loop_add_fusion"), library kernels (cuBLAS/CUTLASS/cuDNN) keep a short prefix of their name."""
    name = re.sub(r"[._]\d+$", "", name)
    for marker, family in (("flash", "cudnn flash attention"), ("cudnn", "cudnn"),
                           ("gemm", "gemm (library)"), ("cutlass", "gemm (library)"),
                           ("xmma", "gemm (library)"), ("sm90_", "gemm (library)")):
        if marker in name.lower():
            return family
    return name


def summarize_plane(plane, steps: int, top: int) -> list[str]:
    names = {k: v.name or v.display_name for k, v in plane.event_metadata.items()}
    stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
    by_line: dict[str, float] = collections.Counter()
    by_op: dict[str, dict[str, float]] = collections.defaultdict(collections.Counter)
    count: dict[str, dict[str, int]] = collections.defaultdict(collections.Counter)
    by_family: dict[str, dict[str, float]] = collections.defaultdict(collections.Counter)
    family_count: dict[str, dict[str, int]] = collections.defaultdict(collections.Counter)
    for line in plane.lines:
        kind = _line_kind(line.name)
        for event in line.events:
            seconds = event.duration_ps * 1e-12
            by_line[kind] += seconds
            label = names.get(event.metadata_id, "?")
            if not label or label == "?":  # fall back to the HLO op the kernel belongs to
                for stat in event.stats:
                    if stat_names.get(stat.metadata_id) == "hlo_op":
                        label = stat.str_value or stat_names.get(stat.ref_value, label)
                        break
            by_op[kind][label] += seconds
            count[kind][label] += 1
            family = kernel_family(label)
            by_family[kind][family] += seconds
            family_count[kind][family] += 1
    if not by_line:
        return []
    out = [f"== {plane.name}: busy time per line kind (ms per step)"]
    for kind, seconds in by_line.most_common():
        out.append(f"   {1e3 * seconds / steps:10.2f}  {kind}")
    for kind in [k for k, _ in by_line.most_common(2)]:
        total = by_line[kind]
        out.append(f"-- kernel families on '{kind}' (ms per step, share, calls per step)")
        for family, seconds in by_family[kind].most_common(top):
            out.append(f"   {1e3 * seconds / steps:10.3f}  {100 * seconds / total:5.1f}%  "
                       f"{family_count[kind][family] / steps:7.1f}  {family[:110]}")
        out.append(f"-- top ops on '{kind}' (ms per step, share, calls per step)")
        for label, seconds in by_op[kind].most_common(top):
            out.append(f"   {1e3 * seconds / steps:10.3f}  {100 * seconds / total:5.1f}%  "
                       f"{count[kind][label] / steps:7.1f}  {label[:110]}")
    return out


_INSTRUCTION_START = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")


def _parse_instruction(line: str) -> tuple[str, str, str, str] | None:
    """(name, result shape, opcode, rest of the line) of one HLO instruction line, else None.
    A tuple shape `(s32[], f32[8]{0}, /*index=5*/...)` is taken whole."""
    m = _INSTRUCTION_START.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        depth = 0
        for end, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\((.*)$", rest)
    return (m.group(1), shape, op.group(1), op.group(2)) if op else None


_FUSED_OPS_SKIPPED = {"parameter", "constant", "bitcast", "broadcast", "tuple",
                      "get-tuple-element"}


def hlo_labels(hlo_text: str) -> dict[str, str]:
    """What each instruction of an optimised HLO module computes, keyed by instruction name:
    "<JAX op path> <result shape> [<ops fused into it>]". The op path is the instruction's
    `op_name` metadata without the `jit(...)/` prefix and without `while/body/`,
    `closed_call/` or `checkpoint/` segments, so every layer's copy of an op gets one label.

    Example: `%fusion.3 = f32[8,512]{1,0} fusion(...), calls=%fused_computation.3,
    metadata={op_name="jit(_run)/while/body/dot_general"}` whose computation holds a convert
    and a dot -> "dot_general f32[8,512] [convert,dot]"."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) (?:\(|\{)", line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), [])
        elif current is not None and line.startswith(" "):
            current.append(line)
    labels: dict[str, str] = {}
    for body in computations.values():
        for line in body:
            parsed = _parse_instruction(line)
            if parsed is None:
                continue
            name, shape, opcode, rest = parsed
            op_name = re.search(r'op_name="([^"]*)"', rest)
            path = op_name.group(1) if op_name else opcode
            path = re.sub(r"^jit\([^)]*\)/", "", path)
            path = re.sub(r"(?:while/body/|while/cond/|closed_call/|checkpoint/|"
                          r"rematted_computation/|jvp\([^)]*\)/|transpose\([^)]*\)/)", "",
                          path)
            label = path + " " + re.sub(r"\{[^}]*\}", "", shape)
            called = re.search(r"calls=%([\w.\-]+)", rest)
            if opcode == "fusion" and called and called.group(1) in computations:
                fused = sorted({p[2] for p in map(_parse_instruction,
                                                  computations[called.group(1)])
                                if p and p[2] not in _FUSED_OPS_SKIPPED})
                label += f" [{','.join(fused)}]"
            labels[name] = label
    return labels


def by_computed_op(plane, labels: dict[str, str]) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds and event counts per `hlo_labels` label over every line of `plane`; events whose
    name is not an instruction of the module (executor, thread pool, Python) are skipped."""
    names = {k: v.name or v.display_name for k, v in plane.event_metadata.items()}
    seconds: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    for line in plane.lines:
        for event in line.events:
            label = labels.get(names.get(event.metadata_id, ""))
            if label is not None:
                seconds[label] += event.duration_ps * 1e-12
                counts[label] += 1
    return seconds, counts


def computed_op_lines(seconds: dict[str, float], counts: dict[str, int], steps: float,
                      top: int) -> list[str]:
    total = sum(seconds.values())
    out = [f"-- what the ops compute, all threads ({1e3 * total / steps:.2f} ms per step; "
           "ms per step, share, calls per step)"]
    for label, secs in sorted(seconds.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"   {1e3 * secs / steps:10.3f}  {100 * secs / max(total, 1e-30):5.1f}%  "
                   f"{counts[label] / steps:7.1f}  {label[:150]}")
    return out


def summarize(path: str, steps: int = 2, top: int = 40, hlo_text: str | None = None) -> str:
    xplane = find_xplane(path)
    planes = planes_to_summarize(load_space(xplane))
    lines = [f"trace {xplane}"]
    labels = hlo_labels(hlo_text) if hlo_text else None
    for plane in planes:
        lines += summarize_plane(plane, steps, top)
        if labels:
            lines += computed_op_lines(*by_computed_op(plane, labels), steps, top)
    if not planes:
        lines.append("(no plane in this trace recorded any event)")
    return "\n".join(lines)


def planes_to_summarize(space) -> list:
    """Device planes that recorded events, else the host CPU plane.

    Empty device planes do not count: once libtpu is loaded in a process (e.g. by the planner's
    TPU topology), every trace carries an event-less `/device:CUSTOM:Megascale Trace` plane, and
    on a CPU-only run the work is on `/host:CPU`.
    """
    def busy(plane) -> bool:
        return any(line.events for line in plane.lines)
    devices = [p for p in space.planes if p.name.startswith("/device:") and busy(p)]
    return devices or [p for p in space.planes if p.name.startswith("/host:CPU") and busy(p)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a --profile_dir, or one *.xplane.pb file")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--steps", type=int, default=2, help="steps in the trace")
    parser.add_argument("--hlo", default=None,
                        help="optimised HLO text of the traced program (adds 'what the ops "
                             "compute')")
    args = parser.parse_args(argv)
    hlo_text = None
    if args.hlo:
        if not os.path.isfile(args.hlo):
            raise SystemExit(f"error: --hlo={args.hlo} is not a file; pass the optimised HLO "
                             "text (compiled.as_text(), or an XLA dump's "
                             "*after_optimizations.txt)")
        with open(args.hlo) as f:
            hlo_text = f.read()
    print(summarize(args.path, args.steps, args.top, hlo_text))


if __name__ == "__main__":
    sys.exit(main())
