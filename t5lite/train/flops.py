"""Model FLOPs per training step and device peaks, for MFU.

Counts matmul FLOPs only (2 per multiply-add), the convention of the PaLM/MFU literature:
softmax, norms and activations are left out; attention score and value matmuls over the whole
(unmasked) length are included; training costs 3x the forward pass (forward + 2x backward).
Padding counts: MFU measures what the hardware did on the shapes it was given.

Per token of a layer with d = d_model, h = heads, k = kv heads, e = head_dim, f = d_ff:

- attention projections: 2*d*e*(2h + 2k)     (q and o: h heads; k and v: kv heads)
- attention scores + values: 2 * 2*h*e * L_kv  (L_kv = length attended to)
- feed-forward: 2*d*f * (3 if gated else 2)  (MoE layers: x top_k, plus router 2*d*E)

Encoder-decoder forward = encoder layers x input length
  + decoder layers x target length x (self-attention + cross-attention q/o + FFN)
  + decoder layers x input length x cross-attention k/v projections (computed once per input)
  + 2*d*V per target token (logits).

    >>> cfg = ModelConfig()            # T5 v1.1 small
    >>> f = train_flops_per_step(cfg, batch_size=128, input_length=512, target_length=114)
"""

from __future__ import annotations

import jax

from t5lite.config import ModelConfig

# Dense bf16 peak FLOP/s per device (one chip; for TPU v2/v3 one chip = 2 cores).
PEAK_FLOPS: dict[str, float] = {
    "tpu v2": 45e12,
    "tpu v3": 123e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "h100": 989e12,
    "h200": 989e12,
    "h800": 989e12,
    "a100": 312e12,
}


def _ffn_flops(cfg: ModelConfig, moe: bool) -> float:
    per = 2 * cfg.d_model * cfg.d_ff * (3 if cfg.gated else 2)
    if moe:
        return per * cfg.experts_top_k + 2 * cfg.d_model * cfg.num_experts
    return per


def _attention_proj_flops(cfg: ModelConfig) -> float:
    return 2 * cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.kv_heads)


def _attention_core_flops(cfg: ModelConfig, kv_length: int) -> float:
    return 2 * 2 * cfg.num_heads * cfg.head_dim * kv_length


def forward_flops_per_example(cfg: ModelConfig, input_length: int, target_length: int) -> float:
    """Forward-pass matmul FLOPs of one example (encoder-decoder or decoder-only)."""
    total = 0.0
    if cfg.architecture == "encoder_decoder":
        for i in range(cfg.num_encoder_layers):
            per_token = (_attention_proj_flops(cfg) + _attention_core_flops(cfg, input_length)
                         + _ffn_flops(cfg, cfg.is_moe_layer("encoder", i)))
            total += per_token * input_length
        q_o = 2 * cfg.d_model * cfg.head_dim * 2 * cfg.num_heads
        k_v = 2 * cfg.d_model * cfg.head_dim * 2 * cfg.kv_heads
        for i in range(cfg.num_decoder_layers):
            per_token = (_attention_proj_flops(cfg) + _attention_core_flops(cfg, target_length)
                         + q_o + _attention_core_flops(cfg, input_length)
                         + _ffn_flops(cfg, cfg.is_moe_layer("decoder", i)))
            total += per_token * target_length + k_v * input_length
        total += 2 * cfg.d_model * cfg.vocab_size * target_length
    else:
        length = input_length + target_length if input_length else target_length
        for i in range(cfg.num_decoder_layers):
            per_token = (_attention_proj_flops(cfg) + _attention_core_flops(cfg, length)
                         + _ffn_flops(cfg, cfg.is_moe_layer("decoder", i)))
            total += per_token * length
        total += 2 * cfg.d_model * cfg.vocab_size * length
    return total


def train_flops_per_step(cfg: ModelConfig, batch_size: int, input_length: int,
                         target_length: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward) on the global batch.

    For decoder-only models pass the total length as `target_length` and `input_length=0`.
    """
    return 3.0 * batch_size * forward_flops_per_example(cfg, input_length, target_length)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device` (default: the first device), or None when unknown
    (CPUs: no MFU is reported)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS[name]
    return None
