"""t5lite.models: the encoder-decoder and decoder-only transformers.

    >>> from t5lite.models import build_model, model_info
    >>> model = build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
"""

from __future__ import annotations

from flax import nnx

from t5lite.config import ModelConfig
from t5lite.models.decoder_only import DecoderOnly
from t5lite.models.encoder_decoder import EncoderDecoder
from t5lite.models.info import abstract_model, model_info, param_count, param_logical_axes


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> EncoderDecoder | DecoderOnly:
    """EncoderDecoder or DecoderOnly according to `cfg.architecture`."""
    if cfg.architecture == "decoder_only":
        return DecoderOnly(cfg, rngs=rngs)
    return EncoderDecoder(cfg, rngs=rngs)


__all__ = ["DecoderOnly", "EncoderDecoder", "abstract_model", "build_model", "model_info",
           "param_count", "param_logical_axes"]
