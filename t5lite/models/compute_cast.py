"""Cast the matmul kernels of a parameter tree to the compute dtype, once.

Every layer casts its float32 kernels to the compute dtype where it uses them
(`t5lite.models.quant.kernel`). Inside a scanned stack that is a cast per layer per microbatch,
and in the backward pass each layer's float32 weight gradient is written into a float32
stacked buffer. `cast_matmul_kernels` does the cast once per train step instead (the layers'
own casts are then no-ops), so the scan reads and writes kernels in the compute dtype.

Only the kernels of matmuls are cast: their weight gradients are matmul outputs in the compute
dtype already, so a gradient taken with respect to the cast copy and widened back to float32 has
the same value. Norm scales, the token embedding (its gradient is a scatter-add, which would then
add in bfloat16), the relative-position table and MoE routers stay in their dtype.

Example::

    >>> compute = cast_matmul_kernels(params, jnp.bfloat16)   # once per step
    >>> grads = jax.grad(loss)(compute, batch)                  # bf16 kernel grads
    >>> grads = widen_like(grads, params)                       # float32 again
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# parameter names (the last key of a path) of matmul kernels: attention q/k/v/o, the
# (gated) MLP's and the experts' wi / wi_0 / wi_1 / wo, the untied output layer
MATMUL_KERNELS = frozenset({"q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo", "lm_head"})


def _name(path: tuple) -> str:
    last = path[-1] if path else None
    return str(getattr(last, "key", getattr(last, "name", last)))


def cast_matmul_kernels(params: Any, dtype: Any) -> Any:
    """`params` (a pure dict of arrays) with every floating matmul kernel cast to `dtype`."""
    dtype = jnp.dtype(dtype)

    def cast(path, leaf):
        if _name(path) in MATMUL_KERNELS and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def step_param_cast(cfg: Any):
    """The train step's `param_cast` for a ModelConfig: casting the kernels to the compute
    dtype when `cfg.cast_params_once` (and that dtype differs from the parameters'), else None."""
    if not cfg.cast_params_once or cfg.compute_dtype == cfg.params_dtype:
        return None
    dtype = cfg.compute_dtype
    return lambda params: cast_matmul_kernels(params, dtype)


def widen_like(tree: Any, like: Any) -> Any:
    """`tree` with every leaf cast to the dtype of the matching leaf of `like`."""
    return jax.tree.map(lambda a, ref: a.astype(ref.dtype), tree, like)
