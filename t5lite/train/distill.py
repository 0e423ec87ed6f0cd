"""Knowledge distillation: the KD loss, its schedules, and the decoder-only teacher's view of an
encoder-decoder batch.

The distillation loss of one target token (Hinton et al.; the "KD" term of the design report)::

    loss = alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE

where CE is the usual training cross-entropy (label smoothing and z-loss included, see
`t5lite.train.losses`). Like CE, the KD term is a *sum over the target tokens* (weighted by
`decoder_loss_weights`) that the train step divides by the number of target tokens of the
**global** batch, so gradient accumulation over microbatches stays exact. The `T**2` factor keeps
the gradient's size roughly independent of T (the soft-target gradient scales as 1/T**2).

The teacher is frozen (`jax.lax.stop_gradient`); its vocabulary may be padded larger than the
student's (its extra logits are dropped, see `slice_vocab`).

Worked example (one token, teacher == student, so KL = 0)::

    >>> t = jnp.array([[[1.0, 2.0, 3.0]]]); w = jnp.ones((1, 1))
    >>> float(kd_loss_sums(t, t, w, temperature=2.0)["kd"])
    0.0

Offline teachers store only their top-k logits (`teacher_topk_logits` / `teacher_topk_ids` in
the batch, written by `t5lite teacher-logits`). The KL is then taken over those k ids, both
distributions renormalised over them (MaxText's offline distillation does the same); with k equal
to the vocabulary size it is the online loss.

A `DecoderOnly` teacher reads the student's batch as a prefix-LM sequence: see
`prefix_lm_teacher_batch` for how the encoder row and the decoder row are laid side by side
(packing and padding go through segment ids and positions, so no row is rebuilt on the host).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from t5lite.errors import ConfigError
from t5lite.parallel.rules import RECIPES

Batch = dict[str, jax.Array]

TOPK_LOGITS = "teacher_topk_logits"
TOPK_IDS = "teacher_topk_ids"
TARGET_LOGP = "teacher_target_logp"  # the teacher's log-probability of each target token


# ---------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Settings of a distillation run (bound by gin/runs/distill.gin).

    `alpha` is the weight of the KD term and `temperature` its softening T. Both may follow a
    schedule over the optimiser step `s`:

    - alpha ramps linearly from 0 to `alpha` over `alpha_warmup_steps`, then (if `alpha_final`
      is set) linearly to `alpha_final` over the next `alpha_decay_steps`, then stays;
    - the temperature goes linearly from `temperature` to `temperature_final` (if set) over
      `temperature_decay_steps`, then stays.

    Exactly one teacher source: `teacher_model_dir` (online: the teacher runs in the train
    step) — also required with `offline_logits_dir`, where it names the teacher that wrote the
    logits so the vocabulary can be checked.

    Example::

        >>> cfg = DistillConfig("runs/teacher", alpha=0.5, alpha_warmup_steps=100)
        >>> float(alpha_at(cfg, 50)), float(alpha_at(cfg, 1000))
        (0.25, 0.5)
    """

    teacher_model_dir: str
    alpha: float = 0.5
    temperature: float = 2.0
    alpha_warmup_steps: int = 0
    alpha_final: float | None = None
    alpha_decay_steps: int = 0
    temperature_final: float | None = None
    temperature_decay_steps: int = 0
    teacher_dtype: str | None = None  # None: the teacher's own ModelConfig.dtype
    teacher_partitioning: str | None = None  # None: the student's recipe
    teacher_checkpoint_step: int | None = None  # None: the teacher's newest checkpoint
    offline_logits_dir: str | None = None  # read top-k logits written by `t5lite teacher-logits`

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"DistillConfig: {msg}")

        if not isinstance(self.teacher_model_dir, str) or not self.teacher_model_dir:
            fail("teacher_model_dir is required: set TEACHER_MODEL_DIR to a t5lite model dir "
                 "(written by `t5lite train` or `t5lite import`).")
        for name in ("alpha", "alpha_final"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                fail(f"{name}={value} must be in [0, 1].")
        for name in ("temperature", "temperature_final"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                fail(f"{name}={value} must be positive.")
        for name in ("alpha_warmup_steps", "alpha_decay_steps", "temperature_decay_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(f"{name}={value!r} must be a non-negative integer.")
        if self.alpha_final is not None and self.alpha_decay_steps == 0:
            fail("alpha_final is set but alpha_decay_steps=0; give the number of steps over "
                 "which alpha moves to alpha_final.")
        if self.temperature_final is not None and self.temperature_decay_steps == 0:
            fail("temperature_final is set but temperature_decay_steps=0; give the number of "
                 "steps over which the temperature moves to temperature_final.")
        if self.teacher_dtype not in (None, "float32", "bfloat16"):
            fail(f"teacher_dtype={self.teacher_dtype!r} must be None, 'float32' or 'bfloat16'.")
        if self.teacher_partitioning is not None and self.teacher_partitioning not in RECIPES:
            fail(f"teacher_partitioning={self.teacher_partitioning!r} is unknown; use one of "
                 f"{sorted(RECIPES)} or None (the student's).")


def _linear(step: jax.Array, start: float, end: float, steps: int) -> jax.Array:
    frac = jnp.clip(step / max(steps, 1), 0.0, 1.0)
    return start + (end - start) * frac


def alpha_at(config: DistillConfig, step: jax.Array | int) -> jax.Array:
    """The KD weight at optimiser step `step` (float32 scalar)."""
    s = jnp.asarray(step, jnp.float32)
    value = jnp.asarray(config.alpha, jnp.float32)
    if config.alpha_warmup_steps:
        value = _linear(s, 0.0, config.alpha, config.alpha_warmup_steps)
    if config.alpha_final is not None:
        later = _linear(s - config.alpha_warmup_steps, config.alpha, config.alpha_final,
                        config.alpha_decay_steps)
        value = jnp.where(s >= config.alpha_warmup_steps, later, value)
    return value.astype(jnp.float32)


def temperature_at(config: DistillConfig, step: jax.Array | int) -> jax.Array:
    """The KD temperature at optimiser step `step` (float32 scalar)."""
    s = jnp.asarray(step, jnp.float32)
    if config.temperature_final is None:
        return jnp.asarray(config.temperature, jnp.float32)
    return _linear(s, config.temperature, config.temperature_final,
                   config.temperature_decay_steps).astype(jnp.float32)


# ---------------------------------------------------------------- the loss

def slice_vocab(teacher_logits: jax.Array, student_vocab: int) -> jax.Array:
    """Drop the logits of a teacher whose embedding is padded beyond the student's rows."""
    if teacher_logits.shape[-1] < student_vocab:
        raise ConfigError(f"teacher logits have {teacher_logits.shape[-1]} entries but the "
                          f"student's vocab_size is {student_vocab}.")
    return teacher_logits[..., :student_vocab]


def kd_loss_sums(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array,
                 temperature: jax.Array | float) -> dict[str, jax.Array]:
    """Weighted token sum of `T**2 * KL(softmax(teacher/T) || softmax(student/T))` as `kd`.

    student_logits [..., V], teacher_logits [..., V] (the teacher is not differentiated),
    weights [...]. Computed in float32.
    """
    t = jnp.asarray(temperature, jnp.float32)
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / t
    student = student_logits.astype(jnp.float32) / t
    t_logp = jax.nn.log_softmax(teacher, axis=-1)
    s_logp = jax.nn.log_softmax(student, axis=-1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    return {"kd": jnp.sum(t * t * kl * weights.astype(jnp.float32))}


def kd_topk_loss_sums(student_logits: jax.Array, topk_logits: jax.Array, topk_ids: jax.Array,
                      weights: jax.Array, temperature: jax.Array | float) -> dict[str, jax.Array]:
    """`kd_loss_sums` against a teacher known only through its top-k logits [..., k] at ids
    [..., k]: both distributions are renormalised over those k ids."""
    t = jnp.asarray(temperature, jnp.float32)
    teacher = jax.lax.stop_gradient(topk_logits.astype(jnp.float32)) / t
    student = jnp.take_along_axis(student_logits.astype(jnp.float32),
                                  topk_ids.astype(jnp.int32), axis=-1) / t
    t_logp = jax.nn.log_softmax(teacher, axis=-1)
    s_logp = jax.nn.log_softmax(student, axis=-1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    return {"kd": jnp.sum(t * t * kl * weights.astype(jnp.float32))}


def teacher_nll_sum(teacher_logits: jax.Array, targets: jax.Array,
                    weights: jax.Array) -> jax.Array:
    """Weighted token sum of the teacher's negative log-likelihood of the targets."""
    logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(nll * weights.astype(jnp.float32))


class DistillLoss:
    """The distillation part of a train step's loss.

    `loss(teacher_params, batch, student_logits, ce_sum, step) -> (total_sum, sums)` where
    `ce_sum` is the weighted token sum of the CE term (label smoothing and z-loss included),
    `total_sum = (1 - alpha) * ce_sum + alpha * kd_sum` and `sums` holds `total`, `kd` and
    `teacher_nll` (token sums, so microbatches add up). The teacher is either online
    (`teacher_logits(teacher_params, batch)`, see `t5lite.train.teacher`) or offline (the batch
    carries `teacher_topk_logits`, `teacher_topk_ids` and `teacher_target_logp`).
    """

    def __init__(self, config: DistillConfig,
                 teacher_logits: Callable[[Any, Batch], jax.Array] | None):
        self.config = config
        self.teacher_logits = teacher_logits

    def __call__(self, teacher_params: Any, batch: Batch, student_logits: jax.Array,
                 ce_sum: jax.Array, step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        alpha = alpha_at(self.config, step)
        temperature = temperature_at(self.config, step)
        weights = batch["decoder_loss_weights"]
        targets = batch["decoder_target_tokens"]
        if TOPK_LOGITS in batch:
            kd = kd_topk_loss_sums(student_logits, batch[TOPK_LOGITS], batch[TOPK_IDS],
                                   weights, temperature)["kd"]
            t_nll = -jnp.sum(batch[TARGET_LOGP].astype(jnp.float32)
                             * weights.astype(jnp.float32))
        else:
            if self.teacher_logits is None:
                raise ConfigError("distillation from offline logits, but the batch carries no "
                                  f"{TOPK_LOGITS!r}; set DistillConfig.offline_logits_dir.")
            teacher = self.teacher_logits(teacher_params, batch)
            kd = kd_loss_sums(student_logits, teacher, weights, temperature)["kd"]
            t_nll = teacher_nll_sum(teacher, targets, weights)
        total = (1.0 - alpha) * ce_sum + alpha * kd
        return total, {"total": total, "kd": kd, "teacher_nll": jax.lax.stop_gradient(t_nll)}

    def step_metrics(self, step: jax.Array) -> dict[str, jax.Array]:
        """The schedules' values at `step` (logged as distill_alpha / distill_temperature)."""
        return {"distill_alpha": alpha_at(self.config, step),
                "distill_temperature": temperature_at(self.config, step)}


# ---------------------------------------------------------------- decoder-only teachers

def _segments(batch: Batch, prefix: str, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(segment ids, positions) of the encoder or decoder half; unpacked batches get segment 1
    on real tokens (0 on padding) and positions 0, 1, 2, ..."""
    seg = batch.get(f"{prefix}_segment_ids")
    pos = batch.get(f"{prefix}_positions")
    if seg is None:
        if prefix == "encoder":
            seg = (tokens != 0).astype(jnp.int32)
        else:  # decoder inputs start with 0: padding is known from the loss weights/targets
            seg = (batch["decoder_target_tokens"] != 0).astype(jnp.int32)
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return seg.astype(jnp.int32), pos.astype(jnp.int32)


def prefix_lm_teacher_batch(batch: Batch) -> Batch:
    """A `DecoderOnly` (prefix-LM) teacher's batch for an encoder-decoder batch.

    The teacher row is `[encoder row ; decoder row]` (length Li + Lt). For a segment with
    inputs i_0..i_{n-1} and targets t_0..t_{m-1} the prefix-LM sequence (SeqIO's
    PrefixLMFeatureConverter) is `inputs ; targets`, fed shifted right: the teacher *inputs*
    are 0, i_0 .. i_{n-2} in the encoder half and i_{n-1}, t_0 .. t_{m-2} in the decoder half
    (which is the student's `decoder_input_tokens` with its leading 0 replaced by i_{n-1}).
    Positions are the encoder positions 0..n-1 and n + the decoder positions; the
    bidirectional prefix (`decoder_causal_attention`) is the encoder half plus the first decoder
    position of each segment. Since every encoder index is before every decoder index, plain
    index-causality plus the segment mask gives exactly the contiguous sequence's attention, so
    the teacher's logits at index Li + j predict the student's target j.

    Example (one unpacked row: inputs [5, 6, 1], targets [7, 1])::

        tokens     [0, 5, 6 | 1, 7]      positions [0, 1, 2 | 3, 4]
        causal_att [1, 1, 1 | 1, 0]      logits[3:] predict [7, 1]
    """
    enc = batch["encoder_input_tokens"].astype(jnp.int32)
    dec = batch["decoder_input_tokens"].astype(jnp.int32)
    enc_seg, enc_pos = _segments(batch, "encoder", enc)
    dec_seg, dec_pos = _segments(batch, "decoder", dec)
    # encoder half shifted right within each segment (0 at each segment start)
    prev = jnp.pad(enc[:, :-1], ((0, 0), (1, 0)))
    enc_in = jnp.where(enc_pos > 0, prev, 0) * (enc_seg != 0)
    # per decoder position: its segment's input length n and last input token i_{n-1}
    same = (enc_seg[:, None, :] == dec_seg[:, :, None]) & (enc_seg[:, None, :] != 0)  # [B,Lt,Li]
    n = jnp.sum(same, axis=-1, dtype=jnp.int32)
    is_last = same & (enc_pos[:, None, :] == (n - 1)[:, :, None])
    last_tok = jnp.sum(jnp.where(is_last, enc[:, None, :], 0), axis=-1)
    seg_start = (dec_pos == 0) & (dec_seg != 0)
    dec_in = jnp.where(seg_start, last_tok, dec)
    return {
        "decoder_input_tokens": jnp.concatenate([enc_in, dec_in], axis=1),
        "decoder_segment_ids": jnp.concatenate([enc_seg, dec_seg], axis=1),
        "decoder_positions": jnp.concatenate([enc_pos, dec_pos + n], axis=1),
        "decoder_causal_attention": jnp.concatenate(
            [(enc_seg != 0), seg_start], axis=1).astype(jnp.int32),
    }


__all__ = ["DistillConfig", "DistillLoss", "TARGET_LOGP", "TOPK_IDS", "TOPK_LOGITS", "alpha_at", "kd_loss_sums",
           "kd_topk_loss_sums", "prefix_lm_teacher_batch", "slice_vocab", "teacher_nll_sum",
           "temperature_at"]
