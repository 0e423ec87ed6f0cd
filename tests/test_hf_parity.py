"""Parity with transformers' T5ForConditionalGeneration (PyTorch, CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from t5lite.config import ModelConfig  # noqa: E402
from t5lite.errors import ConfigError  # noqa: E402
from t5lite.export.hf_mapping import (config_from_hf, hf_config_from,  # noqa: E402
                                      hf_state_dict_to_params, params_to_hf_state_dict)
from t5lite.models import build_model, param_count  # noqa: E402
from t5lite.models.layout import load_params  # noqa: E402
from t5lite.models.positions import relative_position_bucket  # noqa: E402

VOCAB, D_MODEL = 96, 32


def make_hf(layout: str):
    """A small random HF T5: 'v1_1' (gated-gelu, untied) or 'original' (relu, tied, scaled).
    The encoder is deeper than the decoder (transformers' generate needs that, and it checks
    that depths are handled independently)."""
    torch.manual_seed(0 if layout == "v1_1" else 1)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=D_MODEL, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        dropout_rate=0.0, feed_forward_proj="gated-gelu" if layout == "v1_1" else "relu",
        tie_word_embeddings=(layout != "v1_1"), decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # layer norms start at 1: perturb everything
            p.mul_(1.0 + 0.3 * torch.randn_like(p))
        if layout == "v1_1":  # transformers 5 always ties at construction; untie as v1.1 is
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, D_MODEL) * 0.2)
    return model


def inputs():
    rng = np.random.default_rng(0)
    enc = rng.integers(2, VOCAB, size=(3, 24)).astype(np.int32)
    enc[0, 15:] = 0  # padded rows
    enc[2, 5:] = 0
    dec = rng.integers(2, VOCAB, size=(3, 10)).astype(np.int32)
    dec[:, 0] = 0
    return enc, dec


def hf_logits(model, enc, dec) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc, dtype=torch.long),
                    attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                    decoder_input_ids=torch.tensor(dec, dtype=torch.long))
    return out.logits.numpy()


@pytest.mark.parametrize("layout", ["v1_1", "original"])
def test_logits_match_transformers(layout):
    hf = make_hf(layout)
    enc, dec = inputs()
    expected = hf_logits(hf, enc, dec)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    hf_count = sum(p.numel() for p in hf.parameters())
    for scan in (True, False):
        cfg = config_from_hf(hf.config, scan_layers=scan)
        assert cfg.tie_embeddings == (layout == "original")
        assert param_count(cfg) == hf_count
        model = build_model(cfg, rngs=nnx.Rngs(params=1))
        load_params(model, hf_state_dict_to_params(state, cfg))
        logits, aux = model(jnp.asarray(enc), jnp.asarray(dec))
        # README: "within 1e-4" (absolute, on every logit)
        np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
        assert float(aux["moe_aux_loss"]) == 0.0
        # and back: the exported state dict is the one we imported
        exported = params_to_hf_state_dict(model, cfg)
        assert set(exported) == set(state)
        for name, value in state.items():
            np.testing.assert_allclose(exported[name], value, rtol=0, atol=0, err_msg=name)


def test_export_roundtrip_through_transformers():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, num_heads=4, head_dim=8, d_ff=48,
                      num_encoder_layers=2, num_decoder_layers=1, relative_num_buckets=8,
                      relative_max_distance=20)
    model = build_model(cfg, rngs=nnx.Rngs(params=3))
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config_from(cfg)))
    hf.lm_head.weight = torch.nn.Parameter(torch.zeros(VOCAB, D_MODEL))  # untie (v1.1)
    hf.load_state_dict({k: torch.tensor(v) for k, v in params_to_hf_state_dict(model, cfg).items()})
    hf.eval()
    enc, dec = inputs()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(enc), jnp.asarray(dec))[0]),
                               hf_logits(hf, enc, dec), atol=1e-4, rtol=0)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-400, 400)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            expected = T5Attention._relative_position_bucket(
                torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets,
                max_distance=distance).numpy()
            np.testing.assert_array_equal(
                relative_position_bucket(rel, bidirectional, buckets, distance), expected)
            np.testing.assert_array_equal(np.asarray(relative_position_bucket(
                jnp.asarray(rel), bidirectional, buckets, distance)), expected)


@pytest.mark.parametrize("size, published", [("small", 76_961_152), ("base", 247_577_856)])
def test_published_t5_v1_1_sizes(size, published):
    dims = {"small": dict(d_model=512, d_ff=1024, num_heads=6, num_encoder_layers=8,
                          num_decoder_layers=8),
            "base": dict(d_model=768, d_ff=2048, num_heads=12, num_encoder_layers=12,
                         num_decoder_layers=12)}[size]
    cfg = ModelConfig(**dims)
    assert param_count(cfg) == published
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config_from(cfg)))
    tied_count = sum(p.numel() for p in hf.parameters())
    assert tied_count + cfg.vocab_size * cfg.d_model == published  # + the untied lm_head


def test_unexportable_configs_are_refused():
    for changes in (dict(num_kv_heads=2), dict(position_scheme="rope"), dict(num_experts=2),
                    dict(gated=False, activation="gelu")):
        cfg = ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, num_heads=4, head_dim=8, d_ff=48,
                          num_encoder_layers=1, num_decoder_layers=1, **changes)
        with pytest.raises(ConfigError, match="cannot be exported"):
            hf_config_from(cfg)
    with pytest.raises(ConfigError, match="feed_forward_proj='gelu'"):
        config_from_hf({"feed_forward_proj": "gelu", "num_layers": 1})
