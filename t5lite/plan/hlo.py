"""Collective traffic of a compiled (SPMD-partitioned, per-device) HLO module.

`collective_bytes(hlo_text)` sums, per collective kind, the bytes each device moves per step:
for every all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute, the size
of its data (an all-gather's gathered result, a reduce-scatter's full input, an all-reduce's
buffers — all elements of a tuple), times how often it runs: instructions in the body of a
`while` loop (scanned layers, microbatches) count once per iteration. The TPU compiler splits an async collective into start / done fusions that each
hold a copy of the op with the same `channel_id`: each channel counts once (at its most frequent
place). The trip count is the
loop's `known_trip_count` when the compiler records it, else the integer bound its condition
compares the counter with (`i < N`, the form `lax.scan` produces). Async pairs
(`all-gather-start` / `-done`) count once, at the start. The TPU compiler writes a
reduce-scatter as a fusion named `all-reduce-scatter...` (an all-reduce and a dynamic slice):
it counts as a reduce-scatter of the all-reduce's input. The TPU compiler also writes an
all-gather (e.g. FSDP's parameter gathers) as an all-reduce of a zero-padded buffer: each device
`dynamic-update-slice`s its shard into a broadcast of zeros and the buffers are summed. An
all-reduce operand built that way (directly, or by a fusion whose root is such a
`dynamic-update-slice`) counts as an all-gather of the full buffer; the other operands of the
same (tuple) all-reduce stay all-reduce bytes.

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
                    r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_CHANNEL = re.compile(r"channel_id=(\d+)")
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


_INT_CONST = re.compile(r"[su](?:8|16|32|64)\[\][^=]*?constant\((\d+)\)")
_REDUCE_SCATTER_FUSION = "all-reduce-scatter"


def _trip_count(rest: str, comps: dict) -> int:
    t = _TRIP.search(rest)
    if t:
        return int(t.group(1))
    m = re.search(r"condition=%?([\w.\-]+)", rest)
    if not m or m.group(1) not in comps:
        return 1
    bounds = [int(c) for _, result, tail in comps[m.group(1)]
              for c in _INT_CONST.findall(f"{result} constant({tail}")] or [1]
    return max(bounds)


def _operand_names(rest: str) -> list[str]:
    """Names of an instruction's operands (`rest` starts just after `opcode(`)."""
    depth = 1
    for i, ch in enumerate(rest):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return re.findall(r"%([\w.\-]+)", rest[:i])
    return re.findall(r"%([\w.\-]+)", rest)


_Instr = tuple[str, str, str]  # (opcode, result type, text after "opcode(")
_ZERO_BASES = ("broadcast", "constant")


def _is_zero_padded(name: str, defs: dict[str, _Instr], roots: dict[str, str],
                    all_defs: dict[str, dict[str, _Instr]]) -> bool:
    """Is `name` (in a computation whose instructions are `defs`) a shard written into a
    broadcast buffer by a dynamic-update-slice — the TPU compiler's all-gather-by-all-reduce?"""
    op = defs.get(name)
    if op is None:
        return False
    opcode, _, rest = op
    if opcode == "dynamic-update-slice":
        base = _operand_names(rest)[:1]
        return bool(base) and defs.get(base[0], ("",))[0] in _ZERO_BASES
    if opcode != "fusion":
        return False
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    inner = all_defs.get(called.group(1), {}) if called else {}
    root = inner.get(roots.get(called.group(1), "")) if called else None
    if root is None or root[0] != "dynamic-update-slice":
        return False
    base = _operand_names(root[2])[:1]
    base_op = inner.get(base[0]) if base else None
    if base_op is None:
        return False
    if base_op[0] in _ZERO_BASES:
        return True
    if base_op[0] == "parameter":  # the fusion's operand of that index, outside
        index = int(re.match(r"\s*(\d+)", base_op[2]).group(1))
        outer = _operand_names(rest)
        return index < len(outer) and defs.get(outer[index], ("",))[0] in _ZERO_BASES
    return False


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per device per step for each collective kind (see module doc)."""
    comps: dict[str, list[_Instr]] = {}
    defs: dict[str, dict[str, _Instr]] = {}  # computation -> instruction name -> instruction
    roots: dict[str, str] = {}  # computation -> name of its ROOT instruction
    entry = None
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_HEAD.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                defs[current] = {}
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            instr = (m.group(3), m.group(2), m.group(4))
            comps[current].append(instr)
            defs[current][m.group(1)] = instr
            if line.lstrip().startswith("ROOT "):
                roots[current] = m.group(1)
    if entry is None:
        return {k: 0 for k in KINDS}
    # how often each computation runs per step (sum over its callers)
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, instrs in comps.items():
        for opcode, _, rest in instrs:
            trip = _trip_count(rest, comps) if opcode == "while" else 1
            for group in _CALLS.findall(rest):
                for callee in group.strip("{}").split(","):
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
    by_channel: dict[tuple[str, str], tuple[int, int]] = {}  # (kind, channel) -> (size, times)

    def add(kind: str, size: int, rest: str, n: int) -> None:
        channel = _CHANNEL.search(rest)
        if channel is None:
            totals[kind] += size * n
            return
        old = by_channel.get((kind, channel.group(1)), (0, 0))
        by_channel[(kind, channel.group(1))] = (max(size, old[0]), max(n, old[1]))

    for name, instrs in comps.items():
        if not times.get(name) or name.startswith(_REDUCE_SCATTER_FUSION):
            continue
        for opcode, result, rest in instrs:
            called = re.search(r"calls=%?([\w.\-]+)", rest) if opcode == "fusion" else None
            if called and called.group(1).startswith(_REDUCE_SCATTER_FUSION):
                inner = [r for op, r, _ in comps.get(called.group(1), []) if op == "all-reduce"]
                inner_rests = [rest_ for op, _, rest_ in comps.get(called.group(1), [])
                               if op == "all-reduce"]
                add("reduce-scatter", sum(sum(_array_bytes(r)) for r in inner),
                    inner_rests[0] if inner_rests else "", times[name])
                continue
            kind = _kind(opcode)
            if kind is None:
                continue
            results = _array_bytes(result)
            operands = _array_bytes(rest.split("),")[0])
            if kind == "all-reduce":  # results = operands' shapes, also for all-reduce-start
                names = _operand_names(rest)
                gathers = [_is_zero_padded(n, defs[name], roots, defs) for n in names]
                if any(gathers) and len(names) == len(results):
                    gathered = sum(b for b, g in zip(results, gathers) if g)
                    add("all-gather", gathered, rest, times[name])
                    size = sum(results) - gathered
                    if size:
                        add(kind, size, rest, times[name])
                    continue
                size = sum(results)
            elif opcode.endswith("-start"):  # (operand, output) tuples: the larger one
                size = max(results + operands, default=0)
            elif kind == "reduce-scatter":
                size = max(sum(results), sum(operands))
            else:
                size = sum(results)
            add(kind, size, rest, times[name])
    for (kind, _), (size, n) in by_channel.items():
        totals[kind] += size * n
    return totals
