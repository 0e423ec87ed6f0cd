"""A transformers tokenizer that tokenizes exactly like t5lite's SentencePiece vocabulary.

`write_hf_tokenizer(spm_path, out_dir)` writes `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` and `spiece.model` so that
`transformers.AutoTokenizer.from_pretrained(out_dir)` gives the same ids as
`seqio.SentencePieceVocabulary(spm_path, extra_ids=100)` -- sentinels, byte fallback and
user-defined symbols (`[NLU]`, ...) included -- and appends EOS (`</s>`, id 1) as t5lite does.

Why not transformers' own `T5Tokenizer`: built from a `spiece.model` it drops SentencePiece's
byte fallback (characters outside the vocabulary become `<unk>`), and it registers the
sentinels as "added tokens", split off before the model runs, which changes the pieces next to
them (`<extra_id_1>.` gains a `▁` piece). Here the tokenizer is a `tokenizers` Unigram model
over exactly the SentencePiece pieces, in id order, followed by the sentinels as seqio adds them
(user-defined pieces `▁<extra_id_99>` ... `▁<extra_id_0>`, so `<extra_id_0>` = vocab size - 1):

    normalizer     SentencePiece's precompiled character map (e.g. nmt_nfkc), runs of spaces
                   collapsed, outer whitespace removed (remove_extra_whitespaces)
    pre-tokenizer  Metaspace: spaces -> `▁`, a `▁` in front (add_dummy_prefix), split before `▁`
    model          Unigram with byte fallback; user-defined pieces (the sentinels, `[NLU]`)
                   scored so that they always win, as SentencePiece matches them first; control
                   pieces (`<pad>`, `</s>`) and byte pieces are never produced from text
    decoder        `▁` -> space, bytes fused back into UTF-8, the leading space removed

The tokenizer class is transformers' generic fast tokenizer (`PreTrainedTokenizerFast`), so it
uses this tokenizer.json as written. Example::

    write_hf_tokenizer("runs/demo/spm.model", "/tmp/demo_hf")
    tok = transformers.AutoTokenizer.from_pretrained("/tmp/demo_hf")
    tok(["The <extra_id_0> sat."], padding=True).input_ids   # == t5lite's ids (+ EOS)
"""

from __future__ import annotations

import json
import os
import shutil

from t5lite.errors import UserError

# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_NEVER = -1e9  # score of pieces text never maps to
_ALWAYS = 1e3  # score of user-defined pieces (beats any split of the same text)


def _pieces(spm_path: str, extra_ids: int) -> tuple[object, list[tuple[str, float]], list[int]]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    try:
        with open(spm_path, "rb") as f:
            model.ParseFromString(f.read())
    except Exception as e:  # protobuf DecodeError, OSError
        raise UserError(f"cannot read the SentencePiece model {spm_path}: {e}") from None
    if model.trainer_spec.model_type not in (0, 1):  # UNIGRAM (0 is the proto default)
        raise UserError(f"{spm_path} is not a unigram SentencePiece model (model_type="
                        f"{model.trainer_spec.model_type}); only unigram models are exported")
    vocab: list[tuple[str, float]] = []
    user_defined: list[int] = []
    for i, piece in enumerate(model.pieces):
        if piece.type in (_CONTROL, _UNKNOWN, _BYTE, _UNUSED):
            vocab.append((piece.piece, _NEVER))
        elif piece.type == _USER_DEFINED:
            vocab.append((piece.piece, _ALWAYS))
            user_defined.append(i)
        else:
            vocab.append((piece.piece, float(piece.score)))
    for i in reversed(range(extra_ids)):  # as seqio.SentencePieceVocabulary adds them
        user_defined.append(len(vocab))
        vocab.append((f"▁<extra_id_{i}>", _ALWAYS))
    return model, vocab, user_defined


def build_hf_tokenizer(spm_path: str, extra_ids: int = 100):
    """The `tokenizers.Tokenizer` (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    model, vocab, _ = _pieces(spm_path, extra_ids)
    spec = model.normalizer_spec
    tok = Tokenizer(Unigram(vocab, unk_id=model.trainer_spec.unk_id,
                            byte_fallback=bool(model.trainer_spec.byte_fallback)))
    norms = []
    if spec.precompiled_charsmap:
        norms.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        norms += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    if norms:
        tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always" if spec.add_dummy_prefix else "never",
        split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    eos = model.trainer_spec.eos_id
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
        special_tokens=[("</s>", eos)])
    return tok


def write_hf_tokenizer(spm_path: str, output_dir: str, extra_ids: int = 100,
                       model_max_length: int = 512) -> None:
    """Write the tokenizer files for `AutoTokenizer.from_pretrained(output_dir)`."""
    tok = build_hf_tokenizer(spm_path, extra_ids)
    os.makedirs(output_dir, exist_ok=True)
    tok.save(os.path.join(output_dir, "tokenizer.json"))
    if os.path.abspath(spm_path) != os.path.abspath(os.path.join(output_dir, "spiece.model")):
        shutil.copyfile(spm_path, os.path.join(output_dir, "spiece.model"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast",
                  model_max_length=model_max_length, padding_side="right",
                  clean_up_tokenization_spaces=False)
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(output_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, sort_keys=True)


__all__ = ["build_hf_tokenizer", "write_hf_tokenizer"]
