"""The token loss sums of `t5lite.train.losses` over vocabulary chunks, without float32 logits.

`token_loss_sums(logits, ...)` needs the float32 logits [B, T, V] (and autodiff keeps their
softmax for the backward pass): for T5 at batch 32 x 114 targets that is 470 MB written and
read several times per step. `chunked_token_loss_sums(features, ...)` computes the same sums
from the final decoder states and the output kernel (`t5lite.models.features.OutputFeatures`),
`chunk` vocabulary entries at a time in a `lax.scan`:

  * a running (max, sum of exp) gives logsumexp (the max is a constant for autodiff, as in
    `jax.nn.logsumexp`), the target's logit is picked from the chunk that holds it, the sum of
    the logits (label smoothing) and the arg-max (accuracy) are kept as running values;
  * the chunk body is rematerialised (`jax.checkpoint`): the backward pass recomputes each
    chunk's [N, chunk] logits from the states and the kernel chunk, so no [N, V] array exists
    in either pass (one extra output-layer matmul, ~0.3 % of a T5-large step's FLOPs).

A vocabulary that `chunk` does not divide is padded with masked columns.
Equal to `token_loss_sums(features.logits(), ...)` up to float32 summation order.

Example::

    >>> feats, aux = model(enc, dec, return_features=True)
    >>> sums = chunked_token_loss_sums(feats, targets, weights, LossConfig(vocab_chunk=4096))
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from t5lite.models.features import OutputFeatures
from t5lite.models.matmul import einsum
from t5lite.train.losses import LossConfig, weighted_token_sums


def _chunks(features: OutputFeatures, chunk: int) -> tuple[jax.Array, str, int]:
    """The kernel as [n, chunk, D] (vocab major) or [n, D, chunk] chunks, the einsum of one
    chunk, and the padded vocabulary size n * chunk."""
    w = features.kernel
    vocab = features.vocab_size
    n = -(-vocab // chunk)
    pad = n * chunk - vocab
    if features.vocab_major:  # [V, D]
        if pad:
            w = jnp.pad(w, ((0, pad), (0, 0)))
        return w.reshape(n, chunk, w.shape[1]), "nd,cd->nc", n * chunk
    if pad:  # [D, V]
        w = jnp.pad(w, ((0, 0), (0, pad)))
    return jnp.moveaxis(w.reshape(w.shape[0], n, chunk), 1, 0), "nd,dc->nc", n * chunk


def chunked_token_loss_sums(features: OutputFeatures, targets: jax.Array, weights: jax.Array,
                            config: LossConfig, chunk: int | None = None
                            ) -> dict[str, jax.Array]:
    """The sums of `token_loss_sums` (`loss`, `nll`, `z_loss`, `correct`, `weight`) for the
    logits `features` stands for, computed `chunk` (default `config.vocab_chunk`) vocabulary
    entries at a time."""
    chunk = chunk or config.vocab_chunk
    if not chunk or chunk <= 0:
        raise ValueError(f"chunk={chunk!r}: pass a positive vocabulary chunk size.")
    vocab = features.vocab_size
    chunk = min(chunk, vocab)
    hidden = features.hidden
    compute_dtype = features.kernel.dtype
    rows = math.prod(hidden.shape[:-1])
    # float32 copy of the states: their gradient, summed over the chunks, adds in float32
    h = hidden.reshape(rows, hidden.shape[-1]).astype(jnp.float32)
    t = targets.reshape(rows).astype(jnp.int32)
    w = weights.reshape(rows).astype(jnp.float32)
    kernel_chunks, eqn, padded = _chunks(features, chunk)
    smoothing = config.label_smoothing > 0

    def body(carry, xs):
        run_max, run_sum, target_logit, logit_sum, best, best_index = carry
        w_chunk, j = xs
        logits = einsum(eqn, h.astype(compute_dtype), w_chunk,
                        preferred_element_type=jnp.float32)  # [rows, chunk]
        columns = j * chunk + jnp.arange(chunk)
        valid = columns < vocab
        if padded != vocab:
            logits = jnp.where(valid[None], logits, -jnp.inf)
        chunk_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
        new_max = jnp.maximum(run_max, chunk_max)
        run_sum = (run_sum * jnp.exp(run_max - new_max)
                   + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=-1))
        local = t - j * chunk
        here = (local >= 0) & (local < chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[:, None], axis=-1)
        target_logit = target_logit + jnp.where(here, picked[:, 0], 0.0)
        if smoothing:
            logit_sum = logit_sum + jnp.sum(jnp.where(valid[None], logits, 0.0), axis=-1)
        better = chunk_max > best  # strict: the first maximum wins, as in jnp.argmax
        best_index = jnp.where(better, j * chunk + jnp.argmax(logits, axis=-1).astype(jnp.int32),
                               best_index)
        best = jnp.where(better, chunk_max, best)
        return (new_max, run_sum, target_logit, logit_sum, best, best_index), None

    zeros = jnp.zeros((rows,), jnp.float32)
    neg_inf = jnp.full((rows,), -jnp.inf, jnp.float32)
    init = (neg_inf, zeros, zeros, zeros, neg_inf, jnp.zeros((rows,), jnp.int32))
    steps = jnp.arange(kernel_chunks.shape[0], dtype=jnp.int32)
    (run_max, run_sum, target_logit, logit_sum, _, best_index), _ = jax.lax.scan(
        jax.checkpoint(body), init, (kernel_chunks, steps))
    log_z = run_max + jnp.log(run_sum)
    correct = (best_index == t).astype(jnp.float32)
    sum_log_probs = logit_sum - vocab * log_z if smoothing else None
    return weighted_token_sums(log_z - target_logit, log_z, correct, w, config, vocab,
                               sum_log_probs)


def loss_sums(output, targets: jax.Array, weights: jax.Array,
              config: LossConfig) -> dict[str, jax.Array]:
    """`chunked_token_loss_sums` for `OutputFeatures`, `token_loss_sums` for logits."""
    from t5lite.train.losses import token_loss_sums

    if isinstance(output, OutputFeatures):
        return chunked_token_loss_sums(output, targets, weights, config)
    return token_loss_sums(output, targets, weights, config)
