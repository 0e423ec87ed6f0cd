"""The backend the model is traced for, which picks its backend-specific code paths.

Some model code differs by backend: on CPU the bfloat16 weight matmuls take the float32-result
form (`t5lite.models.matmul`), the gated MLP's backward shares one transposed input
(`t5lite.models.layers.shared_input_dense`), int8 activations default to int8x2
(`t5lite.models.quant`) and attention runs block by block
(`t5lite.models.attention.takes_blocks`); cuDNN attention needs a GPU. That choice follows
`jax.default_backend()`, the process's backend, except while `t5lite plan` lowers a program for
TPU devices from a CPU host: there `compile_target("tpu")` makes the trace take the TPU paths,
as a real TPU run would.

Example::

    >>> target_backend()                 # "cpu" on a CPU host
    >>> with compile_target("tpu"):
    ...     lowered = step.lower(state, batch)   # traced with the TPU code paths
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("t5lite_compile_target",
                                                                     default=None)


def target_backend() -> str:
    """"cpu", "gpu" or "tpu": the `compile_target` in force, else `jax.default_backend()`."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compile_target(platform: str) -> Iterator[None]:
    """Trace for `platform` (a device's `.platform`: "cpu", "gpu", "tpu") inside the block."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
