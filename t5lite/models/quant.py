"""int8 weight quantization for inference, and the matmul that reads int8 weights directly.

What is quantized (per output channel, symmetric, scale = max|w| / 127 over the contracted
axes, so every output channel keeps its own range):

    attention q, k, v [embed, heads, kv]   scale per (head, kv)     contracted: embed
    attention o       [heads, kv, embed]   scale per embed          contracted: heads, kv
    MLP wi, wi_0, wi_1 [embed, mlp]        scale per mlp            contracted: embed
    MLP wo            [mlp, embed]         scale per embed          contracted: mlp
    embedding         [vocab, embed]       scale per vocab row      (the tied output layer too)
    lm_head           [embed, vocab]       scale per vocab column   (the untied output layer)

Stacked (scanned) layers keep one scale per layer. Norms, the relative position bias and MoE
experts stay float. A quantized weight replaces the float `nnx.Param` by an int8 `nnx.Param` of
the same shape and logical axes, next to a float32 `<name>_scale` Param (the weight's shape with
1 on the contracted axes), so checkpoints, sharding rules and `layer_modules()` work unchanged.

The matmul (`dense`) never makes a float copy of a weight; the scales are applied to its output:

    activations="int8"   each activation row is quantized on the fly (one scale per row over the
                         contracted axes), the dot runs int8 x int8 -> int32, and
                         out = acc * row_scale * channel_scale. XLA:CPU runs such dots natively;
                         it does *not* fuse an int8 -> float convert into a float dot (it would
                         write a float copy of every weight on every call).
    activations="int8x2" (default on CPU) the same with each activation row split into two int8
                         parts, coarse q1 (scale s = max|x| / 127) and the residual q2 (scale
                         s / 254): x ~ s q1 + s/254 q2, about 15 bits. Both parts go through ONE
                         int8 dot (stacked as extra rows, so the weight is read once); decoding
                         is bound by weight bytes, so the second part is nearly free there. With
                         one int8 part greedy outputs of the demo model agreed with float on 92 %
                         of tokens; with two, see the README.
    activations="float"  (default on GPU / TPU) weight-only: out = (x @ convert(w)) * scale; XLA's
                         GPU / TPU matmul fusions fold the convert into the dot's operand read.

Example::

    >>> model = quantize_model(model, QuantConfig())        # in place; returns the model
    >>> w = kernel(model.decoder.layers.mlp, "wo", jnp.float32)   # a QTensor (int8 + scales)
    >>> y = dense("btf,fd->btd", h, w)                      # [B, T, d] float32

The cross-attention K/V computed once per request can be kept in bfloat16
(`cast_cross_kv`): decode steps then read half the bytes; the queries and probabilities are cast
to bfloat16 for those two dots (`decode_attention`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from t5lite import storage
from t5lite.errors import ConfigError, UserError
from t5lite.models.matmul import einsum, expand_ellipsis
from t5lite.models.target import target_backend

QUANT_FILE = "quantization.json"
FORMAT_VERSION = 1

# parameter name -> (rank of one layer's weight, contracted axes of that weight)
_CONTRACTED: dict[str, tuple[int, tuple[int, ...]]] = {
    "q": (3, (0,)), "k": (3, (0,)), "v": (3, (0,)), "o": (3, (0, 1)),
    "wi": (2, (0,)), "wi_0": (2, (0,)), "wi_1": (2, (0,)), "wo": (2, (0,)),
    "embedding": (2, (1,)), "lm_head": (2, (0,)),
}
ACTIVATIONS = ("int8x2", "int8", "float")
CROSS_KV_DTYPES = ("float", "bfloat16")


def default_activations() -> str:
    """int8 x int8 dots on CPU (XLA:CPU has native int8 dots but no convert-into-dot fusion),
    weight-only elsewhere."""
    return "int8x2" if target_backend() == "cpu" else "float"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize. weights: "int8"; activations: "int8x2" | "int8" | "float" (see module
    doc);
    None picks `default_activations()` when the model is quantized."""

    weights: str = "int8"
    activations: str | None = None

    def __post_init__(self):
        if self.weights != "int8":
            raise ConfigError(f"weights={self.weights!r}: only 'int8' weight quantization "
                              "exists.")
        if self.activations is not None and self.activations not in ACTIVATIONS:
            raise ConfigError(f"activations={self.activations!r} must be one of "
                              f"{', '.join(ACTIVATIONS)}.")

    def resolved(self) -> "QuantConfig":
        return dataclasses.replace(self, activations=self.activations or default_activations())


@dataclasses.dataclass(frozen=True)
class QTensor:
    """An int8 weight and its float32 per-channel scale (keepdims: 1 on contracted axes), as
    read inside a traced computation. Not a stored object: modules hold two Params."""

    value: jax.Array
    scale: jax.Array
    activations: str
    dtype: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape


def is_quantized(module: nnx.Module, name: str) -> bool:
    return hasattr(module, name + "_scale")


def kernel(module: nnx.Module, name: str, dtype: Any) -> jax.Array | QTensor:
    """The weight `module.<name>` for a matmul in `dtype`: the float array cast to dtype, or a
    QTensor when the weight is quantized (pass it to `dense`)."""
    param = getattr(module, name)
    if not is_quantized(module, name):
        return param[...].astype(dtype)
    return QTensor(param[...], getattr(module, name + "_scale")[...],
                   getattr(module, "quant_activations", "float"), dtype)


def _to_output(scale: jax.Array, letters: str, out: str) -> jax.Array:
    """A keepdims scale over an operand's `letters` broadcastable against the output `out`."""
    keep = [i for i, c in enumerate(letters) if c in out]
    kept = "".join(letters[i] for i in keep)
    s = scale.reshape([scale.shape[i] for i in keep])
    ordered = "".join(c for c in out if c in kept)
    if ordered != kept:
        s = jnp.einsum(f"{kept}->{ordered}", s)
    return s.reshape([s.shape[ordered.index(c)] if c in ordered else 1 for c in out])


def quantize_rows(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantization with one float32 scale per slice over `axes` (keepdims)."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(xf / scale), -127, 127).astype(jnp.int8)
    return q, scale


def dense(eqn: str, x: jax.Array, w: jax.Array | QTensor,
          preferred_element_type: Any = None) -> jax.Array:
    """`jnp.einsum(eqn, x, w)` for a float or quantized weight (see module doc). The result
    has `preferred_element_type` if given, else the weight's compute dtype."""
    if not isinstance(w, QTensor):
        return einsum(eqn, x, w, preferred_element_type=preferred_element_type)
    lhs, rhs, out = expand_ellipsis(eqn, x.ndim, w.value.ndim)
    result_dtype = preferred_element_type or w.dtype
    w_scale = _to_output(w.scale, rhs, out)
    if w.activations in ("int8", "int8x2"):
        contracted = tuple(i for i, c in enumerate(lhs) if c in rhs and c not in out)
        xq, x_scale = quantize_rows(x, contracted)
        if w.activations == "int8":
            acc = jnp.einsum(f"{lhs},{rhs}->{out}", xq, w.value,
                             preferred_element_type=jnp.int32)
            y = acc.astype(jnp.float32) * _to_output(x_scale, lhs, out)
        else:
            fine = x_scale / 254.0
            residual = x.astype(jnp.float32) - xq.astype(jnp.float32) * x_scale
            rq = jnp.clip(jnp.round(residual / fine), -127, 127).astype(jnp.int8)
            z = next(c for c in "ZYXWVU" if c not in lhs + rhs)  # the part axis
            acc = jnp.einsum(f"{z}{lhs},{rhs}->{z}{out}", jnp.stack([xq, rq]), w.value,
                             preferred_element_type=jnp.int32).astype(jnp.float32)
            y = (acc[0] + acc[1] / 254.0) * _to_output(x_scale, lhs, out)
        y = y * w_scale
    else:
        y = einsum(f"{lhs},{rhs}->{out}", x, w.value.astype(x.dtype),
                   preferred_element_type=jnp.float32) * w_scale
    return y.astype(result_dtype)


def embed_lookup(module: nnx.Module, tokens: jax.Array, dtype: Any) -> jax.Array:
    """Rows of a quantized embedding table [vocab, embed] times their row scales."""
    rows = jnp.take(module.embedding[...], tokens, axis=0).astype(jnp.float32)
    scales = jnp.take(module.embedding_scale[...][:, 0], tokens, axis=0)
    return (rows * scales[..., None]).astype(dtype)


# ------------------------------------------------------------------------ quantizing a model
def _quantize_param(module: nnx.Module, name: str, activations: str) -> None:
    param = getattr(module, name)
    rank, contracted = _CONTRACTED[name]
    value = param[...]
    lead = value.ndim - rank  # stacked layers (scan) come first
    axes = tuple(lead + a for a in contracted)
    q, scale = quantize_rows(value, axes)
    names = param.get_metadata().get("out_sharding")
    meta = {}
    if names:
        scale_names = tuple(None if i in axes else n for i, n in enumerate(names))
        meta = {"out_sharding": tuple(names), "eager_sharding": False}
        scale_meta = {"out_sharding": scale_names, "eager_sharding": False}
    else:
        scale_meta = {}
    setattr(module, name, nnx.Param(q, **meta))
    setattr(module, name + "_scale", nnx.Param(scale, **scale_meta))
    module.quant_activations = activations


def quantize_model(model: nnx.Module, config: QuantConfig | None = None) -> nnx.Module:
    """Quantize `model`'s attention, dense-MLP, embedding and output-layer weights to int8 in
    place (see module doc); returns the model. Works under `nnx.eval_shape` too (to build the
    abstract structure of a quantized checkpoint)."""
    from t5lite.models.attention import Attention
    from t5lite.models.layers import Embed
    from t5lite.models.mlp import MLP

    cfg = (config or QuantConfig()).resolved()
    targets: list[tuple[nnx.Module, str]] = []
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Attention):
            targets += [(module, n) for n in ("q", "k", "v", "o")]
        elif isinstance(module, MLP):
            targets += [(module, n) for n in (("wi_0", "wi_1") if module.gated else ("wi",))]
            targets.append((module, "wo"))
        elif isinstance(module, Embed):
            targets.append((module, "embedding"))
        if hasattr(module, "lm_head") and isinstance(getattr(module, "lm_head"), nnx.Param):
            targets.append((module, "lm_head"))
    for module, name in targets:
        if not is_quantized(module, name):
            _quantize_param(module, name, cfg.activations)
    return model


def cast_cross_kv(cross: dict, dtype: str) -> dict:
    """Cross-attention K/V (from `precompute_cross_attention`) stored in `dtype`."""
    if dtype == "float":
        return cross
    if dtype not in CROSS_KV_DTYPES:
        raise ConfigError(f"cross_kv_dtype={dtype!r} must be one of "
                          f"{', '.join(CROSS_KV_DTYPES)}.")
    if "encoded" in cross:  # absorbed cross-attention: the encoder output is what steps read
        return {**cross, "encoded": cross["encoded"].astype(jnp.bfloat16),
                "encoded_t": cross["encoded_t"].astype(jnp.bfloat16)}
    cast = lambda arrays: tuple(a.astype(jnp.bfloat16) for a in arrays)  # noqa: E731
    return {**cross, "k": cast(cross["k"]), "v": cast(cross["v"])}


# ------------------------------------------------------------------------ quantized model dirs
def write_quant_info(model_dir: str, config: QuantConfig, **extra: Any) -> None:
    payload = {"format": FORMAT_VERSION, **dataclasses.asdict(config.resolved()), **extra}
    storage.write_atomic(storage.join(model_dir, QUANT_FILE),
                         json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_quant_info(model_dir: str) -> QuantConfig | None:
    """The QuantConfig of a quantized model dir (written by `t5lite quantize`), else None."""
    path = storage.join(model_dir, QUANT_FILE)
    if not storage.exists(path):
        return None
    try:
        payload = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-run `t5lite quantize`.")
    if payload.get("format") != FORMAT_VERSION:
        raise UserError(f"{path} has format {payload.get('format')!r}; this t5lite reads "
                        f"format {FORMAT_VERSION}. Re-run `t5lite quantize`.")
    try:
        return QuantConfig(weights=payload["weights"], activations=payload["activations"])
    except (KeyError, ConfigError) as e:
        raise UserError(f"{path} is not a valid quantization record ({e}); re-run "
                        "`t5lite quantize`.")


__all__ = ["QuantConfig", "QTensor", "quantize_model", "dense", "kernel", "cast_cross_kv",
           "read_quant_info", "write_quant_info"]
