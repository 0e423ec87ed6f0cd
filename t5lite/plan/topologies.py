"""Target devices for planning: TPU pod slices (compile-only devices from libtpu) or N CPUs.

Slice names follow Cloud TPU's: `v4-N` and `v5p-N` count TensorCores (2 per chip, one JAX
device per chip in megacore mode), `v5e-N` / `v6e-N` count chips. A raw topology names the
chip grid: `v5e:16x16`, `v4:4x4x8`. `cpu:N` gives N simulated CPU devices (an approximate
planner, e.g. for GPU clusters, where no cross-hardware ahead-of-time compiler exists).

Example::

    >>> t = parse_topology("v4-256")
    >>> (t.generation, t.chips, t.topology_name, t.hbm_bytes // 2**30)
    ('v4', 128, 'v4:4x4x8', 32)
    >>> parse_topology("v5e:16x16").chips
    256
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from t5lite.errors import UserError

GiB = 2**30

# generation -> (HBM bytes per chip, grid rank, slice names count cores (2/chip) or chips)
_GENERATIONS: dict[str, tuple[int, int, int]] = {
    "v4": (32 * GiB, 3, 2),
    "v5p": (95 * GiB, 3, 2),
    "v5e": (16 * GiB, 2, 1),
    "v6e": (32 * GiB, 2, 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}

# chips -> grid of the standard slice shapes
_GRID_3D = {1: (1, 1, 1), 2: (1, 1, 2), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4),
            32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8),
            1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24),
            8192: (16, 16, 32)}
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
            128: (8, 16), 256: (16, 16)}

INSTALL_HINT = ("the TPU compiler (libtpu) is not installed; install it with "
                "`pip install 't5lite[plan]'` (or `pip install 'libtpu==0.0.42.*'`, the "
                "version jax 0.10.2 pins), or plan on simulated CPUs with --topology=cpu:N.")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A planning target: `num_devices` JAX devices of one kind (per slice x num_slices)."""

    name: str  # as the user wrote it
    generation: str  # v4 | v5p | v5e | v6e | cpu
    chips: int  # per slice
    grid: tuple[int, ...]  # chip grid per slice (TPU); (N,) for cpu
    num_slices: int = 1

    @property
    def is_tpu(self) -> bool:
        return self.generation != "cpu"

    @property
    def topology_name(self) -> str:
        return f"{self.generation}:" + "x".join(map(str, self.grid))

    @property
    def num_devices(self) -> int:
        return self.chips * self.num_slices

    @property
    def hbm_bytes(self) -> int | None:
        """HBM of one chip (None for cpu: pass --hbm_gib)."""
        return _GENERATIONS[self.generation][0] if self.is_tpu else None


def known_topologies() -> list[str]:
    """Examples of accepted names (for error messages and --help)."""
    names = []
    for gen, (_, rank, per_chip) in _GENERATIONS.items():
        grids = _GRID_3D if rank == 3 else _GRID_2D
        sizes = [c * per_chip for c in grids if c >= 4]
        names.append(f"{gen}-{{{','.join(map(str, sizes))}}}")
    return names + ["<gen>:AxB[xC] (e.g. v5e:16x16, v4:4x4x8)", "cpu:N"]


def _unknown(name: str, why: str) -> UserError:
    return UserError(f"unknown topology {name!r} ({why}); known: {'; '.join(known_topologies())}")


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """`v4-256`, `v5p-512`, `v5e-256`, `v6e-64`, `v5e:16x16`, `cpu:8` -> Topology."""
    if not isinstance(num_slices, int) or num_slices < 1:
        raise UserError(f"--num_slices={num_slices} must be a positive integer.")
    text = (name or "").strip().lower()
    m = re.fullmatch(r"cpu:(\d+)", text)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise _unknown(name, "cpu:N needs N >= 1")
        return Topology(name, "cpu", n, (n,), num_slices)
    m = re.fullmatch(r"([a-z0-9]+?)(?:pod)?[-:](.+)", text)
    if not m:
        raise _unknown(name, "expected GEN-SIZE, GEN:AxB[xC] or cpu:N")
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in _GENERATIONS:
        raise _unknown(name, f"generation {m.group(1)!r} is not one of {sorted(_GENERATIONS)}")
    _, rank, per_chip = _GENERATIONS[gen]
    rest = m.group(2)
    grids = _GRID_3D if rank == 3 else _GRID_2D
    if ":" in text and "x" in rest:
        try:
            grid = tuple(int(x) for x in rest.split("x"))
        except ValueError:
            raise _unknown(name, f"bad grid {rest!r}") from None
        if len(grid) != rank or min(grid) < 1:
            raise _unknown(name, f"{gen} grids have {rank} dimensions")
        return Topology(name, gen, math.prod(grid), grid, num_slices)
    if not rest.isdigit():
        raise _unknown(name, f"bad size {rest!r}")
    size = int(rest)
    if size % per_chip:
        raise _unknown(name, f"{gen} slice sizes count TensorCores, 2 per chip")
    chips = size // per_chip
    if chips not in grids:
        raise _unknown(name, f"no standard {gen} slice with {chips} chips")
    return Topology(name, gen, chips, grids[chips], num_slices)


def _silence_libtpu_host_probe() -> None:
    """libtpu asks the (absent) TPU VM metadata for its host's type and workers and prints
    warnings when they are missing, and takes a machine-wide lock (/tmp/libtpu_lockfile) that
    stops a second process from loading it; compile-only use needs none of this, so several
    plans (or test processes) may run at once."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")


def libtpu_available() -> bool:
    import importlib.util

    if os.environ.get("TPU_LIBRARY_PATH"):
        return True
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


def target_devices(topo: Topology) -> list:
    """The JAX devices of `topo`: compile-only TPU devices, or this process's CPU devices.

    For cpu:N the process must have at least N CPU devices: `prepare_cpu_devices(N)` before
    JAX starts its backends (the `t5lite plan` command does this).
    """
    import jax

    if not topo.is_tpu:
        cpus = jax.devices("cpu")
        if len(cpus) < topo.num_devices:
            raise UserError(f"--topology={topo.name} with --num_slices={topo.num_slices} needs "
                            f"{topo.num_devices} CPU devices but this process has {len(cpus)}; "
                            "run `t5lite plan` in a fresh process (it sets the CPU device count "
                            "itself) or set XLA_FLAGS=--xla_force_host_platform_device_count=N.")
        return cpus[: topo.num_devices]
    if not libtpu_available():
        raise UserError(INSTALL_HINT)
    _silence_libtpu_host_probe()
    from jax.experimental import topologies

    megacore = topo.generation in ("v4", "v5p")
    kwargs = {"chip_config_name": "megacore" if megacore else "default"}
    if topo.num_slices > 1:
        kwargs["num_slices"] = topo.num_slices
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_name,
                                            **kwargs)
    except Exception as e:  # libtpu rejects grids it does not know
        raise UserError(f"libtpu cannot build topology {topo.topology_name!r} "
                        f"(from {topo.name!r}): {str(e).splitlines()[0]}") from None
    devices = list(desc.devices)
    if len(devices) != topo.num_devices:
        raise UserError(f"libtpu built {len(devices)} devices for {topo.topology_name!r} x "
                        f"{topo.num_slices} slices, expected {topo.num_devices}.")
    return devices


def prepare_cpu_devices(n: int) -> None:
    """Ask JAX for at least `n` CPU devices (only effective before its backends start)."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", max(n, 1))
