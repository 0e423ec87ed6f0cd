"""Shared pieces of the trainer tests: a tiny model config and a synthetic data source.

The synthetic source is a copy task (targets = the first tokens of the inputs) whose global batch
`i` depends only on (seed, i): a host takes its own rows of that global batch, so any split of
the batch over hosts sees exactly the same data — what the multi-host equality test needs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from t5lite.config import ModelConfig
from t5lite.parallel.hosts import DataShard

VOCAB = 64
INPUT_LEN = 12
TARGET_LEN = 8


def tiny_model_config(**changes) -> ModelConfig:
    values = dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_encoder_layers=2,
                  num_decoder_layers=2, vocab_size=VOCAB, relative_num_buckets=8,
                  relative_max_distance=16)
    values.update(changes)
    return ModelConfig(**values)


def global_batch(index: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, index])
    inputs = rng.integers(3, VOCAB, (batch_size, INPUT_LEN)).astype(np.int32)
    targets = inputs[:, :TARGET_LEN].copy()
    targets[:, -1] = 1  # EOS
    dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1)
    weights = np.ones((batch_size, TARGET_LEN), np.int32)
    return {"encoder_input_tokens": inputs, "decoder_input_tokens": dec_in,
            "decoder_target_tokens": targets, "decoder_loss_weights": weights}


class SyntheticData:
    """DataSource for `t5lite.train.loop.train`: infinite train stream, finite eval split."""

    def __init__(self, batch_size: int, seed: int = 0, eval_batches: int = 2,
                 nan_from_batch: int | None = None):
        self.batch_size = batch_size
        self.seed = seed
        self.num_eval = eval_batches
        self.nan_from_batch = nan_from_batch  # not used by tokens; see poison()
        self.started_at: list[int] = []

    def _local(self, batch: dict[str, np.ndarray], shard: DataShard) -> dict[str, np.ndarray]:
        lo = shard.index * shard.local_batch_size
        return {k: v[lo:lo + shard.local_batch_size] for k, v in batch.items()}

    def train_batches(self, shard: DataShard, start_batch: int) -> Iterator[dict]:
        self.started_at.append(start_batch)
        i = start_batch
        while True:
            yield self._local(global_batch(i, self.batch_size, self.seed), shard)
            i += 1

    def eval_batches(self, shard: DataShard):
        return [self._local(global_batch(10_000 + i, self.batch_size, self.seed + 1), shard)
                for i in range(self.num_eval)]


# ---------------------------------------------------------------- subprocess scenarios
N_STEPS = 3  # resume tests: N steps, kill, resume to 2N


def resume_config(train_steps: int):
    """(TrainConfig, ModelConfig) of the resume / preemption tests: dropout on, so the RNG
    stream has to resume exactly too."""
    from t5lite.train.config import TrainConfig
    from t5lite.train.optim import OptimizerConfig
    from t5lite.train.schedules import ScheduleConfig

    tc = TrainConfig(train_steps=train_steps, batch_size=8, checkpoint_period=N_STEPS,
                     eval_period=None, log_period=1, keep_checkpoints=None,
                     optimizer=OptimizerConfig(schedule=ScheduleConfig(
                         name="rsqrt", base_learning_rate=1.0, warmup_steps=2)))
    return tc, tiny_model_config(dropout_rate=0.1, num_encoder_layers=1, num_decoder_layers=1)


def multihost_config():
    from t5lite.train.config import TrainConfig
    from t5lite.train.optim import OptimizerConfig
    from t5lite.train.schedules import ScheduleConfig

    tc = TrainConfig(train_steps=3, batch_size=8, checkpoint_period=3, eval_period=None,
                     log_period=1, optimizer=OptimizerConfig(
                         name="adamw", schedule=ScheduleConfig(name="constant",
                                                               base_learning_rate=1e-2,
                                                               warmup_steps=0)))
    return tc, tiny_model_config(num_encoder_layers=1, num_decoder_layers=1)


def run_multihost_steps(model_dir: str):
    """Train the multi-host scenario into `model_dir` on all (global) devices."""
    from t5lite.parallel.mesh import MeshConfig, make_mesh
    from t5lite.train.loop import train

    tc, mc = multihost_config()
    return train(mc, tc, make_mesh(MeshConfig(data=-1)), SyntheticData(tc.batch_size),
                 model_dir, console=False)
