"""benchmarks/encdec_vs_deconly.py: matched configurations and per-request FLOPs (no timing)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from encdec_vs_deconly import configs, param_count, request_flops  # noqa: E402

from t5lite.config import ModelConfig  # noqa: E402


def test_matched_configs():
    c = configs("demo")
    ed, dp, df = c["encdec"], c["deconly_param"], c["deconly_flops"]
    assert abs(param_count(dp) - param_count(ed)) / param_count(ed) < 0.05
    assert df.num_decoder_layers == ed.num_encoder_layers
    emb = 2 * ed.vocab_size * ed.d_model
    # the report's "an encoder-decoder has ~2x the parameters of a compute-matched
    # decoder-only model" (without the embeddings)
    assert 1.8 < (param_count(ed) - emb) / (param_count(df) - emb) < 2.6


def test_request_flops_by_hand():
    cfg = ModelConfig(vocab_size=10, d_model=4, num_heads=1, head_dim=2, d_ff=8, gated=False,
                      num_encoder_layers=1, num_decoder_layers=1)
    # encoder: 1 layer x 3 tokens x (proj 2*4*2*4=64 + core 4*2*3=24 + ffn 2*4*8*2=128)
    enc = 3 * (64 + 24 + 128)
    cross_kv = 3 * (2 * 4 * 2 * 2)
    dec = (64 + 4 * 2 * 1 + 2 * 4 * 2 * 2 + 4 * 2 * 3 + 128) + 2 * 4 * 10
    assert request_flops(cfg, 3, 1) == pytest.approx(enc + cross_kv + dec)
    do = cfg.replace(architecture="decoder_only", num_encoder_layers=0)
    # prefill of 4 positions (start token + 3 inputs), logits of the last one
    assert request_flops(do, 3, 1) == pytest.approx(4 * (64 + 4 * 2 * 4 + 128) + 2 * 4 * 10)
