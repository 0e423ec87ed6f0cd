"""`t5lite import` of random transformers T5 models: greedy output equals transformers'
`generate` token for token on a padded batch; export brings back the same weights; unsupported
layouts are refused by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_infer import TEXTS, make_vocab  # noqa: E402
from t5lite.errors import UserError  # noqa: E402
from t5lite.export.hf import export_hf, import_hf, read_hf_weights  # noqa: E402
from t5lite.inference import Generator  # noqa: E402
from t5lite.model_dir import read_model_config  # noqa: E402

MAX_NEW = 10


def save_random_t5(directory: str, layout: str, vocab_size: int, seed: int) -> None:
    """A random tiny transformers T5, saved with save_pretrained. Encoder deeper than decoder
    (transformers 5's generate fails the other way round)."""
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        dropout_rate=0.0, feed_forward_proj="gated-gelu" if layout == "v1_1" else "relu",
        tie_word_embeddings=(layout != "v1_1"), decoder_start_token_id=0, eos_token_id=1,
        pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # sharper, less uniform distributions than the init
            p.mul_(2.0 + 0.5 * torch.randn_like(p))
    model.save_pretrained(directory)


def hf_greedy(hf_dir: str, token_rows: list[list[int]]) -> list[list[int]]:
    model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    width = max(len(r) for r in token_rows)
    ids = np.zeros((len(token_rows), width), np.int64)
    for i, r in enumerate(token_rows):
        ids[i, : len(r)] = r
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0),
                             do_sample=False, num_beams=1, max_new_tokens=MAX_NEW,
                             decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    result = []
    for row in out.numpy()[:, 1:].tolist():  # drop the start token
        result.append(row[: row.index(1)] if 1 in row else row)
    return result


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory) -> str:
    return make_vocab(str(tmp_path_factory.mktemp("hf_vocab")))


@pytest.mark.parametrize("layout", ["v1_1", "original"])
def test_imported_greedy_equals_transformers_generate(tmp_path, vocab_path, layout):
    hf_dir, model_dir = str(tmp_path / "hf"), str(tmp_path / "model")
    save_random_t5(hf_dir, layout, vocab_size=448, seed=0 if layout == "v1_1" else 1)
    shutil.copyfile(vocab_path, os.path.join(hf_dir, "spiece.model"))
    cfg = import_hf(hf_dir, model_dir, inputs_length=48, targets_length=MAX_NEW,
                    scan_layers=(layout == "v1_1"))
    assert cfg.tie_embeddings == (layout == "original")
    assert read_model_config(model_dir) == cfg
    assert os.path.exists(os.path.join(model_dir, "spiece.model"))
    gin_text = open(os.path.join(model_dir, "model.gin")).read()
    assert f"ModelConfig.d_model = {cfg.d_model}" in gin_text

    gen = Generator.from_model_dir(model_dir, batch_size=4)
    rows = gen.tokenize(TEXTS)
    assert len({len(r) for r in rows}) > 1  # a padded batch
    ours = [r.ids for r in gen.generate(TEXTS)]
    theirs = hf_greedy(hf_dir, rows)
    assert ours == theirs
    assert sum(len(r) for r in ours) > 2 * len(ours)  # real multi-token outputs

    # export back: the same tensors, loadable by transformers
    out_dir = str(tmp_path / "exported")
    export_hf(model_dir, out_dir)
    original, exported = read_hf_weights(hf_dir), read_hf_weights(out_dir)
    assert set(original) <= set(exported)
    for name, value in exported.items():
        # transformers 5 saved the (tied) output layer as shared.weight only
        want = original[name] if name in original else original["shared.weight"]
        np.testing.assert_array_equal(value, want, err_msg=name)
    assert hf_greedy(out_dir, rows) == theirs


def test_import_cli_and_refusals(tmp_path, vocab_path):
    hf_dir = str(tmp_path / "hf")
    save_random_t5(hf_dir, "v1_1", vocab_size=448, seed=2)
    # transformers 5 writes no spiece.model: the error says to pass --vocab
    with pytest.raises(UserError, match="--vocab"):
        import_hf(hf_dir, str(tmp_path / "m0"))
    proc = subprocess.run([sys.executable, "-m", "t5lite.cli", "import", "--format=hf",
                           f"--input={hf_dir}", f"--model_dir={tmp_path / 'm1'}",
                           f"--vocab={vocab_path}", "--inputs_length=48"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert read_model_config(str(tmp_path / "m1")).num_encoder_layers == 3
    # importing again into the same dir would overwrite a checkpoint: refused
    with pytest.raises(UserError, match="already holds a checkpoint"):
        import_hf(hf_dir, str(tmp_path / "m1"), vocab=vocab_path)

    def variant(name: str, **changes) -> str:
        d = str(tmp_path / name)
        shutil.copytree(hf_dir, d)
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg.update(changes)
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        return d

    for changes, named in [(dict(model_type="umt5"), "umt5"),
                           (dict(architectures=["T5EncoderModel"]), "T5EncoderModel"),
                           (dict(feed_forward_proj="gelu"), "gelu")]:
        d = variant(named, **changes)
        with pytest.raises(UserError, match=named):
            import_hf(d, str(tmp_path / f"out_{named}"), vocab=vocab_path)
        assert not os.path.exists(os.path.join(tmp_path, f"out_{named}", "checkpoints"))
