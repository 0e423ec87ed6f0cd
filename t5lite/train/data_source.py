"""The training loop's view of a SeqIO task: host-local train and validation batches.

`SeqioData` adapts `t5lite.data.pipeline.make_batch_stream` to the loop's `DataSource`
protocol. The loop tells it which shard this host reads and how many rows it feeds
(`DataShard`, derived from the mesh); the global `BATCH_SIZE` of the run file is split over the
hosts that read different data.

Example::

    >>> data = SeqioData(DataConfig("demo_span_corruption", {"inputs": 256, "targets": 64}))
    >>> stream = data.train_batches(DataShard(index=0, count=1, local_batch_size=32), 0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from t5lite.data.pipeline import DataConfig, make_batch_stream
from t5lite.parallel.hosts import DataShard


class SeqioData:
    """DataSource over a registered SeqIO task or mixture."""

    def __init__(self, config: DataConfig, eval_split: str | None = "validation",
                 eval_seed: int | None = 0):
        self.config = config
        self.feature_converter = config.feature_converter  # checked against the model by train
        self.eval_split = eval_split
        self.eval_seed = eval_seed

    def train_batches(self, shard: DataShard, start_batch: int) -> Iterator[dict[str, np.ndarray]]:
        cfg = dataclasses.replace(self.config, split="train",
                                  host_batch_size=shard.local_batch_size, num_epochs=None)
        return make_batch_stream(cfg, shard_index=shard.index, num_shards=shard.count,
                                 start_batch=start_batch)

    def resume_train_batches(self, shard: DataShard, position: int, state: dict[str, bytes]
                             ) -> Iterator[dict[str, np.ndarray]]:
        """The stream `train_batches(shard, 0)` would be after `position` batches, restored from
        its saved `state` (`BatchStream.save_state()`) instead of replayed."""
        cfg = dataclasses.replace(self.config, split="train",
                                  host_batch_size=shard.local_batch_size, num_epochs=None)
        return make_batch_stream(cfg, shard_index=shard.index, num_shards=shard.count,
                                 start_batch=position, state=state)

    def eval_batches(self, shard: DataShard) -> Iterable[dict[str, np.ndarray]] | None:
        if self.eval_split is None:
            return None
        cfg = dataclasses.replace(self.config, split=self.eval_split,
                                  host_batch_size=shard.local_batch_size, shuffle=False,
                                  num_epochs=1, seed=self.eval_seed)
        return make_batch_stream(cfg, shard_index=shard.index, num_shards=shard.count)
