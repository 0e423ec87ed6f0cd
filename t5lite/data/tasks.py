"""Register a pretraining task over your own text in a few lines.

Example (a JSONL corpus, T5 span corruption, the demo vocabulary)::

    from t5lite.data import denoisers, tasks
    from t5lite.data.vocab import load_vocabulary

    tasks.add_pretraining_task(
        "my_span_corruption",
        source=tasks.text_files_source({"train": "data/train-*.jsonl.gz",
                                        "validation": "data/val.jsonl.gz"}, file_format="jsonl"),
        vocabulary=load_vocabulary("my_vocab.model"),
        objective=denoisers.span_corruption(),
        default_sequence_length={"inputs": 512, "targets": 114})

Then `t5lite data --module_import=my_tasks --task=my_span_corruption` shows what the model
sees, and `MIXTURE_OR_TASK_NAME = "my_span_corruption"` trains on it.
`tfds_source("c4/en:3.1.0")` reads a TFDS dataset instead. Registering a name again replaces
the task (re-importing is harmless).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence

import seqio

from t5lite.data import registry
from t5lite.data.bart import BartObjective, make_bart_preprocessor
from t5lite.data.denoisers import DenoisingObjective
from t5lite.data.preprocessors import make_denoise_preprocessor
from t5lite.data.sources import TextDocumentSource
from t5lite.errors import UserError

Objective = DenoisingObjective | BartObjective


def text_files_source(split_to_files: Mapping[str, Sequence[str] | str],
                      file_format: str = "text", text_key: str = "text") -> TextDocumentSource:
    """Text files (one document per line) or JSONL files (`file_format="jsonl"`), with globs."""
    return TextDocumentSource(split_to_files, file_format=file_format, text_key=text_key)


def tfds_source(tfds_name: str, data_dir: str | None = None,
                splits: Sequence[str] | Mapping[str, str] | None = None) -> seqio.TfdsDataSource:
    """A TFDS dataset, e.g. `tfds_source("c4/en:3.1.0")`."""
    return seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir, splits=splits)


def output_features(vocabulary) -> dict[str, seqio.Feature]:
    return {"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
            "targets": seqio.Feature(vocabulary, add_eos=True)}


def _vocab_is_local(vocabulary) -> bool:
    """True for a vocabulary file on local disk; raises `UserError` when a local path is
    missing (remote paths such as gs://... are checked when first used)."""
    path = getattr(vocabulary, "sentencepiece_model_file", None)
    if not path or "://" in path:
        return False
    if not os.path.exists(path):
        raise UserError(f"vocabulary file {path!r} does not exist")
    return True


def add_pretraining_task(name: str, source: seqio.DataSource, vocabulary,
                         objective: Objective, *, text_key: str = "text",
                         default_sequence_length: Mapping[str, int] | None = None,
                         shuffle_buffer_size: int = 1_000) -> seqio.Task:
    """Register (or replace) a SeqIO task: `text_key` of `source` -> tokenize -> `objective`
    -> EOS. With `default_sequence_length` the objective is checked against the vocabulary at
    once (sentinels, paradigm tokens, lengths) and raises `ConfigError` on a bad combination."""
    if default_sequence_length is not None:
        default_sequence_length = dict(default_sequence_length)
        if _vocab_is_local(vocabulary):
            if isinstance(objective, DenoisingObjective):
                objective.plan(default_sequence_length, vocabulary)
            else:
                objective.chunk_length(default_sequence_length)
    if isinstance(objective, BartObjective):
        corrupt = make_bart_preprocessor(objective)
    else:
        corrupt = make_denoise_preprocessor(objective)
    preprocessors = [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        seqio.CacheDatasetPlaceholder(),
        corrupt,
        seqio.preprocessors.append_eos_after_trim,
    ]
    return add_task(name, source, output_features(vocabulary), preprocessors,
                    default_sequence_length=default_sequence_length,
                    shuffle_buffer_size=shuffle_buffer_size)


def add_task(name: str, source: seqio.DataSource, features: Mapping[str, seqio.Feature],
             preprocessors: Sequence[Callable], *, metric_fns: Sequence[Callable] = (),
             postprocess_fn: Callable | None = None,
             default_sequence_length: Mapping[str, int] | None = None,
             shuffle_buffer_size: int = 1_000) -> seqio.Task:
    """`seqio.TaskRegistry.add`, but replacing an existing task of the same name and recording
    the task's default sequence lengths (used by `t5lite data`)."""
    seqio.TaskRegistry.remove(name)
    task = seqio.TaskRegistry.add(name, source=source, output_features=features,
                                  preprocessors=list(preprocessors), metric_fns=list(metric_fns),
                                  postprocess_fn=postprocess_fn,
                                  shuffle_buffer_size=shuffle_buffer_size)
    if default_sequence_length is not None:
        registry.set_default_sequence_length(name, default_sequence_length)
    return task


def add_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]],
                default_sequence_length: Mapping[str, int] | None = None) -> seqio.Mixture:
    """`seqio.MixtureRegistry.add`, replacing an existing mixture of the same name."""
    seqio.MixtureRegistry.remove(name)
    mixture = seqio.MixtureRegistry.add(name, list(tasks_and_rates))
    if default_sequence_length is not None:
        registry.set_default_sequence_length(name, default_sequence_length)
    return mixture


def add_text2text_task(name: str, **kwargs):
    """A supervised task over TSV / JSONL files of (input, target) pairs; see
    `t5lite.data.text2text.add_text2text_task` for the arguments. Example::

        tasks.add_text2text_task("titles", train_files="train.tsv", validation_files="dev.tsv",
                                 vocabulary="spm.model", metrics=["exact_match", "rouge"])
    """
    from t5lite.data.text2text import add_text2text_task as add

    return add(name, **kwargs)
