"""t5lite: pretrain T5-style encoder-decoder language models with JAX and Flax NNX."""

__version__ = "0.1.0"

from t5lite._platforms import keep_jax_off_absent_tpus as _keep_jax_off_absent_tpus  # noqa: E402

_keep_jax_off_absent_tpus()
