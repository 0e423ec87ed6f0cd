"""HBM per chip: the nominal size, and what the TPU compiler lets one program use.

A chip's nominal HBM (v4 32 GiB) is not what a program gets: the runtime reserves some of it,
and the TPU compiler refuses a program whose memory exceeds the rest ("... exceeds available
HBM (30.75G)"). libtpu exposes that figure through no device attribute (compile-only devices
have no `memory_stats()`), so `usable_hbm_bytes` asks the compiler itself: it compiles, once
per device kind, a one-chip program with 512 GiB of temporaries (a sort the compiler cannot
fuse away) and reads the available bytes from the refusal (about a second).

If that probe does not give a figure (an unexpected message from another libtpu), the figures
the probe read with libtpu 0.0.42.1 on 2026-12-06 are used and the source says so.

Example::

    >>> parse_hbm_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
    ...               "for HLO temporaries (95.04G) exceeds available HBM (30.75G).")
    {'temp': 102048422952, 'capacity': 33017561088}
"""

from __future__ import annotations

import re

GiB = 2**30

# What the probe read from libtpu 0.0.42.1's refusals (2026-12-06, megacore for v4 / v5p),
# in GiB as the compiler prints them (two decimals): used only when the probe fails.
MEASURED_USABLE_GIB = {"v4": 30.75, "v5p": 95.74, "v5e": 15.75, "v6e": 31.25}
MEASURED_SOURCE = "libtpu 0.0.42.1's available HBM, read 2026-12-06 (the probe failed here: {})"
PROBE_SOURCE = "the TPU compiler's available HBM for {}, read by a probe compile"

_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"
_HBM_USED = re.compile(rf"Used {_SIZE} of {_SIZE} hbm", re.I)
_HBM_TEMP = re.compile(rf"required for HLO temporaries \({_SIZE}\) exceeds available HBM "
                       rf"\({_SIZE}\)", re.I)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit.upper()])


def parse_hbm_oom(message: str) -> dict[str, int] | None:
    """What the TPU compiler's out-of-HBM error says: {"used" or "temp": bytes, "capacity":
    bytes}, or None for other errors. The compiler prints sizes in GiB with two decimals.

    >>> parse_hbm_oom("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 45.20G "
    ...               "of 31.25G hbm. Exceeded hbm capacity by 13.95G.")
    {'used': 48533130444, 'capacity': 33554432000}
    """
    m = _HBM_USED.search(message)
    if m:
        return {"used": _bytes(m.group(1), m.group(2)), "capacity": _bytes(m.group(3), m.group(4))}
    m = _HBM_TEMP.search(message)
    if m:
        return {"temp": _bytes(m.group(1), m.group(2)), "capacity": _bytes(m.group(3), m.group(4))}
    return None


def probe_message(device) -> str:
    """The TPU compiler's answer to a one-device program holding 512 GiB of temporaries on
    `device` (a compile-only TPU device): its refusal, or "" if it compiled."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh([device], ("x",)), PartitionSpec())

    def oversized(x):  # [2^27, 1024] float32 = 512 GiB, sorted along the long axis
        return jnp.sort(jnp.broadcast_to(x, (2**27, 1024)) * 2.0, axis=0)[:2]

    arg = jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=sharding)
    try:
        jax.jit(oversized, out_shardings=sharding).lower(arg).compile()
    except Exception as e:  # the refusal is the answer
        return str(e)
    return ""


_PROBED: dict[str, tuple[int | None, str]] = {}  # device kind -> (capacity, why not)


def _probe_cached(key: str, device) -> tuple[int | None, str]:
    if key not in _PROBED:
        message = probe_message(device)
        parsed = parse_hbm_oom(message)
        if parsed is None:
            first = (message.strip().splitlines() or ["it compiled a 512 GiB program"])[0]
            _PROBED[key] = (None, first[:200])
        else:
            _PROBED[key] = (parsed["capacity"], "")
    return _PROBED[key]


def usable_hbm_bytes(generation: str, devices: list) -> tuple[int, str]:
    """(bytes one program may use on a chip of `devices`, where that figure comes from)."""
    device = devices[0]
    usable, why = _probe_cached(f"{device.platform}:{device.device_kind}", device)
    if usable is not None:
        return usable, PROBE_SOURCE.format(device.device_kind)
    return int(MEASURED_USABLE_GIB[generation] * GiB), MEASURED_SOURCE.format(why)
