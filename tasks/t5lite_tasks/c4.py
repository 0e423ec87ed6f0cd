"""C4 pretraining tasks over TFDS `c4/en` (prepare it with TFDS first; it is not bundled).

`c4_span_corruption` (T5) and `c4_ul2` (UL2 mixture of denoisers). The vocabulary is T5's public
32k SentencePiece model (100 extra ids), or the file named by T5LITE_C4_VOCABULARY. T5's model has
no `[NLU]`/`[NLG]`/`[S2S]` pieces, so `c4_ul2` encodes them as several ids (with a warning); a
vocabulary trained by `t5lite vocab` has them as single ids.

`add_c4_tasks` registers the same tasks under another prefix, TFDS name or data dir, e.g. over a
C4-shaped dataset of your own (features "text", "url", "timestamp").
"""

from __future__ import annotations

import os

import seqio

from t5lite.data import denoisers, tasks

T5_PUBLIC_VOCABULARY = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
C4_TFDS_NAME = "c4/en:3.1.0"
SPAN_CORRUPTION_LENGTHS = {"inputs": 512, "targets": 114}
UL2_LENGTHS = {"inputs": 384, "targets": 384}


def c4_vocabulary() -> seqio.SentencePieceVocabulary:
    path = os.environ.get("T5LITE_C4_VOCABULARY", T5_PUBLIC_VOCABULARY)
    return seqio.SentencePieceVocabulary(path, extra_ids=100)  # loaded lazily, on first use


def add_c4_tasks(prefix: str = "c4", tfds_name: str = C4_TFDS_NAME,
                 data_dir: str | None = None, vocabulary=None) -> list[str]:
    """Register `{prefix}_span_corruption` and `{prefix}_ul2`; returns their names."""
    vocab = vocabulary if vocabulary is not None else c4_vocabulary()
    source = tasks.tfds_source(tfds_name, data_dir=data_dir)
    names = [f"{prefix}_span_corruption", f"{prefix}_ul2"]
    tasks.add_pretraining_task(names[0], source, vocab, denoisers.span_corruption(),
                               default_sequence_length=SPAN_CORRUPTION_LENGTHS)
    tasks.add_pretraining_task(names[1], source, vocab, denoisers.ul2("uniform"),
                               default_sequence_length=UL2_LENGTHS)
    return names


add_c4_tasks()
