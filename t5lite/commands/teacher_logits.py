"""`t5lite teacher-logits`: store a teacher's top-k logits of the training stream (offline KD).

    t5lite teacher-logits --gin_file=gin/demo.gin --gin_file=gin/runs/distill.gin \\
        --gin.TEACHER_MODEL_DIR=runs/teacher --output_dir=runs/teacher_logits --steps=500

Takes the same gin files as the `t5lite train` run that will read the logits (task, feature
lengths, seed, global batch, mesh), runs the teacher over the first --steps batches of that run's
stream and writes this host's top-k logits per step (see `t5lite.train.offline_teacher`).
Re-running continues after the last complete step. Train with
`--gin.TEACHER_LOGITS_DIR=<output_dir>` added to the same command line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from t5lite.commands import common
from t5lite.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = common.new_flags()
common.use_shared_flags(FLAGS, "gin_file", "module_import", "compilation_cache_dir")
flags.DEFINE_string("output_dir", None, "where the logits go (default: TEACHER_LOGITS_DIR)",
                    flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "how many training steps (global batches) to cover "
                     "(default: TRAIN_STEPS)", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 64, "logits kept per target position", flag_values=FLAGS)


def main(gin_bindings: Sequence[str]) -> None:
    if not FLAGS.gin_file:
        raise UserError("--gin_file is required (the training run's gin files, with "
                        "gin/runs/distill.gin).")
    from t5lite.commands.train import configure
    from t5lite.commands.task_setup import prepare_task
    from t5lite.data.registry import get_task_or_mixture, get_vocabulary
    from t5lite.parallel.mesh import make_mesh
    from t5lite.train.data_source import SeqioData
    from t5lite.train.offline_teacher import write_teacher_logits
    from t5lite.train.teacher import check_teacher_vocabulary

    cfg = configure(FLAGS.gin_file, gin_bindings)
    distill = cfg.train_config.distill
    if distill is None:
        raise UserError("no distillation configured: add --gin_file=gin/runs/distill.gin and "
                        "--gin.TEACHER_MODEL_DIR=...")
    output_dir = FLAGS.output_dir or distill.offline_logits_dir
    if not output_dir:
        raise UserError("--output_dir is required (or set TEACHER_LOGITS_DIR).")
    steps = FLAGS.steps or cfg.train_config.train_steps
    name = cfg.data_config.mixture_or_task_name
    prepare_task(name, FLAGS.module_import, cfg.data_config.task_feature_lengths,
                 init_from=cfg.train_config.init_from)
    get_task_or_mixture(name)
    vocab = get_vocabulary(name)
    check_teacher_vocabulary(distill.teacher_model_dir,
                             getattr(vocab, "sentencepiece_model_file", ""),
                             int(getattr(vocab, "extra_ids", 0)))
    stats = write_teacher_logits(distill, cfg.model_config, cfg.train_config,
                                 SeqioData(cfg.data_config), cfg.data_config,
                                 make_mesh(cfg.mesh_config), output_dir, steps, FLAGS.top_k)
    if stats["written"]:
        per_k = stats["bytes"] / stats["written"] * 1000
        print(f"teacher-logits: wrote steps {stats['first_step']}..{steps - 1} to {output_dir} "
              f"({stats['bytes'] / 1e6:.1f} MB this host, {per_k / 1e6:.1f} MB per 1k steps, "
              f"{stats['seconds']:.1f} s)")
    else:
        print(f"teacher-logits: {output_dir} already holds all {steps} steps")
