"""Learning-rate schedules: T5's inverse square root, cosine, linear and constant.

Every schedule is a function `step -> learning rate` (an optax schedule) built from one validated
`ScheduleConfig`. `step` counts optimiser updates from 0.

T5's default ("constant * rsqrt_decay", base 1.0, 10k warmup steps) keeps the rate flat at
`base / sqrt(warmup)` during warmup and then decays it as `base / sqrt(step)`:

    >>> lr = make_schedule(ScheduleConfig(name="rsqrt", base_learning_rate=1.0, warmup_steps=10_000))
    >>> float(lr(0)), float(lr(10_000)), float(lr(40_000))
    (0.01, 0.01, 0.005)

`linear_warmup=True` ramps linearly from 0 during the warmup instead of holding flat (usual for
AdamW). Cosine and linear warm up linearly to `base_learning_rate`, then decay to
`base_learning_rate * final_fraction` at `decay_steps` (default: the run's train steps) and stay
there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax.numpy as jnp

from t5lite.errors import ConfigError

ScheduleName = Literal["rsqrt", "cosine", "linear", "constant"]
Schedule = Callable[[jnp.ndarray | int], jnp.ndarray]
_NAMES = ("rsqrt", "cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """A learning-rate schedule. `decay_steps=None` means "the run's TRAIN_STEPS"."""

    name: ScheduleName = "rsqrt"
    base_learning_rate: float = 1.0
    warmup_steps: int = 10_000
    linear_warmup: bool = False  # rsqrt only: ramp from 0 instead of holding flat
    decay_steps: int | None = None  # cosine / linear: step at which the decay ends
    final_fraction: float = 0.0  # cosine / linear: final rate as a fraction of the base rate

    def __post_init__(self) -> None:
        if self.name not in _NAMES:
            raise ConfigError(f"ScheduleConfig: name={self.name!r} is unknown; use one of "
                              f"{_NAMES}.")
        if not self.base_learning_rate > 0:
            raise ConfigError(f"ScheduleConfig: base_learning_rate={self.base_learning_rate} "
                              "must be positive.")
        if self.warmup_steps < 0:
            raise ConfigError(f"ScheduleConfig: warmup_steps={self.warmup_steps} must be >= 0.")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ConfigError(f"ScheduleConfig: decay_steps={self.decay_steps} must be larger "
                              f"than warmup_steps={self.warmup_steps}.")
        if not 0.0 <= self.final_fraction <= 1.0:
            raise ConfigError(f"ScheduleConfig: final_fraction={self.final_fraction} must be in "
                              "[0, 1].")


def make_schedule(config: ScheduleConfig, total_steps: int | None = None) -> Schedule:
    """The schedule of `config`; `total_steps` fills in `decay_steps` when that is None."""
    base = float(config.base_learning_rate)
    warmup = int(config.warmup_steps)

    def ramp(step: jnp.ndarray) -> jnp.ndarray:
        if warmup == 0:
            return jnp.ones_like(step)
        return jnp.minimum(1.0, step / warmup)

    if config.name == "constant":
        def constant(step):
            step = jnp.asarray(step, jnp.float32)
            return base * ramp(step) if config.linear_warmup else base * jnp.ones_like(step)

        return constant

    if config.name == "rsqrt":
        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32)
            lr = base * jnp.sqrt(1.0 / jnp.maximum(step, max(warmup, 1)))
            return lr * ramp(step) if config.linear_warmup else lr

        return rsqrt

    decay_steps = config.decay_steps if config.decay_steps is not None else total_steps
    if decay_steps is None or decay_steps <= warmup:
        raise ConfigError(f"ScheduleConfig: {config.name} decay needs decay_steps (or the run's "
                          f"train steps) larger than warmup_steps={warmup}; got {decay_steps}.")
    final = base * config.final_fraction

    def decayed(step):
        step = jnp.asarray(step, jnp.float32)
        frac = jnp.clip((step - warmup) / (decay_steps - warmup), 0.0, 1.0)
        if config.name == "cosine":
            shape = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        else:
            shape = 1.0 - frac
        return jnp.where(step < warmup, base * ramp(step), final + (base - final) * shape)

    return decayed
