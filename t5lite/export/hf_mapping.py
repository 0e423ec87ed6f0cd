"""Two-way mapping between t5lite parameters and `transformers.T5ForConditionalGeneration`.

Layouts covered: T5 v1.1 (gated-GELU, untied embeddings, no logit scaling) and original T5
(ReLU, tied embeddings, decoder output scaled by d_model**-0.5); also gated-SiLU/ReLU and plain
ReLU/SiLU feed-forwards. GQA, RoPE, MoE and decoder-only models have no T5 equivalent and raise
`ConfigError`.

Shapes (torch Linear weights are [out, in]):
  q/k/v  [heads*head_dim, d_model]  <->  [d_model, heads, head_dim]
  o      [d_model, heads*head_dim]  <->  [heads, head_dim, d_model]
  wi*    [d_ff, d_model]            <->  [d_model, d_ff];   wo [d_model, d_ff] <-> [d_ff, d_model]
  lm_head [vocab, d_model]          <->  [d_model, vocab]
Scanned models (leading `layers` axis) and unrolled ones are both handled.

Example::

    >>> hf = transformers.T5ForConditionalGeneration.from_pretrained(path)
    >>> cfg = config_from_hf(hf.config)
    >>> model = build_model(cfg, rngs=nnx.Rngs(0))
    >>> load_params(model, hf_state_dict_to_params(hf.state_dict(), cfg))
    >>> state = params_to_hf_state_dict(model, cfg)    # {name: np.ndarray float32}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from t5lite.config import ModelConfig
from t5lite.errors import ConfigError, UserError
from t5lite.models.layout import layers_of, layers_to, params_dict

_HF_ACTIVATIONS = {  # feed_forward_proj -> (activation, gated)
    "gated-gelu": ("gelu", True),
    "gated-silu": ("silu", True),
    "gated-relu": ("relu", True),
    "relu": ("relu", False),
    "silu": ("silu", False),
}


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    """ModelConfig equivalent to a `transformers.T5Config` (or its config.json dict).

    Tying: transformers 5.x always reports tie_word_embeddings=True for T5 and records the T5
    v1.1 layout as `scale_decoder_outputs=False`; a config.json dict says
    tie_word_embeddings=false. Either way v1.1 maps to untied and original T5 to tied + scaled.
    """
    proj = _get(hf_config, "feed_forward_proj", "relu")
    if proj not in _HF_ACTIVATIONS:
        raise ConfigError(f"feed_forward_proj={proj!r} has no t5lite equivalent; supported: "
                          f"{sorted(_HF_ACTIVATIONS)} (plain 'gelu' is the erf GELU, t5lite's "
                          "gelu is the tanh approximation).")
    activation, gated = _HF_ACTIVATIONS[proj]
    scale = _get(hf_config, "scale_decoder_outputs")
    tied = bool(scale) if scale is not None else bool(_get(hf_config, "tie_word_embeddings", True))
    num_layers = int(_get(hf_config, "num_layers"))
    values = dict(
        architecture="encoder_decoder",
        vocab_size=int(_get(hf_config, "vocab_size")),
        d_model=int(_get(hf_config, "d_model")),
        num_heads=int(_get(hf_config, "num_heads")),
        num_kv_heads=None,
        head_dim=int(_get(hf_config, "d_kv")),
        d_ff=int(_get(hf_config, "d_ff")),
        activation=activation,
        gated=gated,
        num_encoder_layers=num_layers,
        num_decoder_layers=int(_get(hf_config, "num_decoder_layers") or num_layers),
        position_scheme="relative",
        relative_num_buckets=int(_get(hf_config, "relative_attention_num_buckets", 32)),
        relative_max_distance=int(_get(hf_config, "relative_attention_max_distance", 128)),
        layer_norm_eps=float(_get(hf_config, "layer_norm_epsilon", 1e-6)),
        tie_embeddings=tied,
        scale_tied_logits=True,
        dropout_rate=float(_get(hf_config, "dropout_rate", 0.0)),
    )
    values.update(overrides)
    return ModelConfig(**values)


def check_hf_compatible(cfg: ModelConfig) -> None:
    """Raise ConfigError when `cfg` cannot be expressed as a transformers T5 model."""
    problems = []
    if cfg.architecture != "encoder_decoder":
        problems.append("architecture must be 'encoder_decoder'")
    if cfg.position_scheme != "relative":
        problems.append("position_scheme must be 'relative' (T5 has no RoPE)")
    if cfg.kv_heads != cfg.num_heads:
        problems.append("num_kv_heads must equal num_heads (T5 has no GQA/MQA)")
    if cfg.num_experts:
        problems.append("num_experts must be 0 (T5ForConditionalGeneration has no MoE)")
    if cfg.activation == "gelu" and not cfg.gated:
        problems.append("activation='gelu' needs gated=True (transformers' plain 'gelu' is "
                        "the erf GELU)")
    if cfg.tie_embeddings and not cfg.scale_tied_logits:
        problems.append("tie_embeddings=True requires scale_tied_logits=True in transformers")
    if problems:
        raise ConfigError("this model cannot be exported to transformers T5: "
                          + "; ".join(problems) + ".")


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.T5Config(**kwargs)` equivalent to `cfg`."""
    check_hf_compatible(cfg)
    proj = ("gated-" if cfg.gated else "") + cfg.activation
    return dict(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_num_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=cfg.dropout_rate, layer_norm_epsilon=cfg.layer_norm_eps,
        feed_forward_proj=proj, tie_word_embeddings=cfg.tie_embeddings,
        is_encoder_decoder=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


# ---------------------------------------------------------------------- tensors
def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _ffn_names(cfg: ModelConfig) -> tuple[str, ...]:
    return ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")


def _attn_from_hf(get, prefix: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    return {
        "q": get(f"{prefix}.q.weight").T.reshape(d, n, h),
        "k": get(f"{prefix}.k.weight").T.reshape(d, n, h),
        "v": get(f"{prefix}.v.weight").T.reshape(d, n, h),
        "o": get(f"{prefix}.o.weight").T.reshape(n, h, d),
    }


def _attn_to_hf(attn: Mapping, prefix: str, cfg: ModelConfig, out: dict) -> None:
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    for name in ("q", "k", "v"):
        out[f"{prefix}.{name}.weight"] = _np(attn[name]).reshape(d, n * h).T.copy()
    out[f"{prefix}.o.weight"] = _np(attn["o"]).reshape(n * h, d).T.copy()


def hf_state_dict_to_params(hf_state: Mapping[str, Any], cfg: ModelConfig) -> dict:
    """transformers T5 state dict (numpy or torch tensors) -> t5lite pure param dict in
    cfg's layout (scanned or unrolled), ready for `t5lite.models.layout.load_params`."""
    check_hf_compatible(cfg)

    def get(name: str) -> np.ndarray:
        if name not in hf_state:
            raise UserError(f"transformers state dict has no {name!r}; is the config right "
                            f"(layers={cfg.num_encoder_layers}+{cfg.num_decoder_layers}, "
                            f"gated={cfg.gated})?")
        return _np(hf_state[name])

    def ffn(prefix: str) -> dict[str, np.ndarray]:
        return {name: get(f"{prefix}.DenseReluDense.{name}.weight").T
                for name in _ffn_names(cfg)}

    enc_layers = []
    for i in range(cfg.num_encoder_layers):
        p = f"encoder.block.{i}.layer"
        enc_layers.append({
            "pre_self_attention_norm": {"scale": get(f"{p}.0.layer_norm.weight")},
            "self_attention": _attn_from_hf(get, f"{p}.0.SelfAttention", cfg),
            "pre_mlp_norm": {"scale": get(f"{p}.1.layer_norm.weight")},
            "mlp": ffn(f"{p}.1"),
        })
    dec_layers = []
    for i in range(cfg.num_decoder_layers):
        p = f"decoder.block.{i}.layer"
        dec_layers.append({
            "pre_self_attention_norm": {"scale": get(f"{p}.0.layer_norm.weight")},
            "self_attention": _attn_from_hf(get, f"{p}.0.SelfAttention", cfg),
            "pre_cross_attention_norm": {"scale": get(f"{p}.1.layer_norm.weight")},
            "cross_attention": _attn_from_hf(get, f"{p}.1.EncDecAttention", cfg),
            "pre_mlp_norm": {"scale": get(f"{p}.2.layer_norm.weight")},
            "mlp": ffn(f"{p}.2"),
        })
    rel = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    pure: dict[str, Any] = {
        "embed": {"embedding": get("shared.weight")},
        "encoder": {
            "relpos": {"embedding": get(f"encoder.{rel}")},
            "layers": layers_to(enc_layers, cfg, "encoder"),
            "final_norm": {"scale": get("encoder.final_layer_norm.weight")},
        },
        "decoder": {
            "relpos": {"embedding": get(f"decoder.{rel}")},
            "layers": layers_to(dec_layers, cfg, "decoder"),
            "final_norm": {"scale": get("decoder.final_layer_norm.weight")},
        },
    }
    if not cfg.tie_embeddings:
        pure["lm_head"] = get("lm_head.weight").T
    return pure


def params_to_hf_state_dict(model_or_state: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """t5lite model (or its Param state / pure dict) -> transformers T5 state dict
    (float32 numpy). Tied models repeat the shared embedding under lm_head.weight, as
    transformers' own checkpoints do."""
    check_hf_compatible(cfg)
    if isinstance(model_or_state, nnx.Module):
        pure = params_dict(model_or_state)
    elif isinstance(model_or_state, nnx.State):
        pure = nnx.to_pure_dict(nnx.filter_state(model_or_state, nnx.Param))
    else:
        pure = model_or_state
    out: dict[str, np.ndarray] = {}
    shared = _np(pure["embed"]["embedding"])
    for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        out[name] = shared
    out["lm_head.weight"] = shared if cfg.tie_embeddings else _np(pure["lm_head"]).T.copy()
    rel = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"

    def ffn(mlp: Mapping, prefix: str) -> None:
        for name in _ffn_names(cfg):
            out[f"{prefix}.DenseReluDense.{name}.weight"] = _np(mlp[name]).T.copy()

    for i, layer in enumerate(layers_of(pure["encoder"], cfg, "encoder")):
        p = f"encoder.block.{i}.layer"
        out[f"{p}.0.layer_norm.weight"] = _np(layer["pre_self_attention_norm"]["scale"])
        _attn_to_hf(layer["self_attention"], f"{p}.0.SelfAttention", cfg, out)
        out[f"{p}.1.layer_norm.weight"] = _np(layer["pre_mlp_norm"]["scale"])
        ffn(layer["mlp"], f"{p}.1")
    for i, layer in enumerate(layers_of(pure["decoder"], cfg, "decoder")):
        p = f"decoder.block.{i}.layer"
        out[f"{p}.0.layer_norm.weight"] = _np(layer["pre_self_attention_norm"]["scale"])
        _attn_to_hf(layer["self_attention"], f"{p}.0.SelfAttention", cfg, out)
        out[f"{p}.1.layer_norm.weight"] = _np(layer["pre_cross_attention_norm"]["scale"])
        _attn_to_hf(layer["cross_attention"], f"{p}.1.EncDecAttention", cfg, out)
        out[f"{p}.2.layer_norm.weight"] = _np(layer["pre_mlp_norm"]["scale"])
        ffn(layer["mlp"], f"{p}.2")
    for stack in ("encoder", "decoder"):
        out[f"{stack}.{rel}"] = _np(pure[stack]["relpos"]["embedding"])
        out[f"{stack}.final_layer_norm.weight"] = _np(pure[stack]["final_norm"]["scale"])
    return out
