"""Multi-host helpers: `jax.distributed` start-up, data shards per host, host -> global arrays.

Start-up (`initialize_distributed`) takes the coordinator address, process count and process id
from arguments, else from the environment (`T5LITE_COORDINATOR_ADDRESS`,
`T5LITE_NUM_PROCESSES`, `T5LITE_PROCESS_ID`), else lets JAX detect a cluster (TPU pod slices,
SLURM) when `T5LITE_DISTRIBUTED=auto`. With none of these it is a single-process run and nothing
happens.

Which data shard a host reads follows from the mesh: hosts whose devices hold the same rows of
the global batch (e.g. the two halves of a tensor-parallel pair spread over two hosts) must read
the same data; hosts holding different rows read different shards.

Example (2 hosts x 4 devices, pure data parallel, global batch 16)::

    >>> data_shard_info(batch_sharding, 16)
    DataShard(index=1, count=2, local_batch_size=8)      # on process 1
    >>> global_batch = host_to_global(local_batch, batch_sharding, 16)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from t5lite.errors import ConfigError, UserError

ENV_COORDINATOR = "T5LITE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "T5LITE_NUM_PROCESSES"
ENV_PROCESS_ID = "T5LITE_PROCESS_ID"
ENV_AUTO = "T5LITE_DISTRIBUTED"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           cpu_collectives: str | None = None) -> bool:
    """Start `jax.distributed` when asked to; return True when this is a multi-process run.

    `cpu_collectives` (e.g. "gloo") selects the CPU collectives implementation, needed for
    multi-process runs on CPU devices.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = _env_int(ENV_NUM_PROCESSES, minimum=1)
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = _env_int(ENV_PROCESS_ID, minimum=0)
    auto = env.get(ENV_AUTO, "").lower() == "auto"
    if coordinator_address is None and not auto:
        if num_processes not in (None, 1):
            raise UserError(f"num_processes={num_processes} needs a coordinator address "
                            f"(--coordinator_address=HOST:PORT or ${ENV_COORDINATOR}).")
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise UserError("a multi-process run needs all of: coordinator address, number of "
                        f"processes and process id (flags or ${ENV_COORDINATOR}, "
                        f"${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}).")
    if num_processes is not None and process_id is not None and not (
            0 <= process_id < num_processes):
        raise UserError(f"process id {process_id} is outside [0, {num_processes}).")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator_address is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return jax.process_count() > 1


def _env_int(name: str, minimum: int) -> int:
    """The integer in environment variable `name`; UserError naming it otherwise."""
    text = os.environ[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"${name}={os.environ[name]!r} is not an integer; set it to a whole "
                        f"number >= {minimum} (or unset it).") from None
    if value < minimum:
        raise UserError(f"${name}={value} must be >= {minimum}.")
    return value


def sync_hosts(name: str) -> None:
    """A barrier across all processes (no-op in a single-process run).

    Use it around decisions that read the shared file system, so that every host sees the same
    state (e.g. "is there a checkpoint in model_dir?" must not change between hosts because the
    primary host created a directory in the meantime).
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """True on the process that writes metrics, logs and model-dir files."""
    return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class DataShard:
    index: int  # which data shard this host reads
    count: int  # number of distinct data shards across hosts
    local_batch_size: int  # rows this host feeds per step


def data_shard_info(batch_sharding: Sharding, global_batch_size: int) -> DataShard:
    """Which rows of the global batch this process's devices hold, as a data shard."""
    indices = batch_sharding.devices_indices_map((global_batch_size,))
    rows_by_process: dict[int, set[tuple[int, int]]] = {}
    for device, index in indices.items():
        sl = index[0]
        start, stop, _ = sl.indices(global_batch_size)
        rows_by_process.setdefault(device.process_index, set()).add((start, stop))

    def span(ranges: set[tuple[int, int]]) -> tuple[int, int]:
        lo, hi = min(a for a, _ in ranges), max(b for _, b in ranges)
        if _merged_length(ranges) != hi - lo:
            raise ConfigError(f"the batch rows of one host are not contiguous ({sorted(ranges)});"
                              " use a mesh whose data axes are laid out host by host.")
        return lo, hi

    spans = {p: span(r) for p, r in rows_by_process.items()}
    distinct = sorted(set(spans.values()))
    mine = spans[jax.process_index()]
    return DataShard(index=distinct.index(mine), count=len(distinct),
                     local_batch_size=mine[1] - mine[0])


def _merged_length(ranges: set[tuple[int, int]]) -> int:
    total, end = 0, None
    for a, b in sorted(ranges):
        if end is None or a >= end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def host_to_global(local_batch: dict[str, np.ndarray], batch_sharding: Sharding,
                   global_batch_size: int) -> dict[str, jax.Array]:
    """Host-local rows -> one global jax.Array per feature (no host holds the global batch)."""
    out: dict[str, Any] = {}
    for name, x in local_batch.items():
        x = np.asarray(x)
        global_shape = (global_batch_size,) + x.shape[1:]
        sharding = _with_rank(batch_sharding, x.ndim)
        out[name] = jax.make_array_from_process_local_data(sharding, x, global_shape)
    return out


def _with_rank(sharding: Sharding, ndim: int) -> Sharding:
    """The batch sharding (given for rank-1 / [batch, ...]) for an array of rank `ndim`."""
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return sharding
    from jax.sharding import NamedSharding, PartitionSpec

    parts = tuple(spec)[:1]
    return NamedSharding(sharding.mesh, PartitionSpec(*(parts + (None,) * (ndim - len(parts)))))


def any_host(flag: bool) -> bool:
    """True on every host when `flag` is True on any host (a cheap cross-host OR)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
    return bool(np.any(flags))
