"""`OutputFeatures`: what the output layer would multiply, instead of the logits it would make.

A model called with `return_features=True` returns these in place of float32 logits
[B, T, vocab]: the final decoder states and the output kernel, both in the compute dtype, so a
loss can compute the logits one vocabulary chunk at a time (`t5lite.train.chunked_loss`) and
never hold the whole float32 [B, T, vocab] array (470 MB for T5 at batch 32 x 114 targets).

    logits == einsum("btd,dv->btv", hidden, kernel)        vocab_major=False (lm_head [D, V])
    logits == einsum("btd,vd->btv", hidden, kernel)        vocab_major=True  (tied [V, D])

(float32 accumulation in both cases; with tied embeddings `hidden` already carries T5's
d_model**-0.5 scale.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from t5lite.models.matmul import einsum


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class OutputFeatures:
    """hidden [..., D] and kernel [D, V] (or [V, D] when vocab_major) in the compute dtype."""

    hidden: jax.Array
    kernel: jax.Array
    vocab_major: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def vocab_size(self) -> int:
        return self.kernel.shape[0] if self.vocab_major else self.kernel.shape[1]

    def logits(self) -> jax.Array:
        """The float32 logits [..., V] (materialised: for tests and fallbacks)."""
        eqn = "...d,vd->...v" if self.vocab_major else "...d,dv->...v"
        return einsum(eqn, self.hidden, self.kernel, preferred_element_type=jnp.float32)
