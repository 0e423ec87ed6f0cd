"""Optimisers: Adafactor (T5 defaults, factored along logical axes) and AdamW, with clipping.

`make_optimizer` turns one validated `OptimizerConfig` plus the parameters' logical axes into an
optax transformation:

    [clip_by_global_norm(grad_clip_norm)]  ->  adafactor | adamw (learning rate from the schedule)

AdamW's decoupled weight decay skips norm scales and biases: a parameter is decayed only when it
has at least two dimensions besides stacking dims (`layers`, `expert`). So a scanned norm scale
`[layers, embed]` is not decayed while a kernel `[embed, mlp]` is.

Example::

    >>> cfg = OptimizerConfig(name="adamw", schedule=ScheduleConfig(name="cosine",
    ...     base_learning_rate=3e-4, warmup_steps=100), weight_decay=0.1, grad_clip_norm=1.0)
    >>> tx, lr = make_optimizer(cfg, params, param_axes, total_steps=10_000)

Freezing (fine-tuning): `make_optimizer(..., freeze=["^encoder\\.", "^embed\\."])` leaves every
parameter whose dotted name (as in model-info.txt, e.g. `encoder.layers.mlp.wi_0`) matches one of
the regular expressions (`re.search`) unchanged: its update is zero and it has no optimiser state
(no Adafactor moments, no Adam moments), and gradient clipping sees only the trained parameters.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import optax

from t5lite.errors import ConfigError
from t5lite.parallel.rules import is_axes
from t5lite.train.adafactor import BATCH_NAMES, adafactor, factor_spec
from t5lite.train.schedules import ScheduleConfig, make_schedule

OptimizerName = Literal["adafactor", "adamw"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser settings. Defaults are T5's Adafactor (no momentum, update clipping at 1.0,
    parameter-scaled steps, rsqrt schedule with base 1.0 and 10k warmup steps)."""

    name: OptimizerName = "adafactor"
    schedule: ScheduleConfig = ScheduleConfig()
    grad_clip_norm: float | None = None  # global-norm clipping of gradients (None = off)
    weight_decay: float = 0.0
    # adafactor
    decay_exponent: float = 0.8
    clipping_threshold: float | None = 1.0
    multiply_by_parameter_scale: bool = True
    momentum: float | None = None
    epsilon1: float = 1e-30
    epsilon2: float = 1e-3
    factored: bool = True
    min_dim_size_to_factor: int = 128
    # adamw
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"OptimizerConfig: {msg}")

        if self.name not in ("adafactor", "adamw"):
            fail(f"name={self.name!r} is unknown; use 'adafactor' or 'adamw'.")
        if not isinstance(self.schedule, ScheduleConfig):
            fail(f"schedule must be a ScheduleConfig, got {type(self.schedule).__name__}.")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            fail(f"grad_clip_norm={self.grad_clip_norm} must be positive (or None = off).")
        if self.weight_decay < 0:
            fail(f"weight_decay={self.weight_decay} must be >= 0.")
        if not 0 < self.decay_exponent <= 1:
            fail(f"decay_exponent={self.decay_exponent} must be in (0, 1].")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            fail(f"momentum={self.momentum} must be in [0, 1) or None.")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"{name}={getattr(self, name)} must be in [0, 1).")
        if not self.eps > 0:
            fail(f"eps={self.eps} must be positive.")


def _is_axes(x: Any) -> bool:
    """`rules.is_axes`, except that a frozen parameter's place (optax.MaskedNode, an empty
    subtree) is not a leaf."""
    return not isinstance(x, optax.MaskedNode) and is_axes(x)


def weight_decay_mask(params: Any, param_axes: Any) -> Any:
    """True for parameters that get weight decay: >= 2 dims besides `layers`/`expert` dims."""

    def keep(axes, p):
        if axes is None:
            return p.ndim >= 2
        return sum(1 for a in axes if a not in BATCH_NAMES) >= 2

    return jax.tree.map(keep, param_axes, params, is_leaf=_is_axes)


def param_names(params: Any) -> Any:
    """A tree like `params` of dotted parameter names ("encoder.layers.mlp.wi_0")."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                                 for k in path), params)


def trainable_mask(params: Any, freeze: Sequence[str]) -> Any:
    """A tree of bools like params: False where the dotted name matches a `freeze` regex.
    `ConfigError` for an invalid regex, one that matches no parameter, or freezing them all."""
    patterns = []
    for text in freeze:
        try:
            patterns.append(re.compile(text))
        except re.error as e:
            raise ConfigError(f"TrainConfig.freeze: {text!r} is not a regular expression ({e})."
                              ) from None
    names = param_names(params)
    all_names = jax.tree.leaves(names)
    for text, pattern in zip(freeze, patterns):
        if not any(pattern.search(n) for n in all_names):
            raise ConfigError(f"TrainConfig.freeze: {text!r} matches no parameter; names look "
                              f"like {', '.join(sorted(all_names)[:4])}, ... (see "
                              "model-info.txt in a model dir).")
    mask = jax.tree.map(lambda n: not any(p.search(n) for p in patterns), names)
    if freeze and not any(jax.tree.leaves(mask)):
        raise ConfigError(f"TrainConfig.freeze={list(freeze)} freezes every parameter; nothing "
                          "would be trained.")
    return mask


def make_optimizer(config: OptimizerConfig, params: Any, param_axes: Any,
                   total_steps: int | None = None, freeze: Sequence[str] = ()
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """(optax transformation, learning-rate schedule) for params (arrays or ShapeDtypeStructs)
    whose logical axes are `param_axes` (a tree like params of tuples of names); parameters
    matching a `freeze` regex are not trained (see the module docstring)."""
    if freeze:
        trainable = trainable_mask(params, freeze)
        # optax.multi_transform hands each branch the params with the other branch's leaves
        # replaced by MaskedNode (an empty subtree): mask this function's trees the same way.
        masked = lambda tree: jax.tree.map(  # noqa: E731
            lambda keep, x: x if keep else optax.MaskedNode(), trainable, tree)
        tx, schedule = make_optimizer(config, masked(params), masked(param_axes), total_steps)
        labels = jax.tree.map(lambda keep: "train" if keep else "frozen", trainable)
        return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), \
            schedule
    schedule = make_schedule(config.schedule, total_steps)
    mask = weight_decay_mask(params, param_axes)
    if config.name == "adafactor":
        specs = jax.tree.map(
            lambda axes, p: factor_spec(p.shape, axes, config.min_dim_size_to_factor,
                                        config.factored),
            param_axes, params, is_leaf=_is_axes)
        core = adafactor(schedule, specs, decay_exponent=config.decay_exponent,
                         epsilon1=config.epsilon1, epsilon2=config.epsilon2,
                         clipping_threshold=config.clipping_threshold,
                         multiply_by_parameter_scale=config.multiply_by_parameter_scale,
                         momentum=config.momentum, weight_decay=config.weight_decay,
                         weight_decay_mask=mask)
    else:
        core = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=mask)
    parts = []
    if config.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(core)
    return optax.chain(*parts), schedule
