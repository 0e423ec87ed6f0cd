"""Distillation through the training loop (tiny models, synthetic copy task): the invariants of
issue #14 and the teacher's life cycle (frozen, never checkpointed, resumable, refused early)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5lite import checkpoint
from t5lite.errors import UserError
from t5lite.model_dir import write_model_config
from t5lite.models import build_model
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.config import TrainConfig
from t5lite.train.distill import DistillConfig
from t5lite.train.loop import train
from t5lite.train.optim import OptimizerConfig
from t5lite.train.schedules import ScheduleConfig
from train_fixtures import SyntheticData, tiny_model_config

STUDENT = dict(num_encoder_layers=1, num_decoder_layers=1)


def _teacher_dir(tmp_path, name: str, seed: int = 7, **changes) -> str:
    cfg = tiny_model_config(**changes)
    model = build_model(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    path = str(tmp_path / name)
    checkpoint.save_params(path, params, step=0)
    write_model_config(path, cfg)
    return path


def _tc(steps: int, distill: DistillConfig | None = None, **changes) -> TrainConfig:
    values = dict(train_steps=steps, batch_size=8, checkpoint_period=2, eval_period=None,
                  log_period=1, keep_checkpoints=None, async_checkpointing=False,
                  optimizer=OptimizerConfig(name="adamw", schedule=ScheduleConfig(
                      name="constant", base_learning_rate=3e-3, warmup_steps=0)),
                  distill=distill)
    values.update(changes)
    return TrainConfig(**values)


def _rows(model_dir: str) -> list[dict]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def _params(model_dir: str, mc) -> dict:
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: build_model(mc, rngs=nnx.Rngs(0))), nnx.Param))
    return jax.tree.map(np.asarray, checkpoint.restore_params(model_dir, abstract))


def _run(tmp_path, name, tc, mc=None, data_seed=0, mesh=MeshConfig(data=-1)):
    mc = mc or tiny_model_config(**STUDENT)
    out = str(tmp_path / name)
    result = train(mc, tc, make_mesh(mesh), SyntheticData(8, seed=data_seed),
                   out, console=False)
    return out, result


def test_alpha_zero_is_bit_identical_to_a_plain_run(tmp_path):
    teacher = _teacher_dir(tmp_path, "teacher")
    plain, _ = _run(tmp_path, "plain", _tc(3))
    kd, _ = _run(tmp_path, "kd", _tc(3, DistillConfig(teacher, alpha=0.0)))
    rows_p, rows_k = _rows(plain), _rows(kd)
    assert [r["loss"] for r in rows_p] == [r["loss"] for r in rows_k]
    assert all(r["kd_loss"] > 0 and r["ce_loss"] == r["loss"] for r in rows_k)
    mc = tiny_model_config(**STUDENT)
    jax.tree.map(np.testing.assert_array_equal, _params(plain, mc), _params(kd, mc))


def test_student_initialised_from_the_teacher_has_zero_kd(tmp_path):
    teacher = _teacher_dir(tmp_path, "teacher", **STUDENT)
    out, _ = _run(tmp_path, "student",
                  _tc(1, DistillConfig(teacher, alpha=1.0, temperature=1.0), init_from=teacher))
    row = _rows(out)[0]
    assert row["kd_loss"] == pytest.approx(0.0, abs=1e-5)
    assert row["teacher_ce"] == pytest.approx(row["cross_entropy"], rel=1e-5)
    assert row["loss"] == pytest.approx(row["kd_loss"], abs=1e-6)


@pytest.mark.slow
def test_microbatches_resume_and_checkpoints_without_the_teacher(tmp_path):
    """Gradient accumulation stays exact, a resumed run is bit-identical, and the student's
    checkpoints hold only the student (the teacher is in no checkpoint nor optimiser state)."""
    teacher = _teacher_dir(tmp_path, "teacher", architecture="decoder_only",
                           num_encoder_layers=0, num_decoder_layers=2)
    cfg = DistillConfig(teacher, alpha=0.7, temperature=2.0, alpha_warmup_steps=2)
    mc = tiny_model_config(**STUDENT)
    straight, _ = _run(tmp_path, "straight", _tc(4, cfg))
    resumed = str(tmp_path / "resumed")
    _run(tmp_path, "resumed", _tc(2, cfg))
    _run(tmp_path, "resumed", _tc(4, cfg))
    jax.tree.map(np.testing.assert_array_equal, _params(straight, mc), _params(resumed, mc))
    r_straight, r_resumed = _rows(straight), _rows(resumed)
    assert [r["loss"] for r in r_straight] == [r["loss"] for r in r_resumed]
    assert r_straight[0]["distill_alpha"] == 0.0
    assert r_straight[-1]["distill_alpha"] == pytest.approx(0.7)
    # the checkpoint's params are exactly the student's (check_params_compatible refuses extra
    # or missing parameters both ways) and its optimiser state holds Adam's two moments of the
    # student's parameters and a few counters: the teacher is in neither
    checkpoint.check_params_compatible(straight, _params(straight, mc), 4)
    n_student = sum(x.size for x in jax.tree.leaves(_params(straight, mc)))
    with checkpoint._manager(os.path.join(straight, "checkpoints")) as mngr:
        train_meta = mngr.item_metadata(4)["train"]
    opt_shapes = checkpoint._flat_shapes(train_meta["opt_state"])
    opt_size = sum(int(np.prod(shape)) for shape in opt_shapes.values())
    assert 2 * n_student <= opt_size <= 2 * n_student + 16


@pytest.mark.slow
def test_gradient_accumulation_stays_exact_with_distillation(tmp_path):
    teacher = _teacher_dir(tmp_path, "teacher")
    cfg = DistillConfig(teacher, alpha=0.6, temperature=3.0)
    mesh = MeshConfig(data=4, tensor=2)
    one, _ = _run(tmp_path, "one", _tc(2, cfg), mesh=mesh)
    two, _ = _run(tmp_path, "two", _tc(2, cfg, microbatches=2), mesh=mesh)
    for a, b in zip(_rows(one), _rows(two)):
        for key in ("loss", "kd_loss", "ce_loss", "teacher_ce", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_bfloat16_teacher_and_its_own_partitioning(tmp_path):
    teacher = _teacher_dir(tmp_path, "teacher", d_model=48, num_heads=3)
    out, result = _run(tmp_path, "student",
                       _tc(2, DistillConfig(teacher, teacher_dtype="bfloat16",
                                            teacher_partitioning="fsdp")))
    row = _rows(out)[-1]
    assert np.isfinite(row["kd_loss"]) and row["teacher_ce"] > 0


def test_padded_teacher_vocab_is_sliced_and_smaller_vocab_is_refused(tmp_path):
    padded = _teacher_dir(tmp_path, "padded", vocab_size=128)
    out, _ = _run(tmp_path, "ok", _tc(1, DistillConfig(padded)))
    assert np.isfinite(_rows(out)[0]["kd_loss"])
    small = _teacher_dir(tmp_path, "small", vocab_size=32)
    with pytest.raises(UserError, match="vocab_size=32, smaller than the student's 64"):
        _run(tmp_path, "refused", _tc(1, DistillConfig(small)))
    assert not os.path.exists(tmp_path / "refused")
    with pytest.raises(UserError, match="not a directory"):
        _run(tmp_path, "refused2", _tc(1, DistillConfig(str(tmp_path / "nope"))))
    assert not os.path.exists(tmp_path / "refused2")


def test_transformers_t5_brought_in_with_import_is_a_teacher(tmp_path):
    pytest.importorskip("transformers")
    from test_hf_import import save_random_t5

    from t5lite.export.hf import import_hf

    hf_dir = str(tmp_path / "hf")
    save_random_t5(hf_dir, "v1_1", vocab_size=8192, seed=0)  # larger than the student's 64
    vocab = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks",
                         "t5lite_tasks", "demo", "data", "demo_8k.model")
    teacher = str(tmp_path / "imported")
    import_hf(hf_dir, teacher, vocab=vocab)
    out, _ = _run(tmp_path, "student", _tc(1, DistillConfig(teacher, alpha=0.5)))
    row = _rows(out)[0]
    assert np.isfinite(row["kd_loss"]) and row["kd_loss"] > 0 and row["teacher_ce"] > 0
