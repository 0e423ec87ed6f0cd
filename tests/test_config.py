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
    (dict(attention_impl="cudnn"), "attention_impl='cudnn' needs bfloat16 compute"),
])
def test_invalid_configs_raise_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)


def test_scanned_moe_groups_must_divide_depth():
    with pytest.raises(ConfigError, match="not a multiple of moe_layer_period"):
        ModelConfig(num_experts=4, moe_layer_period=3, num_encoder_layers=8)
    ModelConfig(num_experts=4, moe_layer_period=3, num_encoder_layers=8, num_decoder_layers=9,
                scan_layers=False)  # unrolled stacks take any pattern


@pytest.mark.parametrize("preset, total", [
    ("t5_1_1/small", 76_961_152), ("t5_1_1/base", 247_577_856),
    ("t5_1_1/large", 783_150_080), ("t5_1_1/xl", 2_849_757_184),
    ("t5_1_1/xxl", 11_135_332_352),
])
def test_t5_1_1_presets_have_published_sizes(preset, total, repo_root):
    import os

    from t5lite.commands import gin_setup
    from t5lite.models import param_count

    gin_setup.parse_gin([os.path.join(repo_root, "gin", "models", preset + ".gin")], [])
    assert param_count(gin_setup.build("ModelConfig")) == total


@pytest.mark.parametrize("preset", ["t5_1_1/tiny", "modern/small", "modern/base", "modern/large",
                                    "moe/base"])
def test_info_command_prints_model_info(preset, repo_root, capsys):
    import os
    import re

    from t5lite import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["t5lite", "info",
                  f"--gin_file={os.path.join(repo_root, 'gin/models', preset)}.gin"])
    assert not exit_info.value.code
    out = capsys.readouterr().out
    assert "total parameters:" in out and "('layers', 'embed', " in out
    share = float(re.search(r"encoder share of non-embedding parameters: ([\d.]+)%", out)[1])
    if preset.startswith(("modern", "moe")):  # the seed's 2/3 encoder rule
        assert 62.0 <= share <= 70.0


def test_feature_converter_must_match_the_architecture():
    from t5lite.config import check_feature_converter

    check_feature_converter("encoder_decoder", "enc_dec")
    check_feature_converter("decoder_only", "prefix_lm")
    with pytest.raises(ConfigError, match="set DataConfig.feature_converter='enc_dec'"):
        check_feature_converter("encoder_decoder", "prefix_lm")
    with pytest.raises(ConfigError, match="set DataConfig.feature_converter='prefix_lm'"):
        check_feature_converter("decoder_only", "enc_dec")
