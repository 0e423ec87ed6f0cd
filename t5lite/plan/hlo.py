"""Collective traffic of a compiled (SPMD-partitioned, per-device) HLO module.

`collective_bytes(hlo_text)` sums, per collective kind, the bytes each device moves per step:
for every all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute
instruction, the size of its largest array (an all-gather's gathered result, a
reduce-scatter's full input, an all-reduce's buffer), times how often it runs: instructions in
the body of a `while` loop with a known trip count (scanned layers, microbatches) count once per
iteration. Async pairs (`all-gather-start` / `-done`) count once, at the start.

Example::

    >>> text = '''
    ... ENTRY %main (p: f32[8,4]) -> f32[32,4] {
    ...   %p = f32[8,4]{1,0} parameter(0)
    ...   ROOT %ag = f32[32,4]{1,0} all-gather(f32[8,4]{1,0} %p), dimensions={0}
    ... }'''
    >>> collective_bytes(text)["all-gather"]
    512
"""

from __future__ import annotations

import re
from collections import defaultdict

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|"
                    r"called_computations)=\{?([%\w.\-, ]+)\}?")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def _array_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        out.append(n * _DTYPE_BYTES[dtype])
    return out


def _kind(opcode: str) -> str | None:
    for kind in KINDS:
        if opcode == kind or opcode == kind + "-start":
            return kind
    return None


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per device per step for each collective kind (see module doc)."""
    comps: dict[str, list[tuple[str, str, str]]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_HEAD.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append((m.group(3), m.group(2), m.group(4)))
    if entry is None:
        return {k: 0 for k in KINDS}
    # how often each computation runs per step (sum over its callers)
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, instrs in comps.items():
        for opcode, _, rest in instrs:
            trip = 1
            if opcode == "while":
                t = _TRIP.search(rest)
                trip = int(t.group(1)) if t else 1
            for group in _CALLS.findall(rest):
                for callee in group.split(","):
                    callee = callee.strip().lstrip("%")
                    if callee in comps:
                        edges[name].append((callee, trip))
    times: dict[str, int] = defaultdict(int)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:  # post-order, then reversed = callers before callees
        if name in seen:
            return
        seen.add(name)
        for callee, _ in edges[name]:
            visit(callee)
        order.append(name)

    visit(entry)
    times[entry] = 1
    for name in reversed(order):
        for callee, trip in edges[name]:
            times[callee] += times[name] * trip
    totals = {k: 0 for k in KINDS}
    for name, instrs in comps.items():
        if not times.get(name):
            continue
        for opcode, result, rest in instrs:
            kind = _kind(opcode)
            if kind is None:
                continue
            operands = rest.split("),")[0]
            sizes = _array_bytes(result) + _array_bytes(operands)
            if sizes:
                totals[kind] += max(sizes) * times[name]
    return totals
