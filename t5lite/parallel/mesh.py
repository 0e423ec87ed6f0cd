"""Device meshes from a small config: axes `dcn`, `data`, `fsdp`, `tensor`, `expert`.

`dcn` spans slices / nodes (slow network); the other four span the devices of one slice. A size
of -1 means "all the devices that are left" (at most one axis may say -1).

Example::

    >>> cfg = MeshConfig(data=-1, tensor=2)          # on 8 devices: data=4, tensor=2
    >>> mesh = make_mesh(cfg)
    >>> dict(mesh.shape)
    {'dcn': 1, 'data': 4, 'fsdp': 1, 'tensor': 2, 'expert': 1}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from t5lite.errors import ConfigError

MESH_AXES: tuple[str, ...] = ("dcn", "data", "fsdp", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 = the rest of the devices (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    dcn: int = 1  # number of slices / nodes joined by the data-centre network

    def __post_init__(self) -> None:
        sizes = self.sizes()
        if sum(1 for s in sizes.values() if s == -1) > 1:
            raise ConfigError(f"MeshConfig {sizes}: at most one axis may be -1 (= the rest).")
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"MeshConfig: {name}={size} must be a positive size or -1.")

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes for `num_devices`; raises ConfigError when they do not fit."""
        sizes = self.sizes()
        known = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values():
            if num_devices % known != 0:
                raise ConfigError(
                    f"mesh {self._describe()} does not divide {num_devices} devices: the fixed "
                    f"axes multiply to {known}. Choose sizes whose product divides "
                    f"{num_devices}.")
            rest = num_devices // known
            sizes = {k: (rest if v == -1 else v) for k, v in sizes.items()}
        elif known != num_devices:
            raise ConfigError(
                f"mesh {self._describe()} has {known} positions but there are {num_devices} "
                f"devices; make the product of the axis sizes equal {num_devices} (or set one "
                "axis to -1).")
        return sizes

    def _describe(self) -> str:
        return "(" + ", ".join(f"{k}={v}" for k, v in self.sizes().items()) + ")"


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes MESH_AXES (all of type Auto, so GSPMD propagates shardings).

    Devices are laid out so that the fast (in-slice) axes are innermost; with `dcn` > 1 and
    devices that know their slice (TPU multi-slice), each dcn position is one slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    slice_ids = {getattr(d, "slice_index", 0) for d in devices}
    if sizes["dcn"] > 1 and len(slice_ids) == sizes["dcn"]:
        from jax.experimental import mesh_utils

        ici_shape = (1,) + shape[1:]
        dcn_shape = (sizes["dcn"],) + (1,) * (len(shape) - 1)
        device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    else:
        try:
            from jax.experimental import mesh_utils

            device_array = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def single_device_mesh() -> Mesh:
    """A mesh of one device (every axis of size 1): the same code path as a real mesh."""
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
