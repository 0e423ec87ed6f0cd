"""t5lite: pretrain T5-style encoder-decoder language models with JAX and Flax NNX."""

__version__ = "0.1.0"

from t5lite.host_malloc import reexec_if_t5lite_command as _reexec_if_t5lite_command  # noqa: E402

_reexec_if_t5lite_command()  # the `t5lite` command: choose the allocator before JAX is imported

from t5lite._platforms import keep_jax_off_absent_tpus as _keep_jax_off_absent_tpus  # noqa: E402

_keep_jax_off_absent_tpus()
