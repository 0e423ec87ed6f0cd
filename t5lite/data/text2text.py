"""Supervised text-to-text tasks from files (TSV or JSONL), with no Python to write.

A text-to-text file holds one example per line:

    TSV    input<TAB>target                  (exactly one tab; `.tsv`, `.tsv.gz`)
    JSONL  {"input": "...", "target": "..."} (keys configurable; `.jsonl`, `.json`, `.gz`)

Globs, comma-separated lists and any path TensorFlow's gfile reads (local, gs://...) are
accepted; `.gz` files are read as gzip. Blank lines are skipped. Anything else that is not a
valid example stops the run with one `UserError` naming the file and line -- a TSV line without
a tab (or with several), an empty input or target, a JSONL line that is not a JSON object or
lacks a key, a file that is missing, unreadable or not UTF-8, a glob that matches nothing.
Nothing is skipped silently. The files are parsed when the task is registered (before training
writes anything), and held in memory, which suits fine-tuning sets up to a few GB.

From the command line (gin/runs/finetune.gin binds `Text2TextConfig` through macros)::

    t5lite train --gin_file=gin/models/t5_1_1/small.gin --gin_file=gin/runs/finetune.gin \\
        --gin.INIT_FROM=runs/pretrained --gin.MIXTURE_OR_TASK_NAME=text2text \\
        --gin.TRAIN_FILES=data/train.tsv --gin.VALIDATION_FILES=data/dev.tsv \\
        --gin.METRICS=exact_match,rouge --gin.TASK_PREFIX="summarize: "

Several tasks mixed by rates (multi-task fine-tuning), also from the command line: FILE_TASKS
lists them, each registered under its name, and `text2text` becomes their mixture (keys left
out of an entry take TASK_PREFIX, METRICS, FILE_FORMAT, INPUT_KEY, TARGET_KEY)::

    t5lite train ... --gin.MIXTURE_OR_TASK_NAME=text2text --gin.FILE_TASKS='[
        {"name": "titles", "train_files": "titles/train.tsv",
         "validation_files": "titles/dev.tsv", "prefix": "title: ", "rate": 2.0},
        {"name": "qa", "train_files": "qa/*.jsonl.gz", "validation_files": "qa/dev.jsonl",
         "input_key": "question", "target_key": "answer", "metrics": ["exact_match"]}]'

From Python (the same)::

    from t5lite.data import tasks
    tasks.add_text2text_task("titles", train_files="titles/train.tsv",
                             validation_files="titles/dev.tsv", vocabulary="spm.model",
                             metrics=["exact_match", "rouge"], prefix="title: ")
    tasks.add_text2text_task("qa", train_files="qa/*.jsonl.gz", validation_files="qa/dev.jsonl",
                             vocabulary="spm.model", input_key="question", target_key="answer")
    tasks.add_mixture("titles_and_qa", [("titles", 2.0), ("qa", 1.0)])

The vocabulary defaults to the one of the model dir fine-tuning starts from (`INIT_FROM`'s
run_info.json). Examples are tokenised with it, EOS is appended, and the raw strings are kept
(`inputs_pretokenized` / `targets_pretokenized`) for the metrics, which compare decoded
predictions with the target strings.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

from t5lite.errors import ConfigError, UserError

TASK_NAME = "text2text"  # MIXTURE_OR_TASK_NAME that registers a task from Text2TextConfig
FORMATS = ("auto", "tsv", "jsonl")
Files = str | Sequence[str]


def _check_settings(where: str, file_format: str, input_key: str, target_key: str,
                    metrics: Sequence[str] | str) -> None:
    """ConfigError (starting with `where`, if any) for an unknown format or metric, or an
    empty key."""
    where = f"{where}: " if where else ""
    if file_format not in FORMATS:
        raise ConfigError(f"{where}file_format={file_format!r} is unknown; use one of "
                          f"{FORMATS}.")
    if not input_key or not target_key:
        raise ConfigError(f"{where}input_key and target_key must be non-empty.")
    from t5lite.data.metrics import metric_fns

    try:
        metric_fns(metrics)  # unknown names fail here
    except UserError as e:
        raise ConfigError(f"{where}{e}") from None


_TASK_NAME_RE = re.compile(r"^[\w.:]+$")  # what SeqIO accepts as a task name
SPEC_REQUIRED = ("name", "train_files", "validation_files")
SPEC_OPTIONAL = ("rate", "prefix", "metrics", "file_format", "input_key", "target_key")


@dataclasses.dataclass(frozen=True)
class FileTaskSpec:
    """One task of a multi-task fine-tuning mixture from files (an entry of FILE_TASKS).

    `name` becomes the SeqIO task's name (metrics are reported as decode/<name>/...), `rate`
    its mixing rate (relative, > 0). The other fields mean what they mean in
    `Text2TextConfig`; `validation_files` is required (fine-tuning evaluates on them).
    """

    name: str
    train_files: Files
    validation_files: Files
    rate: float = 1.0
    prefix: str = ""
    metrics: Sequence[str] | str = ("exact_match",)
    file_format: str = "auto"
    input_key: str = "input"
    target_key: str = "target"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TASK_NAME_RE.match(self.name):
            raise ConfigError(f"name={self.name!r} is not a task name; use letters, digits, "
                              "'_', '.' or ':', e.g. \"qa\".")
        if self.name == TASK_NAME:
            raise ConfigError(f"name={TASK_NAME!r} is the mixture's own name; give the task "
                              "another name.")
        for key in ("train_files", "validation_files"):
            value = getattr(self, key)
            items = [value] if isinstance(value, str) else value
            if (not isinstance(items, (list, tuple)) or not items
                    or not all(isinstance(i, str) and i.strip() for i in items)):
                raise ConfigError(f"{key}={value!r} must be a path, glob or comma-separated "
                                  "list (or a list of them).")
        rate = self.rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (
                math.isfinite(rate) and rate > 0):
            raise ConfigError(f"rate={rate!r} must be a positive number (a relative mixing "
                              "rate, e.g. 1.0).")
        if not isinstance(self.prefix, str):
            raise ConfigError(f"prefix={self.prefix!r} must be a string.")
        _check_settings("", self.file_format, self.input_key,
                        self.target_key, self.metrics)


def file_task_specs(entries: Any, defaults: Mapping[str, Any] | None = None
                    ) -> tuple[FileTaskSpec, ...]:
    """FILE_TASKS entries (dicts, or FileTaskSpecs) -> validated specs; ConfigError naming the
    entry on an unknown or missing key, a bad value or a name used twice.

    Keys left out of an entry take their value from `defaults` (the single-task settings:
    prefix, metrics, file_format, input_key, target_key), then FileTaskSpec's defaults.
    """
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, (list, tuple)):
        raise ConfigError("FILE_TASKS must be a list of entries such as {\"name\": \"qa\", "
                          "\"train_files\": \"qa/train.tsv\", \"validation_files\": "
                          f"\"qa/dev.tsv\", \"rate\": 1.0}}, got {type(entries).__name__}.")
    keys = ", ".join(SPEC_REQUIRED) + " (required), " + ", ".join(SPEC_OPTIONAL)
    specs: list[FileTaskSpec] = []
    first_index: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"FILE_TASKS[{i}]"
        if isinstance(entry, FileTaskSpec):
            spec = entry
        else:
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{where} must be a dict with the keys {keys}; got "
                                  f"{entry!r}.")
            if isinstance(entry.get("name"), str):
                where += f" ({entry['name']!r})"
            unknown = sorted(str(k) for k in entry if k not in SPEC_REQUIRED + SPEC_OPTIONAL)
            if unknown:
                raise ConfigError(f"{where}: unknown key {unknown[0]!r}; the keys are {keys}.")
            missing = [k for k in SPEC_REQUIRED if k not in entry]
            if missing:
                raise ConfigError(f"{where}: the key {missing[0]!r} is missing; the keys are "
                                  f"{keys}.")
            values = {k: v for k, v in (defaults or {}).items() if k in SPEC_OPTIONAL}
            values.update(entry)
            try:
                spec = FileTaskSpec(**values)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        if spec.name in first_index:
            raise ConfigError(f"{where}: the task name {spec.name!r} is used by "
                              f"FILE_TASKS[{first_index[spec.name]}] too; names must differ.")
        first_index[spec.name] = i
        specs.append(spec)
    return tuple(specs)


@dataclasses.dataclass(frozen=True)
class Text2TextConfig:
    """The files and settings of the `text2text` task (bound from gin by finetune.gin).

    `train_files` / `validation_files`: a path, glob or comma-separated list (or a list of
    them). `file_format`: "tsv", "jsonl" or "auto" (by extension). `vocabulary`: a
    SentencePiece model; None takes `init_from`'s (the model dir fine-tuning starts from).
    `metrics`: names from t5lite.data.metrics.

    `tasks` (FILE_TASKS), instead of train/validation files: several file tasks, registered
    as tasks of their own names and mixed by their rates into the mixture `text2text`
    (multi-task fine-tuning); see `file_task_specs` for the entries. Validated here.
    """

    train_files: Files | None = None
    validation_files: Files | None = None
    file_format: str = "auto"
    input_key: str = "input"
    target_key: str = "target"
    prefix: str = ""
    metrics: Sequence[str] | str = ("exact_match",)
    vocabulary: str | None = None
    init_from: str | None = None
    tasks: Sequence[Any] = ()

    def __post_init__(self) -> None:
        _check_settings("Text2TextConfig", self.file_format, self.input_key, self.target_key,
                        self.metrics)
        specs = file_task_specs(self.tasks, {
            "prefix": self.prefix, "metrics": self.metrics, "file_format": self.file_format,
            "input_key": self.input_key, "target_key": self.target_key})
        if specs and (self.train_files is not None or self.validation_files is not None):
            raise ConfigError("give either TRAIN_FILES / VALIDATION_FILES (one task) or "
                              "FILE_TASKS (several tasks), not both.")
        object.__setattr__(self, "tasks", specs)


# ------------------------------------------------------------------------------ reading files
def split_patterns(files: Files, what: str) -> list[str]:
    """'a.tsv,b/*.tsv' or ['a.tsv', 'b/*.tsv'] -> ['a.tsv', 'b/*.tsv']."""
    items = [files] if isinstance(files, str) else list(files)
    out = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not out:
        raise UserError(f"{what}: no files given.")
    return out


def expand_files(files: Files, what: str) -> list[str]:
    """Every file matched by the patterns, in order (each pattern's matches sorted)."""
    paths: list[str] = []
    for pattern in split_patterns(files, what):
        try:
            matches = sorted(tf.io.gfile.glob(pattern))
        except tf.errors.OpError as e:
            raise UserError(f"{what}: cannot list {pattern!r}: {e.message}") from None
        if not matches:
            kind = "glob" if any(c in pattern for c in "*?[") else "file"
            raise UserError(f"{what}: no file matches {pattern!r} (the {kind} matched nothing; "
                            "check the path)")
        paths.extend(m for m in matches if not tf.io.gfile.isdir(m))
    return paths


def detect_format(path: str, file_format: str = "auto") -> str:
    if file_format != "auto":
        return file_format
    stem = path[:-3] if path.endswith(".gz") else path
    if stem.endswith(".tsv"):
        return "tsv"
    if stem.endswith((".jsonl", ".json")):
        return "jsonl"
    raise UserError(f"{path}: cannot tell the format from the name (expected .tsv, .jsonl or "
                    ".json, optionally .gz); set Text2TextConfig.file_format (FILE_FORMAT) to "
                    "tsv or jsonl.")


def _read_lines(path: str) -> list[str]:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            raw = f.read()
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (tf.errors.OpError, OSError, EOFError) as e:
        reason = getattr(e, "message", None) or str(e)
        raise UserError(f"{path}: cannot read the file ({reason})") from None
    lines = []
    for lineno, line in enumerate(io.BytesIO(raw), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{path}:{lineno}: not valid UTF-8 text") from None
    return lines


def _as_text(value: Any, path: str, lineno: int, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{path}:{lineno}: field {key!r} must be a string (or a number), got "
                        f"{type(value).__name__}")
    return str(value)


def read_examples(path: str, file_format: str = "auto", input_key: str = "input",
                  target_key: str = "target") -> list[tuple[str, str]]:
    """(input, target) pairs of one file; `UserError` naming file and line on a bad line.

    >>> read_examples("dev.tsv")          # doctest: +SKIP
    [('translate: hello', 'hallo'), ...]
    """
    fmt = detect_format(path, file_format)
    examples: list[tuple[str, str]] = []
    for lineno, line in enumerate(_read_lines(path), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if fmt == "tsv":
            tabs = line.count("\t")
            if tabs != 1:
                problem = "has no tab" if tabs == 0 else f"has {tabs} tabs"
                raise UserError(f"{path}:{lineno}: the line {problem}; a TSV example is "
                                "input<TAB>target (one tab)")
            inp, target = line.split("\t")
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object with {input_key!r} "
                                f"and {target_key!r} fields, got {type(obj).__name__}")
            for key in (input_key, target_key):
                if key not in obj:
                    raise UserError(f"{path}:{lineno}: the JSON object has no {key!r} field "
                                    f"(it has {sorted(obj)}); set the key names with "
                                    "INPUT_KEY / TARGET_KEY")
            inp = _as_text(obj[input_key], path, lineno, input_key)
            target = _as_text(obj[target_key], path, lineno, target_key)
        if not target.strip():
            raise UserError(f"{path}:{lineno}: empty target")
        if not inp.strip():
            raise UserError(f"{path}:{lineno}: empty input")
        examples.append((inp, target))
    if not examples:
        raise UserError(f"{path}: the file has no examples")
    return examples


class Text2TextSource(seqio.DataSource):
    """A SeqIO data source of {"inputs", "targets"} strings read from text-to-text files.

    Sharding: host i of n takes examples i, i+n, ... of the fixed file order, before the
    seeded shuffle, so shards are disjoint whatever seeds the hosts use."""

    def __init__(self, split_to_files: Mapping[str, Files], file_format: str = "auto",
                 input_key: str = "input", target_key: str = "target") -> None:
        self._files: dict[str, list[str]] = {}
        self._examples: dict[str, list[tuple[str, str]]] = {}
        for split, files in split_to_files.items():
            paths = expand_files(files, f"{split} files")
            self._files[split] = paths
            self._examples[split] = [ex for p in paths for ex in
                                     read_examples(p, file_format, input_key, target_key)]
        super().__init__(splits=tuple(split_to_files))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return self._files[split]

    def get_dataset(self, split: str = "train", shuffle: bool = True,
                    seed: int | None = None, shard_info=None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: int | None = 1):
        del sequence_length, use_cached, num_epochs  # handled by the Task
        if split not in self._examples:
            raise UserError(f"split {split!r} not available; this task has "
                            f"{sorted(self._examples)}")
        examples = self._examples[split]
        ds = tf.data.Dataset.from_tensor_slices(
            {"inputs": tf.constant([e[0] for e in examples], tf.string),
             "targets": tf.constant([e[1] for e in examples], tf.string)})
        if shard_info is not None and shard_info.num_shards > 1:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            ds = ds.shuffle(min(len(examples), 100_000), seed=seed,
                            reshuffle_each_iteration=True)
        return ds

    def num_input_examples(self, split: str) -> int | None:
        return len(self._examples.get(split, ()))

    def __repr__(self) -> str:
        return "Text2TextSource(" + ", ".join(
            f"{s}: {len(self._examples[s])} examples from {len(self._files[s])} files"
            for s in self._examples) + ")"


def text2text_source(split_to_files: Mapping[str, Files], file_format: str = "auto",
                     input_key: str = "input", target_key: str = "target"):
    """A `seqio.DataSource` of {"inputs", "targets"} strings (files parsed now)."""
    return Text2TextSource(split_to_files, file_format, input_key, target_key)


def _add_prefix(ds, prefix: str):
    return ds.map(lambda ex: {**ex, "inputs": tf.strings.join([prefix, ex["inputs"]])},
                  num_parallel_calls=tf.data.AUTOTUNE)


def add_text2text_task(name: str, *, train_files: Files, validation_files: Files | None = None,
                       vocabulary: Any, file_format: str = "auto", input_key: str = "input",
                       target_key: str = "target", prefix: str = "",
                       metrics: Sequence[str] | str = ("exact_match",),
                       default_sequence_length: Mapping[str, int] | None = None,
                       shuffle_buffer_size: int = 10_000):
    """Register (or replace) SeqIO task `name` over text-to-text files; returns the task.

    `vocabulary`: a `seqio.Vocabulary` or the path of a SentencePiece model (100 extra ids).
    `prefix` is prepended to every input (T5's "summarize: "). `metrics` are names of
    t5lite.data.metrics (exact_match, accuracy, rouge, bleu), computed on decoded predictions.
    """
    from t5lite.data import tasks
    from t5lite.data.metrics import metric_fns
    from t5lite.data.vocab import load_vocabulary

    if file_format not in FORMATS:
        raise UserError(f"file_format={file_format!r} is unknown; use one of {FORMATS}")
    fns = metric_fns(metrics)
    vocab = load_vocabulary(vocabulary) if isinstance(vocabulary, str) else vocabulary
    splits: dict[str, Files] = {"train": train_files}
    if validation_files is not None:
        splits["validation"] = validation_files
    source = text2text_source(splits, file_format, input_key, target_key)
    preprocessors = []
    if prefix:
        preprocessors.append(functools.partial(_add_prefix, prefix=prefix))
    preprocessors += [functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True),
                      seqio.preprocessors.append_eos_after_trim]
    return tasks.add_task(name, source, tasks.output_features(vocab), preprocessors,
                          metric_fns=fns, default_sequence_length=default_sequence_length,
                          shuffle_buffer_size=shuffle_buffer_size)


def vocabulary_path(config: Text2TextConfig, init_from: str | None) -> str:
    """The vocabulary to use: config.vocabulary, else INIT_FROM's (run_info.json)."""
    if config.vocabulary:
        return config.vocabulary
    if init_from:
        from t5lite.model_dir import read_run_info

        path = read_run_info(init_from).vocabulary
        if not path:
            raise UserError(f"INIT_FROM={init_from} records no vocabulary in run_info.json; "
                            "set VOCABULARY=path/to/spm.model.")
        return path
    raise UserError("the text2text task needs a vocabulary: set INIT_FROM (its vocabulary is "
                    "used) or VOCABULARY=path/to/spm.model.")


def register_from_config(config: Text2TextConfig, init_from: str | None = None,
                         name: str = TASK_NAME,
                         default_sequence_length: Mapping[str, int] | None = None):
    """Register what `config` describes under `name` ("text2text"): one task over
    TRAIN_FILES / VALIDATION_FILES, or, with `config.tasks` (FILE_TASKS), a task per entry and
    the mixture `name` of them by their rates. `init_from` (default `config.init_from`) gives
    the vocabulary when `config.vocabulary` is None. Every file is read here, so bad files
    fail before anything is written. Returns the task or mixture."""
    from t5lite.data import tasks
    from t5lite.data.vocab import load_vocabulary

    init_from = init_from if init_from is not None else config.init_from
    if config.tasks:
        vocab = load_vocabulary(vocabulary_path(config, init_from))
        registered = set(seqio.TaskRegistry.names()) - _FILE_TASKS
        for spec in config.tasks:
            if spec.name in registered:
                raise UserError(f"FILE_TASKS: the task name {spec.name!r} is taken by a "
                                "registered task (--module_import); give the entry another "
                                "name.")
        for spec in config.tasks:
            try:
                add_text2text_task(
                    spec.name, train_files=spec.train_files,
                    validation_files=spec.validation_files, vocabulary=vocab,
                    file_format=spec.file_format, input_key=spec.input_key,
                    target_key=spec.target_key, prefix=spec.prefix, metrics=spec.metrics,
                    default_sequence_length=default_sequence_length)
            except UserError as e:
                raise UserError(f"FILE_TASKS task {spec.name!r}: {e}") from None
            _FILE_TASKS.add(spec.name)
        seqio.TaskRegistry.remove(name)
        return tasks.add_mixture(name, [(spec.name, float(spec.rate)) for spec in config.tasks],
                                 default_sequence_length=default_sequence_length)
    if config.train_files is None:
        raise UserError("MIXTURE_OR_TASK_NAME=text2text needs TRAIN_FILES (a TSV or JSONL file, "
                        "glob or comma-separated list), e.g. --gin.TRAIN_FILES=data/train.tsv, "
                        "or FILE_TASKS (several tasks)")
    if config.validation_files is None:
        raise UserError("MIXTURE_OR_TASK_NAME=text2text needs VALIDATION_FILES (fine-tuning "
                        "evaluates on them), e.g. --gin.VALIDATION_FILES=data/dev.tsv")
    task = add_text2text_task(
        name, train_files=config.train_files, validation_files=config.validation_files,
        vocabulary=vocabulary_path(config, init_from), file_format=config.file_format,
        input_key=config.input_key, target_key=config.target_key, prefix=config.prefix,
        metrics=config.metrics, default_sequence_length=default_sequence_length)
    seqio.MixtureRegistry.remove(name)
    return task


# names of the tasks registered from FILE_TASKS in this process (may be registered again)
_FILE_TASKS: set[str] = set()


__all__ = ["FileTaskSpec", "TASK_NAME", "Text2TextConfig", "add_text2text_task",
           "detect_format", "expand_files", "file_task_specs", "read_examples",
           "register_from_config", "text2text_source", "vocabulary_path"]
