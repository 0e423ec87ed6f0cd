"""Fine-tuning: parameter freezing in the optimiser, INIT_FROM architecture checks, bad input
through `t5lite train` with gin/runs/finetune.gin, and the transformers round trip
(transformers T5 -> `t5lite import` -> fine-tune with finetune.gin on a file task ->
`t5lite export --format=hf` -> transformers' generate == t5lite's greedy outputs)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from t5lite.errors import ConfigError, UserError
from t5lite.inference import load_model
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.config import TrainConfig
from t5lite.train.loop import train
from t5lite.train.optim import OptimizerConfig, make_optimizer, param_names
from t5lite.train.schedules import ScheduleConfig
from train_fixtures import SyntheticData, tiny_model_config


def _flat_params(model_dir: str) -> dict[str, np.ndarray]:
    model, _ = load_model(model_dir)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    names = jax.tree.leaves(param_names(params))
    return {n: np.asarray(v) for n, v in zip(names, jax.tree.leaves(params))}


def _config(steps: int, **kw) -> TrainConfig:
    return TrainConfig(train_steps=steps, batch_size=8, checkpoint_period=steps, log_period=1,
                       eval_period=None, async_checkpointing=False,
                       optimizer=OptimizerConfig(schedule=ScheduleConfig(
                           name="constant", base_learning_rate=1e-2, warmup_steps=0)), **kw)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A tiny model dir trained for one step (the INIT_FROM of the tests below)."""
    model_dir = str(tmp_path_factory.mktemp("ft") / "pretrained")
    train(tiny_model_config(), _config(1), make_mesh(MeshConfig(data=8)), SyntheticData(8),
          model_dir, console=False)
    return model_dir


def test_frozen_parameters_do_not_change_and_have_no_optimizer_state(tmp_path, pretrained):
    freeze = (r"^encoder\.", r"^embed\.")
    model_dir = str(tmp_path / "frozen")
    train(tiny_model_config(), _config(2, init_from=pretrained, freeze=freeze),
          make_mesh(MeshConfig(data=8)), SyntheticData(8, seed=1), model_dir, console=False)
    before, after = _flat_params(pretrained), _flat_params(model_dir)
    frozen = [n for n in before if n.startswith(("encoder.", "embed."))]
    trained = [n for n in before if n not in frozen]
    assert frozen and trained
    for name in frozen:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    for name in trained:
        assert not np.array_equal(before[name], after[name]), name

    # no optimiser state for frozen parameters (Adafactor and AdamW, with clipping)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_model(model_dir)[0],
                                                                 nnx.Param)))
    from t5lite.models import param_logical_axes
    from t5lite.parallel.rules import axes_to_pure

    axes = axes_to_pure(param_logical_axes(nnx.state(load_model(model_dir)[0], nnx.Param)))
    for name in ("adafactor", "adamw"):
        cfg = OptimizerConfig(name=name, grad_clip_norm=1.0, weight_decay=0.1, momentum=0.9
                              if name == "adafactor" else None)
        tx, _ = make_optimizer(cfg, params, axes, 10, freeze=freeze)
        state = tx.init(params)
        paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state)[0]]
        assert not any("'encoder'" in p or "'embed'" in p for p in paths), name
        assert any("'decoder'" in p for p in paths), name
        grads = jax.tree.map(np.ones_like, params)
        updates, _ = tx.update(grads, state, params)
        flat = dict(zip(jax.tree.leaves(param_names(params)), jax.tree.leaves(updates)))
        assert all(not np.any(flat[n]) for n in frozen) and np.any(flat["lm_head"]), name

    with pytest.raises(ConfigError, match=r"encoder.*xyz' matches no parameter"):
        make_optimizer(OptimizerConfig(), params, axes, 10, freeze=[r"^encoder\.xyz"])
    with pytest.raises(ConfigError, match="freezes every parameter"):
        make_optimizer(OptimizerConfig(), params, axes, 10, freeze=["."])
    with pytest.raises(ConfigError, match="not a regular expression"):
        make_optimizer(OptimizerConfig(), params, axes, 10, freeze=["(encoder"])
    assert TrainConfig(freeze=r"^embed\.").freeze == (r"^embed\.",)


@pytest.mark.parametrize("change,field", [(dict(vocab_size=128), "vocab_size=64"),
                                          (dict(num_decoder_layers=3), "num_decoder_layers=2")])
def test_init_from_other_architecture_names_the_field_and_writes_nothing(
        tmp_path, pretrained, change, field):
    model_dir = str(tmp_path / "ft")
    with pytest.raises(UserError, match=rf"INIT_FROM={pretrained} was trained with "
                                        rf"ModelConfig\.{field} but this run has"):
        train(tiny_model_config(**change), _config(1, init_from=pretrained),
              make_mesh(MeshConfig(data=8)), SyntheticData(8), model_dir, console=False)
    assert not os.path.exists(model_dir)
    # dropout and dtype may differ (fine-tuning turns dropout on)
    train(tiny_model_config(dropout_rate=0.1), _config(1, init_from=pretrained),
          make_mesh(MeshConfig(data=8)), SyntheticData(8), model_dir, console=False)


@pytest.mark.slow
def test_finetune_cli_bad_input(repo_root, tmp_path, pretrained):
    """`t5lite train` with finetune.gin: one error line, exit 2, nothing written."""
    from test_train_errors import _start

    no_tab = tmp_path / "no_tab.tsv"
    no_tab.write_text("first input\tfirst target\nsecond input without a tab\n")
    common = ["--gin_file=gin/runs/finetune.gin", "--gin.MIXTURE_OR_TASK_NAME=text2text",
              "--gin.TASK_FEATURE_LENGTHS={'inputs': 12, 'targets': 8}",
              "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=1"]
    tiny = tmp_path / "tiny.gin"
    tiny.write_text("".join(f"ModelConfig.{k} = {v!r}\n" for k, v in dict(
        d_model=32, num_heads=2, head_dim=16, d_ff=64, num_encoder_layers=2,
        num_decoder_layers=2, vocab_size=64, relative_num_buckets=8,
        relative_max_distance=16).items()))
    vocab = "--gin.VOCABULARY=tasks/t5lite_tasks/demo/data/demo_8k.model"
    cases = {
        "no_tab": ([f"--gin_file={tiny}"] + common + [
            f"--gin.INIT_FROM={pretrained}", vocab, f"--gin.TRAIN_FILES={no_tab}",
            f"--gin.VALIDATION_FILES={no_tab}"], f"{no_tab}:2: the line has no tab"),
        "glob": ([f"--gin_file={tiny}"] + common + [
            f"--gin.INIT_FROM={pretrained}", vocab, f"--gin.TRAIN_FILES={tmp_path}/none-*.tsv",
            f"--gin.VALIDATION_FILES={no_tab}"], "none-*.tsv' (the glob matched nothing"),
        "no_init_from": ([f"--gin_file={tiny}"] + common + [
            vocab, f"--gin.TRAIN_FILES={no_tab}", f"--gin.VALIDATION_FILES={no_tab}"],
            "TrainConfig.init_from has no value"),
        "vocab_size": (["--gin_file=gin/models/demo.gin"] + common + [
            f"--gin.INIT_FROM={pretrained}", "--gin.MIXTURE_OR_TASK_NAME=demo_copy"],
            "ModelConfig.vocab_size=64 but this run has ModelConfig.vocab_size=8192"),
    }
    procs = {name: _start(repo_root, args + [f"--model_dir={tmp_path / name}"])
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, (name, err[-3000:])
        assert len(lines) == 1 and cases[name][1] in lines[0], (name, lines, err[-2000:])
        assert "Traceback" not in err, (name, err[-3000:])
        assert not os.path.exists(tmp_path / name), name


WORDS = ["the", "cat", "sat", "on", "mat", "a", "big", "red", "dog", "ran", "to", "house",
         "every", "morning", "bird", "sings", "river", "far"]


@pytest.mark.slow
def test_transformers_round_trip(tmp_path):
    """transformers T5 -> t5lite import -> fine-tune (finetune.gin, TSV task) -> export ->
    AutoTokenizer tokenizes like the vocabulary and generate == t5lite's greedy outputs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_hf_import import save_random_t5
    from test_infer import make_vocab

    from t5lite.commands import gin_setup
    from t5lite.commands import train as train_command
    from t5lite.export.hf import export_hf, import_hf
    from t5lite.inference import Generator

    vocab_path = make_vocab(str(tmp_path))
    hf_dir, imported = str(tmp_path / "hf"), str(tmp_path / "imported")
    save_random_t5(hf_dir, "v1_1", vocab_size=448, seed=3)
    import_hf(hf_dir, imported, vocab=vocab_path, inputs_length=32, targets_length=8)

    rng = np.random.default_rng(0)
    lines = []
    for _ in range(48):
        words = list(rng.choice(WORDS, size=int(rng.integers(3, 9))))
        lines.append(f"{' '.join(words)}\t{' '.join(words[:2])}")
    (tmp_path / "train.tsv").write_text("\n".join(lines[:40]) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(lines[40:]) + "\n")

    ft_dir = str(tmp_path / "finetuned")
    _, bindings = gin_setup.split_gin_overrides([
        f"--gin.INIT_FROM={imported}", "--gin.MIXTURE_OR_TASK_NAME=text2text",
        f"--gin.TRAIN_FILES={tmp_path / 'train.tsv'}",
        f"--gin.VALIDATION_FILES={tmp_path / 'dev.tsv'}", "--gin.TASK_PREFIX=first two: ",
        "--gin.METRICS=exact_match,rouge,bleu",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=8",
        "--gin.TRAIN_STEPS=3", "--gin.EVAL_STEPS=1", "--gin.LOG_PERIOD=1"])
    result = train_command.run([os.path.join(imported, "model.gin"), "gin/runs/finetune.gin"],
                               bindings, ft_dir, module_imports=[], console=False)
    assert result.step == 3
    assert {"decode/exact_match", "decode/rougeL", "decode/bleu"} <= set(result.eval_metrics)
    from t5lite.model_dir import read_model_config

    assert read_model_config(ft_dir).dropout_rate == 0.1  # finetune.gin over model.gin's 0.0
    before, after = _flat_params(imported), _flat_params(ft_dir)
    assert any(not np.array_equal(before[n], after[n]) for n in before)  # it did train

    out_dir = str(tmp_path / "exported")
    export_hf(ft_dir, out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    model = transformers.T5ForConditionalGeneration.from_pretrained(out_dir).eval()

    gen = Generator.from_model_dir(ft_dir, batch_size=4)  # what `t5lite infer` runs
    texts = ["first two: " + line.split("\t")[0] for line in lines[40:]]
    texts += ["first two: the <extra_id_0> sat on", "<extra_id_1> red dog"]
    rows = gen.tokenize(texts)
    assert any("<extra_id_0>" in t for t in texts) and len({len(r) for r in rows}) > 1
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    for i, row in enumerate(rows):  # same ids (EOS included), right-padded
        assert batch["input_ids"][i].tolist() == row + [0] * (batch["input_ids"].shape[1]
                                                             - len(row))
    ours = gen.generate(texts)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=8)
    theirs = []
    for seq in out[:, 1:].tolist():
        theirs.append(seq[: seq.index(1)] if 1 in seq else [t for t in seq if t != 0])
    assert [g.ids for g in ours] == theirs
    assert sum(len(t) for t in theirs) > len(theirs)  # real multi-token outputs
    # Texts: real inputs (sentinels included) decode alike on both sides ...
    for text, row in zip(texts, rows):
        assert gen.detokenize(row[:-1]) == tokenizer.decode(row, skip_special_tokens=True), text
    # ... and so do generated outputs made of ordinary pieces. A random model also emits the
    # unknown id, byte pieces and ids past the vocabulary, which SentencePiece spells " \u2047 "
    # and transformers drops or spells otherwise; their ids are compared above.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=vocab_path)
    ordinary = [g for g in ours if all(3 <= i < sp.get_piece_size() and not sp.is_byte(i)
                                       for i in g.ids)]
    decoded = dict(zip((id(g) for g in ours), tokenizer.batch_decode(out, skip_special_tokens=True)))
    assert all(g.output == decoded[id(g)] for g in ordinary), [(g.output, decoded[id(g)])
                                                               for g in ordinary]
