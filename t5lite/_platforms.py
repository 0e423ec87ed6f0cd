"""Keep JAX off the TPU runtime on hosts without TPUs (when libtpu is installed for planning).

`pip install 't5lite[plan]'` installs libtpu so that `t5lite plan` can compile for TPU pod
slices on any machine. JAX 0.10 tries every registered backend when it first needs one; with
libtpu importable it then loads the 600 MB TPU runtime even on a host with no TPU chips, which
prints warnings about `TPU_ACCELERATOR_TYPE` / `TPU_WORKER_HOSTNAMES` and fails quietly. On such
a host t5lite replaces JAX's TPU backend factory, before any backend starts, by one that fails
quietly without loading libtpu (the platform stays known, so TPU lowering rules still register),
so every verb runs on CPU (or GPU) exactly as without libtpu. `t5lite plan` loads the TPU compiler on its own, through
`jax.experimental.topologies`, which does not need the TPU backend.

Nothing happens when libtpu is not installed, when the host has TPU chips, when the user chose
platforms explicitly (`JAX_PLATFORMS`, `JAX_FORCE_TPU_INIT`), or when JAX's backends are up.
"""

from __future__ import annotations

import importlib.util
import os


def _no_tpu_here():
    raise RuntimeError("no TPU chips on this host (t5lite keeps JAX off the TPU runtime; "
                       "set JAX_PLATFORMS=tpu to force it)")


def keep_jax_off_absent_tpus() -> bool:
    """Disarm JAX's TPU backend on a TPU-less host with libtpu installed; True if disarmed."""
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    try:
        if importlib.util.find_spec("libtpu") is None:
            return False
    except (ImportError, ValueError):
        return False
    try:  # JAX internals (checked against jax 0.10.2): do nothing where they differ
        from jax._src import hardware_utils, xla_bridge

        xla_bridge._backend_factories, xla_bridge._backend_lock  # noqa: B018
    except (ImportError, AttributeError):
        return False

    if xla_bridge.backends_are_initialized():
        return False
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return False
    from jax._src import config

    if config.jax_platforms.value:
        return False
    import dataclasses

    with xla_bridge._backend_lock:
        registration = xla_bridge._backend_factories.get("tpu")
        if registration is None:
            return False
        xla_bridge._backend_factories["tpu"] = dataclasses.replace(
            registration, factory=_no_tpu_here, fail_quietly=True)
        return True
