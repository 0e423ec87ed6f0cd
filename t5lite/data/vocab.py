"""SentencePiece vocabularies: train one (`t5lite vocab`) and load one for SeqIO.

t5lite uses T5's conventions: PAD = 0, EOS = 1, UNK = 2, no BOS, and `extra_ids` sentinel ids
appended after the SentencePiece pieces by `seqio.SentencePieceVocabulary`, numbered from the top:
`<extra_id_0>` = vocab_size - 1. A vocabulary trained here is a unigram model with byte fallback
(no text is ever mapped to UNK) and the UL2 paradigm tokens `[NLU]`, `[NLG]`, `[S2S]` as
user-defined symbols, so each of them is one id. Any other SentencePiece model (e.g. T5's public
32k one) loads too.

Example::

    train_vocabulary(["corpus.txt"], vocab_size=8000, output_prefix="/tmp/demo")
    vocab = load_vocabulary("/tmp/demo.model")          # 100 extra ids
    vocab.vocab_size                                     # 8100
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence

from t5lite import storage
from t5lite.errors import UserError

DEFAULT_EXTRA_IDS = 100
PARADIGM_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
# Longest line handed to the trainer; longer lines are split at whitespace.
_MAX_LINE_CHARS = 4000


def _open_text(path: str, stack: contextlib.ExitStack) -> io.TextIOBase:
    """`path` (local or gs://) as text lines; `.gz` decompressed on the fly."""
    if path.endswith(".gz"):
        raw = stack.enter_context(storage.open(path, "rb"))
        return stack.enter_context(io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8"))
    return stack.enter_context(storage.open(path, "r", encoding="utf-8"))


def training_inputs(patterns: Sequence[str]) -> list[str]:
    """The files of `--input`: each entry a file or a glob (`*`, `?`, `[...]`), local or gs://.

    Example: ["gs://b/corpus/part-*.jsonl.gz", "extra.txt"] -> every matching shard, sorted,
    then extra.txt. A file that does not exist or a glob that matches nothing is a UserError."""
    files: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matched = storage.glob(pattern)
            if not matched:
                raise UserError(f"vocabulary training input {pattern!r} matches no file")
            files += matched
        elif not storage.exists(pattern):
            raise UserError(f"vocabulary training input {pattern!r} does not exist")
        else:
            files.append(pattern)
    return files


def _split_long(line: str) -> Iterator[str]:
    while len(line) > _MAX_LINE_CHARS:
        cut = line.rfind(" ", 0, _MAX_LINE_CHARS)
        cut = cut if cut > 0 else _MAX_LINE_CHARS
        yield line[:cut]
        line = line[cut:].lstrip()
    if line:
        yield line


def iter_training_lines(paths: Sequence[str], text_key: str = "text") -> Iterator[str]:
    """Lines of text from plain-text files (`.txt`, any other name) or JSON-lines files
    (`.jsonl`/`.json`, optionally `.gz`, taking field `text_key` of each object); a JSON document
    is split at its newlines. `paths` are existing files (`training_inputs` checks them)."""
    for path in paths:
        is_jsonl = path.removesuffix(".gz").endswith((".jsonl", ".json"))
        with contextlib.ExitStack() as stack:
            f = _open_text(path, stack)
            for lineno, raw in enumerate(f, 1):
                if is_jsonl:
                    if not raw.strip():
                        continue
                    try:
                        text = json.loads(raw)[text_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise UserError(
                            f"{path}:{lineno}: expected a JSON object with a {text_key!r} "
                            f"string field ({e})") from None
                    for line in str(text).split("\n"):
                        yield from _split_long(line.strip())
                else:
                    yield from _split_long(raw.strip())


def train_vocabulary(
    input_files: Sequence[str],
    vocab_size: int,
    output_prefix: str,
    *,
    user_defined_symbols: Sequence[str] = PARADIGM_TOKENS,
    character_coverage: float = 0.9999,
    input_sentence_size: int = 2_000_000,
    seed_sentencepiece_size: int = 1_000_000,
    num_threads: int = 2,
    text_key: str = "text",
) -> str:
    """Train a unigram SentencePiece model with byte fallback; return the `.model` path.

    Writes `{output_prefix}.model` and `{output_prefix}.vocab`. Ids 0/1/2 are PAD/EOS/UNK as in
    T5; `user_defined_symbols` (by default the UL2 paradigm tokens) come next as single pieces.
    `input_files` are files or globs (`training_inputs`); inputs and the output prefix may be
    gs:// paths (SentencePiece writes locally; a gs:// output is trained in a temporary
    directory and then uploaded, the `.vocab` first, so a reader that sees the `.model` sees
    both).
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise UserError(f"--vocab_size={vocab_size} is too small: byte fallback alone needs 256 "
                        "pieces plus specials; use at least 300 (the demo uses 8000)")
    if not input_files:
        raise UserError("no --input files given")
    input_files = training_inputs(input_files)
    remote = storage.is_remote(output_prefix)
    with contextlib.ExitStack() as stack:
        if remote:  # SentencePiece writes local files: train here, then upload
            prefix = os.path.join(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="t5lite-vocab-")), "spm")
        else:
            prefix = output_prefix
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_training_lines(input_files, text_key=text_key),
            model_prefix=prefix,
            model_type="unigram",
            vocab_size=vocab_size,
            byte_fallback=True,
            user_defined_symbols=list(user_defined_symbols),
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size,
            max_sentence_length=_MAX_LINE_CHARS * 4,
            num_threads=num_threads,
            minloglevel=2,
        )
        if remote:  # .vocab first: a reader that sees the .model sees both
            for suffix in (".vocab", ".model"):
                with open(prefix + suffix, "rb") as f:
                    storage.write_atomic(output_prefix + suffix, f.read())
    return output_prefix + ".model"


def load_vocabulary(path: str, extra_ids: int = DEFAULT_EXTRA_IDS):
    """A `seqio.SentencePieceVocabulary` for the model at `path`, with `extra_ids` sentinels.

    Raises `UserError` at once (not at first use, as seqio would) when the file is missing or is
    not a SentencePiece model.
    """
    import seqio

    if not storage.exists(path):
        raise UserError(f"vocabulary file {path!r} does not exist (train one with "
                        "`t5lite vocab --input=FILE --vocab_size=N --output=PREFIX`)")
    # SentencePiece reads local files: a gs:// model is copied to a local cache first
    vocab = seqio.SentencePieceVocabulary(storage.local_copy(path), extra_ids=extra_ids)
    try:
        _ = vocab.tokenizer  # loads and parses the model now
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own text
        raise UserError(f"{path!r} is not a readable SentencePiece model: {e}") from None
    return vocab


def piece_id(vocab, piece: str) -> int | None:
    """The id of SentencePiece piece `piece` (e.g. a user-defined symbol such as `[NLU]`) in
    `vocab`, or None when the model has no such piece."""
    sp = vocab.tokenizer
    pid = sp.piece_to_id(piece)
    return pid if pid != sp.unk_id() and sp.id_to_piece(pid) == piece else None
