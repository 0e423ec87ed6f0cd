"""Token-level losses: cross-entropy with label smoothing and z-loss, plus metric sums.

Everything here returns *sums* over the tokens it is given; the caller divides by the number of
target tokens of the **global** batch (`loss_normalizer`). That is what makes gradient
accumulation over microbatches identical to one big batch: each microbatch contributes
`sum(its token losses) / N_global`, and the sum of those is the big batch's mean.

Label smoothing follows T5X: the target distribution puts `1 - s` on the true token and
`s / (V - 1)` on every other token, and the loss subtracts the entropy of that distribution so a
perfect prediction of the smoothed targets scores 0. z-loss adds `z * logsumexp(logits)**2` per
token (PaLM / T5X `z_loss=1e-4`), which keeps the softmax normaliser near 1.

Example (two tokens, the second padding)::

    >>> logits = jnp.zeros((1, 2, 4)); targets = jnp.array([[3, 0]])
    >>> weights = jnp.array([[1.0, 0.0]])
    >>> s = token_loss_sums(logits, targets, weights, LossConfig(z_loss=0.0))
    >>> float(s["loss"]), float(s["weight"])      # log(4) for the one real token
    (1.3862943649291992, 1.0)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from t5lite.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Training loss settings (T5X defaults: z_loss 1e-4, no label smoothing)."""

    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    # > 0: the train step computes the loss over this many vocabulary entries at a time from
    # the final decoder states, never materialising float32 [B, T, V] logits
    # (`t5lite.train.chunked_loss`); 0: from the logits
    vocab_chunk: int = 0

    def __post_init__(self) -> None:
        if self.z_loss < 0:
            raise ConfigError(f"LossConfig: z_loss={self.z_loss} must be >= 0.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"LossConfig: label_smoothing={self.label_smoothing} must be in "
                              "[0, 1).")
        if (not isinstance(self.vocab_chunk, int) or isinstance(self.vocab_chunk, bool)
                or self.vocab_chunk < 0):
            raise ConfigError(f"LossConfig: vocab_chunk={self.vocab_chunk!r} must be a "
                              "non-negative integer (0 = loss from the full logits).")


def label_smoothing_constants(vocab: int, smoothing: float) -> tuple[float, float, float]:
    """(confidence, low, normalizer) of T5's label smoothing over `vocab` classes: the target gets
    `confidence`, every other class `low`, and `normalizer` is the entropy of that smoothed
    distribution (subtracted so a perfect model scores 0)."""
    confidence = 1.0 - smoothing
    low = smoothing / (vocab - 1)
    normalizer = -(confidence * math.log(confidence)
                   + (vocab - 1) * low * math.log(low + 1e-20))
    return confidence, low, normalizer


def token_loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                    config: LossConfig) -> dict[str, jax.Array]:
    """Weighted sums over all tokens of: `loss` (smoothed CE + z-loss, what is optimised),
    `nll` (plain negative log-likelihood), `z_loss`, `correct` (argmax == target) and `weight`.

    logits [..., V] (any float dtype; computed in f32), targets [...] int, weights [...].
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    target_logp = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32),
                                      axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    sum_log_probs = jnp.sum(log_probs, axis=-1) if config.label_smoothing > 0 else None
    return weighted_token_sums(-target_logp, log_z, correct, weights, config, vocab,
                               sum_log_probs)


def weighted_token_sums(nll: jax.Array, log_z: jax.Array, correct: jax.Array,
                        weights: jax.Array, config: LossConfig, vocab: int,
                        sum_log_probs: jax.Array | None = None) -> dict[str, jax.Array]:
    """`token_loss_sums`' result from per-token terms (float32, [...]): nll, log_z (the
    log-partition), correct (0/1) and, with label smoothing, the sum of the token's log-probs
    over the vocabulary. Shared by the full and the chunked (`t5lite.train.chunked_loss`)
    cross-entropy."""
    if config.label_smoothing > 0:
        if sum_log_probs is None:
            raise ValueError("label smoothing needs sum_log_probs")
        confidence, low, normalizer = label_smoothing_constants(vocab, config.label_smoothing)
        ce = (confidence - low) * nll - low * sum_log_probs - normalizer
    else:
        ce = nll
    z = config.z_loss * jnp.square(log_z)
    return {
        "loss": jnp.sum((ce + z) * weights),
        "nll": jnp.sum(nll * weights),
        "z_loss": jnp.sum(z * weights),
        "correct": jnp.sum(correct * weights),
        "weight": jnp.sum(weights),
    }
