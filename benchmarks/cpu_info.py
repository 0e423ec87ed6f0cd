"""The CPU model name, printed beside every CPU figure (speeds differ a lot between CPU kinds).

No JAX import: scripts that only drive other processes (e.g. `plan_sweep.py`) use it too.
"""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else `platform.processor()`, else "unknown")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
