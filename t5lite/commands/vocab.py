"""`t5lite vocab`: train a SentencePiece vocabulary (unigram, byte fallback, UL2 paradigm tokens).

Example::

    t5lite vocab --input=tasks/demo/data/train.jsonl.gz --vocab_size=8000 --output=/tmp/demo_8k

Inputs are plain-text files (one paragraph per line) or JSON-lines files (`.jsonl`, `.jsonl.gz`)
whose objects carry the text in `--text_key`; each `--input` entry may be a glob, and inputs and
the output prefix may be gs:// paths (`--input='gs://bucket/corpus/part-*.jsonl.gz'`). Writes
PREFIX.model and PREFIX.vocab; use the model with
`seqio.SentencePieceVocabulary(PREFIX.model, extra_ids=100)`.
"""

from __future__ import annotations

from absl import flags

from t5lite.commands import common
from t5lite.errors import UserError

FLAGS = common.new_flags()
flags.DEFINE_list("input", None,
                  "comma-separated training text files or globs (.txt, .jsonl, optionally .gz; "
                  "local or gs://)", flag_values=FLAGS)
flags.DEFINE_integer("vocab_size", 8000, "number of SentencePiece pieces (extra ids come on top)",
                     flag_values=FLAGS)
flags.DEFINE_string("output", None, "output prefix (local or gs://): writes PREFIX.model and "
                    "PREFIX.vocab", flag_values=FLAGS)
flags.DEFINE_string("text_key", "text", "JSON field holding the text in .jsonl inputs",
                    flag_values=FLAGS)
flags.DEFINE_integer("input_sentence_size", 2_000_000, "max lines sampled for training",
                     flag_values=FLAGS)
flags.DEFINE_integer("num_threads", 2, "trainer threads", flag_values=FLAGS)


def main() -> None:
    if not FLAGS.input:
        raise UserError("--input is required (comma-separated text or .jsonl files)")
    if not FLAGS.output:
        raise UserError("--output is required (a path prefix; PREFIX.model is written)")
    from t5lite.data.vocab import (PARADIGM_TOKENS, load_vocabulary, piece_id,
                                   train_vocabulary)

    path = train_vocabulary(FLAGS.input, FLAGS.vocab_size, FLAGS.output,
                            text_key=FLAGS.text_key,
                            input_sentence_size=FLAGS.input_sentence_size,
                            num_threads=FLAGS.num_threads)
    vocab = load_vocabulary(path)
    ids = {t: piece_id(vocab, t) for t in PARADIGM_TOKENS}
    print(f"wrote {path} and {FLAGS.output}.vocab: {vocab.vocab_size - vocab.extra_ids} pieces; "
          f"with {vocab.extra_ids} extra ids seqio's vocab_size is {vocab.vocab_size}; "
          + ", ".join(f"{t}={v}" for t, v in ids.items()))
