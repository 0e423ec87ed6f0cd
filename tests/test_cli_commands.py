"""The verbs through the real `t5lite` command (subprocesses): a successful `t5lite train` on a
registered SeqIO task (with the decoding-metrics hook and keep-N retention), then `t5lite eval`,
`t5lite export` and `t5lite vocab` on what it wrote."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cli_util import ROOT, TINY_GIN, checkpoint_steps, cli, copy_model_dir, error_lines

pytestmark = pytest.mark.slow  # each verb is a fresh Python process (~10-20 s on 2 cores)


def _records(model_dir: str) -> list[dict]:
    with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_train_on_a_seqio_task_writes_the_model_dir(cli_trained):
    model_dir, proc = cli_trained
    assert "Traceback" not in proc.stderr
    assert "done at step 6" in proc.stdout + proc.stderr
    for name in ("model_config.json", "run_info.json", "operative_config.gin", "model-info.txt",
                 "metrics.jsonl", "tensorboard"):
        assert os.path.exists(os.path.join(model_dir, name)), name
    with open(os.path.join(model_dir, "run_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    assert info["task"] == "demo_copy" and info["task_feature_lengths"] == {"inputs": 32,
                                                                            "targets": 32}
    records = _records(model_dir)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["target_tokens"] > 0 for r in train)
    # the decoding hook runs inside the loop: demo_copy has an exact_match metric
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert r["decode/num_examples"] > 0 and 0.0 <= r["decode/exact_match"] <= 100.0
        assert np.isfinite(r["loss"])
    # a checkpoint every step, keep_checkpoints=2: only the newest two remain
    assert checkpoint_steps(model_dir) == [5, 6]


def test_eval_cli_reports_the_checkpoint(cli_trained, tmp_path):
    model_dir = copy_model_dir(cli_trained[0], str(tmp_path / "run"))
    proc = cli("eval", TINY_GIN, f"--model_dir={model_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "eval of step 6 on demo_copy/validation" in proc.stdout
    assert "exact_match" in proc.stdout
    last = _records(model_dir)[-1]
    assert last["split"] == "eval" and last["step"] == 6 and last["source"] == "t5lite eval"
    assert f"loss      {last['loss']:.4f}" in proc.stdout
    # the same batch as the training loop's final eval, the same parameters: the same loss
    final_train_eval = [r for r in _records(cli_trained[0]) if r["split"] == "eval"][-1]
    assert last["loss"] == pytest.approx(final_train_eval["loss"], rel=1e-5)


def test_eval_cli_dtype_bfloat16_computes_in_bfloat16(cli_trained, tmp_path):
    """`t5lite eval --dtype=bfloat16` on the float32 model dir: a bfloat16 loss (close to, not
    equal to, the float32 one), recorded with its dtype."""
    model_dir = copy_model_dir(cli_trained[0], str(tmp_path / "run"))
    proc = cli("eval", TINY_GIN, f"--model_dir={model_dir}", "--dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bfloat16 compute" in proc.stdout
    last = _records(model_dir)[-1]
    assert last["source"] == "t5lite eval" and last["dtype"] == "bfloat16"
    float_loss = [r for r in _records(cli_trained[0]) if r["split"] == "eval"][-1]["loss"]
    assert last["loss"] == pytest.approx(float_loss, rel=0.02)
    assert last["loss"] != pytest.approx(float_loss, rel=1e-6)


def test_export_cli_gives_a_transformers_model_with_the_same_logits(cli_trained, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from t5lite.inference import load_model

    model_dir, _ = cli_trained
    out = str(tmp_path / "hf")
    proc = cli("export", f"--model_dir={model_dir}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"exported {model_dir} to {out}" in proc.stdout
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    model, step = load_model(model_dir)
    assert step == 6
    rng = np.random.default_rng(0)
    enc = rng.integers(3, 8000, (2, 10))
    dec = rng.integers(3, 8000, (2, 5))
    dec[:, 0] = 0
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits
    got = np.asarray(model(jnp.asarray(enc, jnp.int32), jnp.asarray(dec, jnp.int32))[0])
    np.testing.assert_allclose(got[..., :hf.config.vocab_size], want.numpy(), atol=1e-4,
                               rtol=0)
    again = cli("export", f"--model_dir={model_dir}", f"--output={out}")  # never overwrites
    assert again.returncode == 2 and len(error_lines(again.stderr)) == 1
    assert "already holds a model" in error_lines(again.stderr)[0]


def test_vocab_cli_trains_a_sentencepiece_model(tmp_path):
    from t5lite.data.vocab import load_vocabulary, piece_id

    data = os.path.join(ROOT, "tasks", "t5lite_tasks", "demo", "data", "validation.jsonl.gz")
    prefix = str(tmp_path / "v")
    proc = cli("vocab", f"--input={data}", "--vocab_size=500", f"--output={prefix}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    vocab = load_vocabulary(prefix + ".model")
    assert vocab.vocab_size == 600  # 500 pieces + 100 extra ids
    assert [piece_id(vocab, t) for t in ("[NLU]", "[NLG]", "[S2S]")] == [3, 4, 5]
    assert "500 pieces" in proc.stdout and "vocab_size is 600" in proc.stdout
    text = "The interpreter reads a module."
    assert vocab.decode(vocab.encode(text)) == text
    bad = cli("vocab", f"--input={data}")  # no --output
    assert bad.returncode == 2 and len(error_lines(bad.stderr)) == 1
    assert "--output is required" in error_lines(bad.stderr)[0]
    assert "Traceback" not in bad.stderr
