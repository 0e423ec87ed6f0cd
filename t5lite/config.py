"""Model configuration: one frozen dataclass, validated on construction.

`ModelConfig()` with no arguments is T5 v1.1-small. Every invalid combination raises
`t5lite.errors.ConfigError` whose message says which field to change and how.

Example::

    >>> cfg = ModelConfig(d_model=64, num_heads=4, head_dim=16, d_ff=128,
    ...                   num_encoder_layers=2, num_decoder_layers=2, vocab_size=512)
    >>> cfg.kv_heads       # num_kv_heads=None means plain multi-head attention
    4
    >>> ModelConfig(num_heads=6, num_kv_heads=4)
    Traceback (most recent call last):
    ...
    t5lite.errors.ConfigError: num_heads=6 is not divisible by num_kv_heads=4 ...
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from t5lite.errors import ConfigError

Activation = Literal["gelu", "silu", "relu"]
PositionScheme = Literal["relative", "rope"]
Architecture = Literal["encoder_decoder", "decoder_only"]
RematPolicy = Literal["none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out",
                      "save_projections"]
AttentionImpl = Literal["einsum", "xla", "cudnn", "auto"]

_DTYPES = ("float32", "bfloat16", "float16")
_ACTIVATIONS = ("gelu", "silu", "relu")
_POSITIONS = ("relative", "rope")
_ARCHITECTURES = ("encoder_decoder", "decoder_only")
_REMAT = ("none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out",
          "save_projections")
_ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "auto")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of an `EncoderDecoder` (or `DecoderOnly`) model.

    Defaults are T5 v1.1-small: gated-GELU, relative position bias, RMSNorm, no biases,
    untied input/output embeddings, 8+8 layers, d_model 512, 6 heads of 64, d_ff 1024.
    """

    architecture: Architecture = "encoder_decoder"
    vocab_size: int = 32128  # embedding rows (may be padded beyond the tokenizer's size)
    d_model: int = 512
    num_heads: int = 6
    num_kv_heads: int | None = None  # None -> num_heads (MHA); 1 -> MQA; between -> GQA
    head_dim: int = 64
    d_ff: int = 1024
    activation: Activation = "gelu"  # "gelu" is the tanh approximation, as T5 v1.1's gelu_new
    gated: bool = True  # GLU feed-forward (gated-GELU / SwiGLU)
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    # positions
    position_scheme: PositionScheme = "relative"
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    rope_theta: float = 10_000.0
    # norms, embeddings, regularisation
    layer_norm_eps: float = 1e-6
    tie_embeddings: bool = False  # output projection = shared input embedding
    scale_tied_logits: bool = True  # T5: multiply decoder output by d_model**-0.5 when tied
    dropout_rate: float = 0.0
    # numerics
    dtype: str = "float32"  # compute dtype: "bfloat16" for training on accelerators
    param_dtype: str = "float32"
    # mixture of experts (num_experts == 0 means dense FFN everywhere)
    num_experts: int = 0
    experts_top_k: int = 2
    expert_capacity_factor: float = 1.25
    moe_dropless: bool = False  # route every token (no capacity); memory grows with tokens*top_k
    moe_layer_period: int = 1  # every n-th layer is MoE (layer i is MoE when (i+1) % period == 0)
    moe_in_encoder: bool = True
    moe_in_decoder: bool = True
    router_aux_loss_weight: float = 0.01  # load-balancing loss (Switch/GShard style)
    router_z_loss_weight: float = 0.001
    # execution
    scan_layers: bool = True
    # "save_projections": keep only the q/k/v projections, the attention core output, the
    # attention outputs and the MLP input projections of each layer; recompute norms, softmax
    # and activations in the backward pass (`t5lite.models.blocks`)
    remat_policy: RematPolicy = "none"
    scan_unroll: int = 1  # layers per iteration of the layer scan (jax.lax.scan's unroll)
    # True: the relative position bias is one [1, heads, q, k] tensor per stack computed from
    # 0..T-1, broadcast over the batch, instead of one [B, heads, q, k] from each row's
    # positions. Same values whenever every packed segment's positions run 0, 1, 2, ... from
    # its first token (SeqIO packing; unpacked rows); packing stays in the segment mask.
    shared_relative_bias: bool = False
    # True: the train step casts the matmul kernels to `dtype` once per step, outside the
    # microbatch loop and the layer scan (their gradients are taken in that dtype: the same
    # values, as the matmuls' weight gradients are computed in it anyway)
    cast_params_once: bool = False
    # "einsum": grouped einsums + f32 softmax (fastest measured on CPU, and the only core that
    # drops attention probabilities); "xla"/"cudnn"/"auto": jax.nn.dot_product_attention.
    attention_impl: AttentionImpl = "einsum"

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ derived values
    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (== num_heads for plain multi-head attention)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def compute_dtype(self) -> np.dtype:
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> np.dtype:
        import jax.numpy as jnp

        return jnp.dtype(self.param_dtype)

    def is_moe_layer(self, stack: Literal["encoder", "decoder"], index: int) -> bool:
        """Whether layer `index` (0-based) of `stack` uses a mixture-of-experts FFN."""
        if self.num_experts == 0:
            return False
        if stack == "encoder" and not self.moe_in_encoder:
            return False
        if stack == "decoder" and not self.moe_in_decoder:
            return False
        return (index + 1) % self.moe_layer_period == 0

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"ModelConfig: {msg}")

        if self.architecture not in _ARCHITECTURES:
            fail(f"architecture={self.architecture!r} is unknown; use one of {_ARCHITECTURES}.")
        for name in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name}={value!r} must be a positive integer.")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(f"{name}={value!r} must be a non-negative integer.")
        if self.num_decoder_layers == 0:
            fail("num_decoder_layers=0: every model needs at least one decoder layer.")
        if self.architecture == "encoder_decoder" and self.num_encoder_layers == 0:
            fail("num_encoder_layers=0 with architecture='encoder_decoder'; use at least one "
                 "encoder layer, or architecture='decoder_only'.")
        if self.architecture == "decoder_only" and self.num_encoder_layers != 0:
            fail(f"architecture='decoder_only' has no encoder but num_encoder_layers="
                 f"{self.num_encoder_layers}; set num_encoder_layers=0.")
        if self.num_kv_heads is not None:
            if not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0:
                fail(f"num_kv_heads={self.num_kv_heads!r} must be a positive integer or None.")
            if self.num_heads % self.num_kv_heads != 0:
                fail(f"num_heads={self.num_heads} is not divisible by num_kv_heads="
                     f"{self.num_kv_heads}; pick num_kv_heads among the divisors of num_heads "
                     f"({[k for k in range(1, self.num_heads + 1) if self.num_heads % k == 0]}).")
        if self.activation not in _ACTIVATIONS:
            fail(f"activation={self.activation!r} is unknown; use one of {_ACTIVATIONS}.")
        if self.position_scheme not in _POSITIONS:
            fail(f"position_scheme={self.position_scheme!r} is unknown; use one of {_POSITIONS}.")
        if self.position_scheme == "rope":
            if self.head_dim % 2 != 0:
                fail(f"head_dim={self.head_dim} is odd; RoPE rotates pairs of dimensions, so "
                     "head_dim must be even with position_scheme='rope'.")
            if self.rope_theta <= 0:
                fail(f"rope_theta={self.rope_theta} must be positive.")
        else:
            if self.relative_num_buckets < 2:
                fail(f"relative_num_buckets={self.relative_num_buckets} must be at least 2.")
            if self.relative_max_distance < self.relative_num_buckets // 2:
                fail(f"relative_max_distance={self.relative_max_distance} must be at least "
                     f"relative_num_buckets/2={self.relative_num_buckets // 2}.")
        if not self.layer_norm_eps > 0:
            fail(f"layer_norm_eps={self.layer_norm_eps} must be positive.")
        if not 0.0 <= self.dropout_rate < 1.0:
            fail(f"dropout_rate={self.dropout_rate} must be in [0, 1).")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                fail(f"{name}={getattr(self, name)!r} is unknown; use one of {_DTYPES}.")
        if self.param_dtype != "float32":
            fail(f"param_dtype={self.param_dtype!r}: keep parameters in float32 (bf16 compute "
                 "is set with dtype='bfloat16').")
        if self.dtype == "float16":
            fail("dtype='float16' overflows in T5 models; use 'bfloat16' or 'float32'.")
        if self.num_experts < 0:
            fail(f"num_experts={self.num_experts} must be >= 0 (0 = dense FFN).")
        if self.num_experts > 0:
            if not 1 <= self.experts_top_k <= self.num_experts:
                fail(f"experts_top_k={self.experts_top_k} must be between 1 and num_experts="
                     f"{self.num_experts}.")
            if not self.moe_dropless and self.expert_capacity_factor <= 0:
                fail(f"expert_capacity_factor={self.expert_capacity_factor} must be positive "
                     "(or set moe_dropless=True).")
            if self.moe_layer_period < 1:
                fail(f"moe_layer_period={self.moe_layer_period} must be >= 1.")
            if not (self.moe_in_encoder or self.moe_in_decoder):
                fail("num_experts > 0 but moe_in_encoder and moe_in_decoder are both False.")
        if self.num_experts > 0 and self.scan_layers and self.moe_layer_period > 1:
            for stack, num in (("encoder", self.num_encoder_layers),
                               ("decoder", self.num_decoder_layers)):
                uses_moe = self.moe_in_encoder if stack == "encoder" else self.moe_in_decoder
                if uses_moe and num % self.moe_layer_period != 0:
                    fail(f"num_{stack}_layers={num} is not a multiple of moe_layer_period="
                         f"{self.moe_layer_period}; scanned layers repeat a group of "
                         f"{self.moe_layer_period} layers. Change the depth or the period, or "
                         "set scan_layers=False.")
        if (not isinstance(self.scan_unroll, int) or isinstance(self.scan_unroll, bool)
                or self.scan_unroll < 1):
            fail(f"scan_unroll={self.scan_unroll!r} must be a positive integer (1 = one layer "
                 "per scan iteration).")
        if self.remat_policy not in _REMAT:
            fail(f"remat_policy={self.remat_policy!r} is unknown; use one of {_REMAT}.")
        if self.attention_impl not in _ATTENTION_IMPLS:
            fail(f"attention_impl={self.attention_impl!r} is unknown; use one of "
                 f"{_ATTENTION_IMPLS}.")
        if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
            fail(f"attention_impl='cudnn' needs bfloat16 compute, not "
                 f"dtype={self.dtype!r}; set ModelConfig.dtype='bfloat16' (gin/runs/gpu.gin "
                 "does both) or use attention_impl='einsum'.")


def config_to_dict(config: ModelConfig) -> dict:
    """Plain-JSON form of a ModelConfig (what `model_config.json` in a model dir holds)."""
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> ModelConfig:
    """Inverse of `config_to_dict`; unknown keys are an error that names them."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"ModelConfig: unknown field(s) {unknown}; known fields are "
                          f"{sorted(known)}.")
    return ModelConfig(**values)


# The one feature converter each model architecture (`ModelConfig.architecture`) reads.
FEATURE_CONVERTER_OF = {"encoder_decoder": "enc_dec", "decoder_only": "prefix_lm"}


def check_feature_converter(architecture: str, feature_converter: str) -> None:
    """Raise ConfigError unless `feature_converter` makes the batches `architecture` reads.

    >>> check_feature_converter("decoder_only", "enc_dec")
    Traceback (most recent call last):
    t5lite.errors.ConfigError: ModelConfig.architecture='decoder_only' reads 'prefix_lm' ...
    """
    wanted = FEATURE_CONVERTER_OF.get(architecture)
    if wanted is not None and feature_converter != wanted:
        raise ConfigError(
            f"ModelConfig.architecture={architecture!r} reads {wanted!r} batches but "
            f"DataConfig.feature_converter={feature_converter!r}; set "
            f"DataConfig.feature_converter={wanted!r} (gin: FEATURE_CONVERTER = \"{wanted}\").")
