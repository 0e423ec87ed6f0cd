"""Batches for training and evaluation: task -> feature converter -> fixed-shape NumPy batches.

Example::

    config = DataConfig("demo_span_corruption", {"inputs": 512, "targets": 114}, host_batch_size=8)
    stream = make_batch_stream(config, shard_index=jax.process_index(),
                               num_shards=jax.process_count())
    batch = next(stream)       # {"encoder_input_tokens": int32[8, 512], ...}
    stream.batches_consumed    # 1 -> checkpoint this; make_batch_stream(..., start_batch=1)
                               #      continues with exactly the batch a fresh stream yields 2nd
    files = stream.save_state()  # or this: make_batch_stream(..., start_batch=1, state=files)
                                 # continues there without replaying (t5lite.data.iterator_state)

Determinism: with `seed` set, a stream is a pure function of (config, shard_index, num_shards).
`start_batch=k` alone rebuilds the stream and skips k batches inside tf.data (the skipped
batches are still computed, at pipeline speed, but never leave tf.data); with the `state` saved
at batch k it restores the iterator instead, in seconds whatever k is. Hosts read disjoint shards
(`seqio.ShardInfo`); when the task's source shards before it shuffles, each host also gets its
own seed for the random corruption, so hosts do not repeat one another's noise masks.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np

from t5lite.data.iterator_state import exact_resume_options, restore_iterator, save_iterator
from t5lite.errors import ConfigError

if TYPE_CHECKING:  # imported lazily at run time: TensorFlow only where data is built
    import seqio
    import tensorflow as tf

# seqio and TensorFlow (~10 s to import) are imported inside the functions that build data, so
# `DataConfig` (registered with gin by every verb, e.g. `t5lite info`) costs nothing.

FEATURE_CONVERTERS = ("enc_dec", "prefix_lm")
# SeqIO hands out per-preprocessor seeds from a process-global counter while a dataset is built;
# building two streams at once from two threads would interleave it and break determinism.
_BUILD_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read. `host_batch_size` is the rows of this host's batches (the global batch
    size, `TrainConfig.batch_size` / `EvalConfig.batch_size`, divided among the hosts).
    `num_epochs=None` repeats forever (training); evaluation uses split="validation",
    shuffle=False, num_epochs=1 and gets a finite stream whose last batch is padded with
    all-zero rows (zero loss weight)."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    host_batch_size: int = 8
    shuffle: bool = True
    seed: int | None = 0
    pack: bool = True
    feature_converter: str = "enc_dec"
    use_cached: bool = False
    num_epochs: int | None = None
    shuffle_buffer_size: int | None = None  # examples; None: the task's own (1000 for ours)

    def __post_init__(self) -> None:
        if not self.mixture_or_task_name:
            raise ConfigError("DataConfig.mixture_or_task_name is empty")
        lengths = dict(self.task_feature_lengths or {})
        if not lengths or any(not isinstance(v, (int, np.integer)) or v <= 0
                              for v in lengths.values()):
            raise ConfigError("DataConfig.task_feature_lengths must map feature names to positive "
                              f"ints, e.g. {{'inputs': 512, 'targets': 114}}; got {lengths}")
        missing = {"inputs", "targets"} - set(lengths)
        if missing:
            raise ConfigError(f"DataConfig.task_feature_lengths lacks {sorted(missing)}; "
                              f"got {lengths}")
        object.__setattr__(self, "task_feature_lengths",
                           {k: int(v) for k, v in lengths.items()})
        if self.host_batch_size <= 0:
            raise ConfigError("DataConfig.host_batch_size must be positive, got "
                              f"{self.host_batch_size}")
        if self.feature_converter not in FEATURE_CONVERTERS:
            raise ConfigError(f"DataConfig.feature_converter must be one of {FEATURE_CONVERTERS}, "
                              f"got {self.feature_converter!r}")
        if self.shuffle_buffer_size is not None and self.shuffle_buffer_size <= 0:
            raise ConfigError("DataConfig.shuffle_buffer_size must be positive or None, got "
                              f"{self.shuffle_buffer_size}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ConfigError(f"DataConfig.num_epochs must be positive or None, got "
                              f"{self.num_epochs}")

    @property
    def finite(self) -> bool:
        return self.num_epochs is not None


def make_feature_converter(name: str, pack: bool) -> seqio.FeatureConverter:
    import seqio

    if name == "enc_dec":
        return seqio.EncDecFeatureConverter(pack=pack)
    if name == "prefix_lm":
        return seqio.PrefixLMFeatureConverter(pack=pack)
    raise ConfigError(f"unknown feature converter {name!r}; use one of {FEATURE_CONVERTERS}")


def model_feature_lengths(config: DataConfig) -> dict[str, int]:
    """Lengths of the converted features, e.g. {"encoder_input_tokens": 512, ...}."""
    converter = make_feature_converter(config.feature_converter, config.pack)
    return dict(converter.get_model_feature_lengths(config.task_feature_lengths))


def _tasks_of(provider) -> list[seqio.Task]:
    import seqio

    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def _shards_before_shuffling(provider, split: str, num_shards: int) -> bool:
    """True when every source splits the data between hosts before any seeded shuffle, so the
    hosts may use different seeds and still read disjoint data."""
    for task in _tasks_of(provider):
        source = task.source
        if source.supports_arbitrary_sharding:
            continue
        try:
            if len(source.list_shards(split)) >= num_shards:
                continue
        except Exception:  # a source that cannot list its shards: be conservative
            pass
        return False
    return True


def shard_seed(seed: int | None, shard_index: int, num_shards: int) -> int | None:
    """The seed host `shard_index` uses: `seed` itself on a single host."""
    if seed is None or num_shards == 1:
        return seed
    state = np.random.SeedSequence([int(seed), int(shard_index), int(num_shards)])
    return int(state.generate_state(1)[0] & 0x7FFFFFFF)


def build_dataset(config: DataConfig, *, shard_index: int = 0, num_shards: int = 1,
                  start_batch: int = 0) -> tf.data.Dataset:
    """The batched `tf.data.Dataset` behind `make_batch_stream`."""
    import seqio
    import tensorflow as tf

    from t5lite.data.registry import get_task_or_mixture

    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    if start_batch < 0:
        raise ConfigError(f"start_batch must be >= 0, got {start_batch}")
    provider = get_task_or_mixture(config.mixture_or_task_name)
    if config.split not in provider.splits:
        raise ConfigError(f"task {config.mixture_or_task_name!r} has no split {config.split!r}; "
                          f"it has {sorted(provider.splits)}")
    seed = config.seed
    if num_shards > 1 and _shards_before_shuffling(provider, config.split, num_shards):
        seed = shard_seed(config.seed, shard_index, num_shards)
    shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
    extra = {}
    if config.shuffle_buffer_size is not None:
        if isinstance(provider, seqio.Mixture):
            raise ConfigError("DataConfig.shuffle_buffer_size applies to a task, not to mixture "
                              f"{config.mixture_or_task_name!r}; leave it None")
        extra["shuffle_buffer_size"] = config.shuffle_buffer_size
    with _BUILD_LOCK:
        ds = provider.get_dataset(
            sequence_length=config.task_feature_lengths, split=config.split,
            use_cached=config.use_cached, shuffle=config.shuffle, seed=seed,
            shard_info=shard_info, num_epochs=config.num_epochs, **extra)
    converter = make_feature_converter(config.feature_converter, config.pack)
    ds = converter(ds, config.task_feature_lengths)
    if config.finite:
        ds = ds.batch(config.host_batch_size, drop_remainder=False)
        ds = ds.map(_pad_rows(config.host_batch_size), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.batch(config.host_batch_size, drop_remainder=True)
    ds = ds.map(lambda b: {k: tf.cast(v, tf.int32) for k, v in b.items()},
                num_parallel_calls=tf.data.AUTOTUNE)
    if start_batch:
        ds = ds.skip(start_batch)
    return exact_resume_options(ds.prefetch(tf.data.AUTOTUNE))


def _pad_rows(batch_size: int):
    import tensorflow as tf

    def pad(batch):
        out = {}
        for key, value in batch.items():
            missing = batch_size - tf.shape(value)[0]
            paddings = tf.concat([[[0, missing]], tf.zeros([tf.rank(value) - 1, 2], tf.int32)], 0)
            out[key] = tf.pad(value, paddings)
        return out

    return pad


class BatchStream(Iterator[dict[str, np.ndarray]]):
    """An iterator of fixed-shape int32 NumPy batches that knows its position."""

    def __init__(self, dataset: tf.data.Dataset, start_batch: int,
                 state: dict[str, bytes] | None = None) -> None:
        self._dataset = dataset
        self._iterator = iter(dataset)
        if state is not None:
            restore_iterator(self._iterator, state)
        self._consumed = start_batch

    def save_state(self) -> dict[str, bytes]:
        """The exact position of this stream (tf.data iterator state, shuffle buffers included):
        pass it back with `start_batch=batches_consumed` to continue without replaying."""
        return save_iterator(self._iterator)

    @property
    def batches_consumed(self) -> int:
        """Batches handed out so far, counting the `start_batch` skipped ones: the position to
        checkpoint and pass back as `start_batch`."""
        return self._consumed

    @property
    def element_spec(self):
        return self._dataset.element_spec

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._consumed += 1
        return {k: v.numpy() for k, v in batch.items()}


def make_batch_stream(config: DataConfig, *, shard_index: int = 0, num_shards: int = 1,
                      start_batch: int = 0, state: dict[str, bytes] | None = None
                      ) -> BatchStream:
    """Batches of this host's shard, from batch `start_batch` on (see module docstring); with
    `state` (from `save_state()` at batch `start_batch`) by restoring instead of replaying."""
    dataset = build_dataset(config, shard_index=shard_index, num_shards=num_shards,
                            start_batch=0 if state is not None else start_batch)
    return BatchStream(dataset, start_batch, state)
