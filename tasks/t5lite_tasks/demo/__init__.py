"""Tasks over the bundled demo corpus (see data/LICENSE.txt and make_corpus.py)."""

from __future__ import annotations

import functools
import os

import seqio
import tensorflow as tf

from t5lite.data import denoisers, tasks
from t5lite.data.bart import BartObjective
from t5lite.data.metrics import exact_match
from t5lite.data.sources import TextDocumentSource
from t5lite.data.vocab import load_vocabulary

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TRAIN_FILE = os.path.join(DATA_DIR, "train.jsonl.gz")
VALIDATION_FILE = os.path.join(DATA_DIR, "validation.jsonl.gz")
VOCABULARY_PATH = os.path.join(DATA_DIR, "demo_8k.model")

SPAN_CORRUPTION_LENGTHS = {"inputs": 512, "targets": 114}
FULL_LENGTHS = {"inputs": 512, "targets": 512}
# UL2's X-denoiser (μ=3, d=0.5) needs more than 100 sentinels beyond 402 inputs.
UL2_LENGTHS = {"inputs": 384, "targets": 384}
COPY_LENGTHS = {"inputs": 32, "targets": 32}
COPY_MAX_WORDS = 12


def vocabulary() -> seqio.SentencePieceVocabulary:
    """The demo vocabulary: 8000 SentencePiece pieces + 100 extra ids (vocab_size 8100)."""
    return load_vocabulary(VOCABULARY_PATH)


def source() -> TextDocumentSource:
    return TextDocumentSource({"train": [TRAIN_FILE], "validation": [VALIDATION_FILE]},
                              file_format="jsonl")


def copy_examples(ds: tf.data.Dataset, max_words: int = COPY_MAX_WORDS) -> tf.data.Dataset:
    """Documents -> one example per paragraph: inputs "copy: <first words>", targets the words."""
    ds = ds.map(lambda ex: tf.strings.split(ex["text"], "\n"),
                num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    ds = ds.map(lambda p: tf.strings.reduce_join(tf.strings.split(p)[:max_words], separator=" "),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.filter(lambda s: tf.strings.length(s) > 0)
    return ds.map(lambda s: {"inputs": tf.strings.join(["copy: ", s]), "targets": s},
                  num_parallel_calls=tf.data.AUTOTUNE)


def register() -> None:
    vocab = vocabulary()
    src = source()
    tasks.add_pretraining_task("demo_span_corruption", src, vocab, denoisers.span_corruption(),
                               default_sequence_length=SPAN_CORRUPTION_LENGTHS)
    tasks.add_pretraining_task("demo_prefix_lm", src, vocab, denoisers.prefix_lm(),
                               default_sequence_length=FULL_LENGTHS)
    tasks.add_pretraining_task("demo_ul2", src, vocab, denoisers.ul2("uniform"),
                               default_sequence_length=UL2_LENGTHS)
    tasks.add_pretraining_task("demo_ul2r", src, vocab, denoisers.ul2("ul2r"),
                               default_sequence_length=UL2_LENGTHS)
    tasks.add_pretraining_task("demo_bart", src, vocab, BartObjective(),
                               default_sequence_length=FULL_LENGTHS)
    tasks.add_task(
        "demo_copy", src,
        {"inputs": seqio.Feature(vocab, add_eos=True),
         "targets": seqio.Feature(vocab, add_eos=True)},
        [copy_examples,
         functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True),
         seqio.preprocessors.append_eos_after_trim],
        metric_fns=[exact_match],
        default_sequence_length=COPY_LENGTHS)


register()
