"""Scanned <-> unrolled parameter layouts, on plain nested dicts of arrays.

The pure-dict form is what `nnx.to_pure_dict(nnx.state(model, nnx.Param))` returns. In a stack
(`encoder`, `decoder`):
  unrolled           layers: {0: layer, 1: layer, ...}
  scanned            layers: layer with a leading [num_layers] axis on every leaf
  scanned, grouped   layers: {"layers": {0: ..., p-1: ...}} with leading [num_layers / p]
                     (MoE every p-th layer: the scanned unit is a group of p layers)

Example::

    >>> per_layer = layers_of(pure["encoder"], cfg, "encoder")   # list of layer dicts
    >>> pure["encoder"]["layers"] = layers_to(per_layer, cfg.replace(scan_layers=False), "encoder")
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from t5lite.config import ModelConfig

Tree = dict[Any, Any]


def stack_period(cfg: ModelConfig, kind: str) -> int:
    """Scanned unit size of a stack ("encoder" or "decoder")."""
    num = cfg.num_encoder_layers if kind == "encoder" else cfg.num_decoder_layers
    if any(cfg.is_moe_layer(kind, i) for i in range(num)):
        return cfg.moe_layer_period
    return 1


def _num_layers(cfg: ModelConfig, kind: str) -> int:
    return cfg.num_encoder_layers if kind == "encoder" else cfg.num_decoder_layers


def layers_of(stack: Tree, cfg: ModelConfig, kind: str) -> list[Tree]:
    """Per-layer dicts (no layers axis) from a stack's pure dict in cfg's layout."""
    layers = stack["layers"]
    num = _num_layers(cfg, kind)
    if not cfg.scan_layers:
        return [layers[i] for i in range(num)]
    period = stack_period(cfg, kind)
    out = []
    for g in range(num // period):
        for j in range(period):
            unit = layers if period == 1 else layers["layers"][j]
            out.append(jax.tree.map(lambda a, g=g: a[g], unit))
    return out


def layers_to(per_layer: list[Tree], cfg: ModelConfig, kind: str) -> Tree:
    """Inverse of `layers_of`: the `layers` entry of a stack in cfg's layout (numpy arrays
    are stacked with numpy, jax arrays with jax)."""
    if not cfg.scan_layers:
        return {i: layer for i, layer in enumerate(per_layer)}
    period = stack_period(cfg, kind)

    def stack(*xs):
        return np.stack(xs) if isinstance(xs[0], np.ndarray) else jax.numpy.stack(xs)

    if period == 1:
        return jax.tree.map(stack, *per_layer)
    return {"layers": {j: jax.tree.map(stack, *per_layer[j::period]) for j in range(period)}}


def convert_layout(pure: Tree, src: ModelConfig, dst: ModelConfig) -> Tree:
    """Pure param dict of a model built with `src` -> the layout of `dst` (same architecture,
    different `scan_layers`)."""
    out = dict(pure)
    for kind in ("encoder", "decoder"):
        if kind in pure:
            stack = dict(pure[kind])
            stack["layers"] = layers_to(layers_of(pure[kind], src, kind), dst, kind)
            out[kind] = stack
    return out


def params_dict(model: nnx.Module) -> Tree:
    """The model's parameters as a pure nested dict."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params(model: nnx.Module, pure: Tree) -> None:
    """Put a pure param dict (matching the model's structure and shapes) into the model."""
    state = nnx.state(model, nnx.Param)
    expected = jax.tree.map(lambda a: tuple(a.shape), nnx.to_pure_dict(state))
    got = jax.tree.map(lambda a: tuple(np.shape(a)), pure)
    if expected != got:
        raise ValueError(f"parameter structure/shapes differ from the model's: "
                         f"{_first_difference(expected, got)}")
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda ref, a: jax.numpy.asarray(a, dtype=ref.dtype), nnx.to_pure_dict(state), pure))
    nnx.update(model, state)


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a:
                return f"unexpected {path}{key}"
            if key not in b:
                return f"missing {path}{key}"
            diff = _first_difference(a[key], b[key], f"{path}{key}.")
            if diff:
                return diff
        return ""
    return "" if a == b else f"{path.rstrip('.')}: model {a} vs given {b}"
