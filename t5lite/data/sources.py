"""A SeqIO data source over text files: one document per line, or JSON lines.

`TextDocumentSource` shards before it shuffles: host i of n reads files i, i+n, ... when there
are at least n files, and otherwise every n-th document of the fixed, unshuffled stream. Only
then are documents shuffled (with the host's seed), so shards are disjoint and together cover
the data whatever seeds the hosts use.

Example::

    source = TextDocumentSource({"train": ["a.jsonl.gz", "b.jsonl.gz"],
                                 "validation": ["val.jsonl.gz"]}, file_format="jsonl")
    ds = source.get_dataset("train", shuffle=True, seed=0,
                            shard_info=seqio.ShardInfo(index=0, num_shards=2))
    # -> {"text": tf.string} examples
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5lite import storage
from t5lite.errors import UserError

FORMATS = ("text", "jsonl")


def _open(path: str):
    if path.endswith(".gz"):
        return gzip.open(storage.open(path, "rb"), "rt", encoding="utf-8")
    return storage.open(path, "r")


class TextDocumentSource(seqio.DataSource):
    """Documents from text files. `file_format="text"`: one document per line (blank lines
    skipped), streamed by tf.data; `"jsonl"`: one JSON object per line, the document in field
    `text_key`, read into memory (this host's files only) when the dataset is built, which suits
    corpora up to a few GB; larger ones belong in text files or TFDS.
    Files ending in `.gz` are read as gzip. Output examples: {"text": string}."""

    def __init__(self, split_to_files: Mapping[str, Sequence[str] | str],
                 file_format: str = "text", text_key: str = "text",
                 shuffle_buffer_size: int = 10_000) -> None:
        if file_format not in FORMATS:
            raise UserError(f"file_format must be one of {FORMATS}, got {file_format!r}")
        files: dict[str, list[str]] = {}
        for split, paths in split_to_files.items():
            paths = [paths] if isinstance(paths, str) else list(paths)
            expanded: list[str] = []
            for pattern in paths:
                matches = storage.glob(pattern)  # local or gs://
                if not matches:
                    raise UserError(f"split {split!r}: no file matches {pattern!r}")
                expanded.extend(matches)
            files[split] = expanded
        self._files = files
        self._format = file_format
        self._text_key = text_key
        self._shuffle_buffer_size = shuffle_buffer_size
        super().__init__(splits=tuple(files))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    @property
    def performs_internal_shuffling(self) -> bool:
        return False

    def list_shards(self, split: str) -> Sequence[str]:
        return self._split_files(split)

    def _split_files(self, split: str) -> list[str]:
        if split not in self._files:
            raise UserError(f"split {split!r} not available; this source has "
                            f"{sorted(self._files)}")
        return self._files[split]

    def _jsonl_documents(self, paths: Sequence[str]) -> Iterator[str]:
        for path in paths:
            with _open(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[self._text_key]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(f"{path}:{lineno}: expected a JSON object with a "
                                        f"{self._text_key!r} field") from None
                    yield str(text)

    def _file_dataset(self, paths: list[str]) -> tf.data.Dataset:
        if self._format == "jsonl":
            # Parsed here, in Python, once per call: JSON has no tf.data reader, and a Python
            # generator inside tf.data would serialise the pipeline on the GIL.
            return tf.data.Dataset.from_tensor_slices(
                tf.constant(list(self._jsonl_documents(paths)) or [""], tf.string)
            ).filter(lambda text: tf.strings.length(text) > 0)
        if any(storage.is_remote(p) for p in paths):
            # gs:// text files are read through t5lite.storage (one client for every gs://
            # path, emulators included), into memory like JSONL: this host's files only.
            lines = [line.rstrip("\n") for p in paths for line in _open(p)]
            return tf.data.Dataset.from_tensor_slices(tf.constant(lines or [""], tf.string)
                                                      ).filter(lambda line: tf.strings.length(
                                                          tf.strings.strip(line)) > 0)
        per_file = [tf.data.TextLineDataset(p, compression_type="GZIP" if p.endswith(".gz")
                                            else None) for p in paths]
        ds = per_file[0]
        for other in per_file[1:]:
            ds = ds.concatenate(other)
        return ds.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None,
                    *, sequence_length=None, use_cached: bool = False,
                    num_epochs: int | None = 1) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs  # handled by the Task
        files = list(self._split_files(split))
        index, num_shards = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        shard_documents = num_shards > 1 and len(files) < num_shards
        if num_shards > 1 and not shard_documents:
            files = files[index::num_shards]
        # With document-level sharding every host must see the files in the same order.
        if shuffle and len(files) > 1 and not shard_documents:
            order = np.random.default_rng(seed).permutation(len(files))
            files = [files[i] for i in order]
        ds = self._file_dataset(files)
        if shard_documents:
            ds = ds.shard(num_shards, index)
        if shuffle:
            ds = ds.shuffle(self._shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
        return ds.map(lambda text: {"text": text}, num_parallel_calls=tf.data.AUTOTUNE)

    def num_input_examples(self, split: str) -> int | None:
        return None

    def __repr__(self) -> str:
        return (f"TextDocumentSource({self._format}, "
                + ", ".join(f"{s}: {len(f)} files" for s, f in self._files.items()) + ")")

