"""`t5lite data`: show what the model will see for a SeqIO task, before packing.

Example::

    t5lite data --task=demo_ul2 --num=3
    t5lite data --task=demo_span_corruption --sequence_length=inputs:512,targets:114 --format=json
    t5lite data --task=text2text --gin_file=gin/runs/finetune.gin --gin.INIT_FROM=runs/demo \\
        --gin.TRAIN_FILES=train.tsv --gin.VALIDATION_FILES=dev.tsv   # a task from files

Text format prints the decoded inputs and targets with sentinels (`<extra_id_0>`, ...) and
paradigm tokens visible. JSON format (a contract) prints one object per line:
{"inputs": [ids, EOS included], "targets": [...], "inputs_pretty": str, "targets_pretty": str}.
Without --sequence_length the task's registered default lengths are used. From Python:
`t5lite.data.preview.preview_examples`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags

from t5lite.commands import common
from t5lite.errors import UserError

FLAGS = common.new_flags()
common.use_shared_flags(FLAGS, "module_import", "seed", "format", "gin_file",
                        seed="same seed, same examples")
# --gin_file (with --gin.NAME=VALUE): for --task=text2text, the gin files and flags of the
# training run, which name the files (TRAIN_FILES, ... or FILE_TASKS; see finetune.gin).
flags.DEFINE_string("task", None, "registered SeqIO task or mixture name, e.g. demo_ul2",
                    flag_values=FLAGS)
flags.DEFINE_string("split", "train", "dataset split", flag_values=FLAGS)
flags.DEFINE_integer("num", 3, "number of examples to show", flag_values=FLAGS)
flags.DEFINE_string("sequence_length", None,
                    "task feature lengths, e.g. inputs:512,targets:114 (default: the task's)",
                    flag_values=FLAGS)
flags.DEFINE_boolean("shuffle", True, "shuffle as in training (False: file order)",
                     flag_values=FLAGS)


def main(gin_bindings: Sequence[str]) -> None:
    if not FLAGS.task:
        raise UserError("--task is required, e.g. --task=demo_ul2")
    if FLAGS.num < 0:
        raise UserError(f"--num must be >= 0, got {FLAGS.num}")
    from t5lite.commands import gin_setup
    from t5lite.commands.task_setup import prepare_task
    from t5lite.data.preview import preview_examples
    from t5lite.data.registry import default_sequence_length, parse_sequence_length

    lengths = (parse_sequence_length(FLAGS.sequence_length) if FLAGS.sequence_length
               else None)
    gin_setup.parse_gin(FLAGS.gin_file, gin_bindings)
    prepare_task(FLAGS.task, FLAGS.module_import, lengths)  # text2text: from gin's files
    records = preview_examples(FLAGS.task, split=FLAGS.split, num=FLAGS.num,
                               sequence_length=lengths, seed=FLAGS.seed,
                               shuffle=FLAGS.shuffle)
    if FLAGS.format == "json":
        for record in records:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    shown = lengths or default_sequence_length(FLAGS.task)
    print(f"task {FLAGS.task}, split {FLAGS.split}, sequence lengths "
          + ", ".join(f"{k}:{v}" for k, v in shown.items()) + f", seed {FLAGS.seed}")
    for n, record in enumerate(records, 1):
        sizes = ", ".join(f"{k} {len(record[k])} tokens" for k in ("inputs", "targets")
                          if k in record)
        print(f"\n=== example {n} ({sizes}, EOS included) ===")
        for key in ("inputs", "targets"):
            if key in record:
                print(f"--- {key}:\n{record[key + '_pretty']}")
