"""ModelConfig validation: every invalid combination names the field to change."""

from __future__ import annotations

import pytest

from t5lite.config import ModelConfig
from t5lite.errors import ConfigError


def test_defaults_are_t5_v1_1_small():
    cfg = ModelConfig()
    assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.head_dim) == (512, 1024, 6, 64)
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (8, 8)
    assert cfg.gated and cfg.activation == "gelu" and not cfg.tie_embeddings
    assert cfg.kv_heads == 6


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=6, num_kv_heads=4), "not divisible by num_kv_heads"),
    (dict(activation="swish"), "activation='swish' is unknown"),
    (dict(position_scheme="rope", head_dim=63), "head_dim=63 is odd"),
    (dict(position_scheme="alibi"), "position_scheme='alibi' is unknown"),
    (dict(num_experts=4, experts_top_k=5), "experts_top_k=5"),
    (dict(dtype="float16"), "overflows"),
    (dict(num_decoder_layers=0), "at least one decoder layer"),
    (dict(architecture="decoder_only"), "set num_encoder_layers=0"),
    (dict(d_model=0), "d_model=0 must be a positive integer"),
    (dict(remat_policy="some"), "remat_policy='some' is unknown"),
])
def test_invalid_configs_raise_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)
