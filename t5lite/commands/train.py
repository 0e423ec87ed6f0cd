"""`t5lite train`: train a model from gin files into a model dir.

    t5lite train --gin_file=gin/models/t5_1_1/small.gin --gin_file=gin/runs/pretrain.gin \\
        --gin.MIXTURE_OR_TASK_NAME=demo_span_corruption --model_dir=runs/small

Gin configures `ModelConfig`, `MeshConfig`, `TrainConfig` (with `OptimizerConfig`,
`ScheduleConfig`, `LossConfig`) and `DataConfig` (its `host_batch_size` is replaced by this host's
share of the global `TrainConfig.batch_size`). Restarting the same command continues from the
newest checkpoint in `--model_dir`. SIGTERM/SIGINT save a checkpoint and exit 0.

Multi-host: pass `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the
T5LITE_* environment variables, or T5LITE_DISTRIBUTED=auto on TPU pods / SLURM) on every host.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from absl import flags

from t5lite.commands import common, gin_setup
from t5lite.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = common.new_flags()
common.use_shared_flags(FLAGS, "gin_file", "module_import", "model_dir",
                        "compilation_cache_dir", model_dir="written; re-run the command to resume")
flags.DEFINE_string("coordinator_address", None, "multi-host: HOST:PORT of process 0",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes", flag_values=FLAGS)
flags.DEFINE_integer("process_id", None, "multi-host: this process's index", flag_values=FLAGS)
flags.DEFINE_string("cpu_collectives", None, "multi-process CPU runs: 'gloo'", flag_values=FLAGS)


@dataclasses.dataclass
class TrainRun:
    """Everything the gin files configured for one training run."""

    model_config: object
    mesh_config: object
    train_config: object
    data_config: object


def configure(gin_files: Sequence[str], bindings: Sequence[str]) -> TrainRun:
    """Parse gin and build the configured dataclasses (UserError on bad input)."""
    gin_setup.parse_gin(gin_files, bindings)
    return TrainRun(model_config=gin_setup.build("ModelConfig"),
                    mesh_config=gin_setup.build("MeshConfig"),
                    train_config=gin_setup.build("TrainConfig"),
                    data_config=gin_setup.build("DataConfig"))


def run(gin_files: Sequence[str], bindings: Sequence[str], model_dir: str,
        module_imports: list[str], console: bool = True):
    """The whole command after distributed start-up; returns the TrainResult."""
    from t5lite.commands.task_setup import prepare_task
    from t5lite.data.registry import get_task_or_mixture, get_vocabulary
    from t5lite.model_dir import RunInfo
    from t5lite.parallel.mesh import make_mesh
    from t5lite.train.data_source import SeqioData
    from t5lite.train.loop import train

    if not gin_files:
        raise UserError("--gin_file is required, e.g. --gin_file=gin/demo.gin")
    cfg = configure(gin_files, bindings)
    name = cfg.data_config.mixture_or_task_name
    # task modules, and the task from files (text2text: TRAIN_FILES / FILE_TASKS, finetune.gin)
    prepare_task(name, module_imports, cfg.data_config.task_feature_lengths,
                 init_from=cfg.train_config.init_from)
    get_task_or_mixture(name)
    vocab = get_vocabulary(name)
    if vocab.vocab_size > cfg.model_config.vocab_size:
        raise UserError(f"the vocabulary of {name!r} has {vocab.vocab_size} ids (with extra "
                        f"ids) but ModelConfig.vocab_size={cfg.model_config.vocab_size}; set "
                        f"ModelConfig.vocab_size >= {vocab.vocab_size} (a multiple of 128 is "
                        "fastest).")
    from t5lite.train import preflight  # refuse bad input before the model dir is written

    preflight.check_data(cfg.data_config)
    data = SeqioData(cfg.data_config)
    if cfg.train_config.distill is not None:
        from t5lite.train.teacher import distillation_data

        data = distillation_data(cfg.train_config.distill, data, vocab, cfg.train_config)
    mesh = make_mesh(cfg.mesh_config)
    run_info = RunInfo(task=name,
                       vocabulary=getattr(vocab, "sentencepiece_model_file", ""),
                       task_feature_lengths=dict(cfg.data_config.task_feature_lengths),
                       extra_ids=int(getattr(vocab, "extra_ids", 0)),
                       feature_converter=cfg.data_config.feature_converter)
    from t5lite.inference_eval import make_predict_eval_fn  # decoding metrics (metric_fns)

    predict_eval_fn = make_predict_eval_fn(name, dict(cfg.data_config.task_feature_lengths),
                                           mesh=mesh, rules=cfg.train_config.partitioning)
    return train(cfg.model_config, cfg.train_config, mesh, data,
                 model_dir, run_info=run_info, operative_config=gin_setup.operative_config(),
                 console=console, predict_eval_fn=predict_eval_fn)


def main(gin_bindings: Sequence[str]) -> None:
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required (where checkpoints and metrics go).")
    logging.getLogger("t5lite").setLevel(logging.INFO)
    from t5lite.parallel.hosts import initialize_distributed

    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.cpu_collectives)
    result = run(FLAGS.gin_file, gin_bindings, FLAGS.model_dir, FLAGS.module_import)
    if result.preempted:
        sys.exit(0)
