"""`TrainConfig`: the settings of a training run (bound from gin at the command line).

The gin run files set these through T5X's macro names: `TRAIN_STEPS` -> `train_steps`,
`BATCH_SIZE` -> `batch_size` (the **global** batch, over all hosts), `EVAL_PERIOD`,
`CHECKPOINT_PERIOD`; see gin/runs/pretrain.gin.

Example::

    >>> TrainConfig(train_steps=1000, batch_size=32, eval_period=200, checkpoint_period=500)
"""

from __future__ import annotations

import dataclasses

from t5lite.errors import ConfigError
from t5lite.parallel.rules import RECIPES
from t5lite.train.distill import DistillConfig
from t5lite.train.losses import LossConfig
from t5lite.train.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the training loop does, how often, and with which optimiser and loss."""

    train_steps: int = 10_000  # train until this step (a resumed run continues up to it)
    batch_size: int = 128  # global batch size in sequences (split over hosts and devices)
    eval_period: int | None = 1000  # teacher-forced eval every N steps (None: only at the end)
    eval_steps: int | None = None  # eval batches per evaluation (None: the whole split)
    checkpoint_period: int = 1000
    keep_checkpoints: int | None = 3  # newest N checkpoints kept (None: all)
    log_period: int = 100  # train metrics are averaged and written every N steps
    microbatches: int = 1  # gradient accumulation: split each batch into N microbatches
    seed: int = 0  # parameter init and dropout
    init_from: str | None = None  # model dir / checkpoint dir to take *parameters* from
    partitioning: str = "dp"  # sharding recipe: dp | fsdp | tp | dp_tp | fsdp_tp
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    async_checkpointing: bool = True
    cache_eval_batches: bool = True  # keep the eval_steps validation batches in host memory
    distill: DistillConfig | None = None  # knowledge distillation (gin/runs/distill.gin)
    # fine-tuning: regexes (re.search) over dotted parameter names as in model-info.txt, e.g.
    # ("^encoder\\.",) or ("^embed\\.", "^lm_head"); matches are not trained and get no
    # optimiser state (t5lite.train.optim.make_optimizer)
    freeze: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"TrainConfig: {msg}")

        for name in ("train_steps", "batch_size", "checkpoint_period", "log_period",
                     "microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name}={value!r} must be a positive integer.")
        for name in ("eval_period", "eval_steps", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                fail(f"{name}={value!r} must be a positive integer or None.")
        if self.batch_size % self.microbatches != 0:
            fail(f"batch_size={self.batch_size} is not divisible by microbatches="
                 f"{self.microbatches}.")
        if self.partitioning not in RECIPES:
            fail(f"partitioning={self.partitioning!r} is unknown; use one of {sorted(RECIPES)}.")
        if not isinstance(self.optimizer, OptimizerConfig):
            fail("optimizer must be an OptimizerConfig.")
        if not isinstance(self.loss, LossConfig):
            fail("loss must be a LossConfig.")
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            fail("distill must be a DistillConfig or None.")
        if self.distill is not None and self.loss.vocab_chunk > 0:
            fail(f"loss.vocab_chunk={self.loss.vocab_chunk} with distillation: the "
                 "distillation loss needs the student's full logits; set "
                 "LossConfig.vocab_chunk = 0.")
        freeze = (self.freeze,) if isinstance(self.freeze, str) else tuple(self.freeze or ())
        if not all(isinstance(f, str) and f for f in freeze):
            fail(f"freeze={self.freeze!r} must be a list of non-empty regular expressions.")
        object.__setattr__(self, "freeze", freeze)
