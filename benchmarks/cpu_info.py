"""The CPU model, printed beside every CPU figure (speeds differ a lot between CPU kinds).

Cloud VMs often mask the model name (an AMD EPYC VM may say only "AMD EPYC"), so the
description adds the family / model numbers and the instruction sets that decide which matmul
kernels XLA:CPU and oneDNN can use. Example::

    >>> describe_cpu("model name : AMD EPYC\\ncpu family : 26\\nmodel : 2\\n"
    ...              "flags : fpu avx2 avx512f avx512_bf16\\n")
    'AMD EPYC (family 26, model 2; avx512_bf16)'

No JAX import: scripts that only drive other processes (e.g. `plan_sweep.py`) use it too.
"""

from __future__ import annotations

import platform

# The best matmul instruction set present, most capable first: the description names the first.
_MATMUL_ISAS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def describe_cpu(cpuinfo: str) -> str:
    """One line naming the first CPU in `cpuinfo` (text of /proc/cpuinfo); "" if it names none."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block ends at the first blank line
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "")
    if not name:
        return ""
    flags = set(fields.get("flags", "").split())
    isa = next((f for f in _MATMUL_ISAS if f in flags), None)
    details = []
    if fields.get("cpu family") and fields.get("model"):
        details.append(f"family {fields['cpu family']}, model {fields['model']}")
    detail = ", ".join(details)
    if isa:
        detail = f"{detail}; {isa}" if detail else isa
    return f"{name} ({detail})" if detail else name


def cpu_model() -> str:
    """This machine's CPU (see `describe_cpu`), else `platform.processor()`, else "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            described = describe_cpu(f.read())
    except OSError:
        described = ""
    return described or platform.processor() or "unknown"
