"""The mesh each sharding recipe gets when `t5lite plan --partitioning=RECIPE|all` chooses it.

On `n` devices per slice (`dcn` = number of slices), with `e` = the expert-axis size (the
largest common divisor of the model's experts and `n`, 1 for dense models) and `t` = the tensor
size (the largest of 8, 4, 2 dividing the devices left and the number of (KV) heads):

    dp       data = n/e                    fsdp     fsdp = n/e
    tp       tensor = n/e                  dp_tp    data = n/(e t), tensor = t
    fsdp_tp  fsdp = n/(e t), tensor = t

Example::

    >>> default_mesh("fsdp_tp", 256, ModelConfig(num_heads=64)).sizes()
    {'dcn': 1, 'data': 1, 'fsdp': 32, 'tensor': 8, 'expert': 1}
"""

from __future__ import annotations

import math

from t5lite.config import ModelConfig
from t5lite.parallel.mesh import MeshConfig


def expert_size(n: int, model_config: ModelConfig) -> int:
    return math.gcd(n, model_config.num_experts) if model_config.num_experts else 1


def tensor_size(n: int, model_config: ModelConfig) -> int:
    for t in (8, 4, 2):
        if n % t == 0 and model_config.kv_heads % t == 0 and n // t >= 1:
            return t
    return 1


def default_mesh(recipe: str, devices_per_slice: int, model_config: ModelConfig,
                 num_slices: int = 1) -> MeshConfig:
    e = expert_size(devices_per_slice, model_config)
    rest = devices_per_slice // e
    t = tensor_size(rest, model_config)
    sizes = {
        "dp": dict(data=rest),
        "fsdp": dict(data=1, fsdp=rest),
        "tp": dict(data=1, tensor=rest),
        "dp_tp": dict(data=rest // t, tensor=t),
        "fsdp_tp": dict(data=1, fsdp=rest // t, tensor=t),
    }[recipe]
    return MeshConfig(expert=e, dcn=num_slices, **sizes)
