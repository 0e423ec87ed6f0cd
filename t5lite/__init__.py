"""t5lite: pretrain T5-style encoder-decoder language models with JAX and Flax NNX."""

__version__ = "0.1.0"
