"""`t5lite data`: show what the model will see for a SeqIO task, before packing.

Example::

    t5lite data --task=demo_ul2 --num=3
    t5lite data --task=demo_span_corruption --sequence_length=inputs:512,targets:114 --format=json

Text format prints the decoded inputs and targets with sentinels (`<extra_id_0>`, ...) and
paradigm tokens visible. JSON format (a contract) prints one object per line:
{"inputs": [ids, EOS included], "targets": [...], "inputs_pretty": str, "targets_pretty": str}.
Without --sequence_length the task's registered default lengths are used.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from t5lite.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("task", None, "registered SeqIO task or mixture name, e.g. demo_ul2")
flags.DEFINE_string("split", "train", "dataset split")
flags.DEFINE_integer("num", 3, "number of examples to show")
flags.DEFINE_enum("format", "text", ["text", "json"], "output format")
flags.DEFINE_string("sequence_length", None,
                    "task feature lengths, e.g. inputs:512,targets:114 (default: the task's)")
flags.DEFINE_integer("seed", 0, "data seed (same seed, same examples)")
if "module_import" not in FLAGS:  # the same flag as `t5lite train/eval` (T5X's name)
    flags.DEFINE_multi_string("module_import", ["t5lite_tasks"],
                              "modules that register SeqIO tasks / mixtures (repeatable)")
flags.DEFINE_boolean("shuffle", True, "shuffle as in training (False: file order)")


def _pretty(vocab, ids: list[int]) -> str:
    ids = [i for i in ids if i not in (vocab.pad_id, vocab.eos_id)]
    return vocab.decode(ids)


def show_examples(task_name: str, *, split: str = "train", num: int = 3,
                  sequence_length: dict[str, int] | None = None, seed: int | None = 0,
                  shuffle: bool = True) -> list[dict]:
    """The first `num` examples of a task as dicts of token ids and decoded strings."""
    from t5lite.data.registry import default_sequence_length, get_task_or_mixture

    provider = get_task_or_mixture(task_name)
    if split not in provider.splits:
        raise UserError(f"task {task_name!r} has no split {split!r}; it has "
                        f"{sorted(provider.splits)}")
    lengths = sequence_length or default_sequence_length(task_name)
    ds = provider.get_dataset(sequence_length=lengths, split=split, shuffle=shuffle, seed=seed,
                              num_epochs=1)
    features = provider.output_features
    out = []
    for ex in ds.take(num).as_numpy_iterator():
        record = {}
        for key in ("inputs", "targets"):
            if key in ex:
                record[key] = [int(i) for i in ex[key]]
        for key in ("inputs", "targets"):
            if key in record:
                record[f"{key}_pretty"] = _pretty(features[key].vocabulary, record[key])
        out.append(record)
    return out


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.task:
        raise UserError("--task is required, e.g. --task=demo_ul2")
    if FLAGS.num < 0:
        raise UserError(f"--num must be >= 0, got {FLAGS.num}")
    from t5lite.data.registry import (default_sequence_length, import_task_modules,
                                      parse_sequence_length)

    import_task_modules(FLAGS.module_import)
    lengths = (parse_sequence_length(FLAGS.sequence_length) if FLAGS.sequence_length
               else None)
    records = show_examples(FLAGS.task, split=FLAGS.split, num=FLAGS.num,
                            sequence_length=lengths, seed=FLAGS.seed, shuffle=FLAGS.shuffle)
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
