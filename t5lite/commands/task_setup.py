"""What every verb that resolves a task name does first: import the task modules, and register
the task from files that the gin files describe.

`MIXTURE_OR_TASK_NAME=text2text` names no task of a module: the task -- or, with FILE_TASKS,
the mixture of several file tasks -- is built from gin's `Text2TextConfig` (TRAIN_FILES,
VALIDATION_FILES, TASK_PREFIX, METRICS, FILE_TASKS, and VOCABULARY or INIT_FROM's vocabulary;
bound by gin/runs/finetune.gin). `t5lite train` and `t5lite teacher-logits` register it for
their MIXTURE_OR_TASK_NAME; `t5lite eval`, `t5lite infer --task_examples` and `t5lite data`
for the task they resolve (a model dir's run_info.json records "text2text"), so given the
training run's gin files and `--gin.NAME=VALUE` flags they find the same task::

    t5lite train --gin_file=gin/models/demo.gin --gin_file=gin/runs/finetune.gin \\
        --gin.INIT_FROM=runs/demo --gin.MIXTURE_OR_TASK_NAME=text2text \\
        --gin.TRAIN_FILES=train.tsv --gin.VALIDATION_FILES=dev.tsv --model_dir=runs/ft
    t5lite eval --model_dir=runs/ft <the same --gin_file and --gin flags>
    t5lite infer --model_dir=runs/ft --task_examples=5 <the same --gin_file and --gin flags>

Call it after `gin_setup.parse_gin`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from t5lite.commands import gin_setup
from t5lite.errors import UserError


def prepare_task(name: str | None, module_imports: Sequence[str],
                 task_feature_lengths: Mapping[str, int] | None = None,
                 init_from: str | None = None) -> None:
    """Import `module_imports`; when `name` is "text2text", register its file task(s) from
    gin's Text2TextConfig (UserError, before anything is written, on a bad config or file).

    `task_feature_lengths` become the task's default sequence lengths (`t5lite data`);
    `init_from` (TrainConfig's, in train) is used when Text2TextConfig.init_from is unset."""
    from t5lite.data.registry import import_task_modules
    from t5lite.data.text2text import TASK_NAME, register_from_config

    import_task_modules(list(module_imports))
    if name != TASK_NAME:
        return
    config = gin_setup.build("Text2TextConfig")
    if config.train_files is None and not config.tasks:
        raise UserError(f"the task {TASK_NAME!r} is read from files named in gin: give "
                        "TRAIN_FILES and VALIDATION_FILES (or FILE_TASKS), e.g. "
                        "--gin_file=gin/runs/finetune.gin --gin.TRAIN_FILES=data/train.tsv "
                        "--gin.VALIDATION_FILES=data/dev.tsv (for eval, infer and data: the "
                        "training run's --gin_file and --gin flags).")
    lengths = dict(task_feature_lengths) if task_feature_lengths else None
    register_from_config(config, init_from or None, default_sequence_length=lengths)
