"""Trainer building blocks: schedules, Adafactor, AdamW mask, losses, shardings, flops, gin."""

from __future__ import annotations

import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5lite.errors import ConfigError, UserError
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.parallel.rules import get_rules, opt_state_shardings
from t5lite.train.adafactor import FactorSpec, adafactor, factor_spec
from t5lite.train.losses import LossConfig, token_loss_sums
from t5lite.train.optim import OptimizerConfig, make_optimizer, weight_decay_mask
from t5lite.train.schedules import ScheduleConfig, make_schedule


# ---------------------------------------------------------------- schedules

def test_rsqrt_schedule_is_t5s():
    lr = make_schedule(ScheduleConfig(name="rsqrt", base_learning_rate=1.0, warmup_steps=10_000))
    assert np.allclose([lr(0), lr(9_999), lr(10_000), lr(40_000)], [0.01, 0.01, 0.01, 0.005])
    ramp = make_schedule(ScheduleConfig(name="rsqrt", warmup_steps=100, linear_warmup=True))
    assert float(ramp(0)) == 0.0 and np.isclose(float(ramp(50)), 0.05)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_decay_schedules_end_points(name):
    cfg = ScheduleConfig(name=name, base_learning_rate=1e-3, warmup_steps=10, final_fraction=0.1)
    lr = make_schedule(cfg, total_steps=110)
    assert np.isclose(float(lr(5)), 5e-4)
    assert np.isclose(float(lr(10)), 1e-3)
    assert np.isclose(float(lr(60)), 5.5e-4)  # half way: both shapes pass the mid value
    assert np.isclose(float(lr(110)), 1e-4) and np.isclose(float(lr(500)), 1e-4)
    with pytest.raises(ConfigError, match="decay_steps"):
        make_schedule(cfg, total_steps=5)


# ---------------------------------------------------------------- adafactor

def test_factor_spec_follows_logical_axes():
    spec = factor_spec((6, 512, 8, 64), ("layers", "embed", "heads", "kv"))
    assert spec.factored and spec.row == (1,) and spec.col == (2, 3) and spec.batch == (0,)
    assert not factor_spec((6, 512), ("layers", "embed")).factored  # norm scale
    assert not factor_spec((32, 8), ("relpos_buckets", "heads")).factored
    assert not factor_spec((64, 512), ("embed", "mlp")).factored  # a dim group below 128
    # without logical axes: the two largest dims (the larger one is the column), if the
    # smaller of them reaches min_dim_size_to_factor
    assert factor_spec((300, 200), None) == FactorSpec(row=(1,), col=(0,), batch=())
    assert factor_spec((4, 256, 512), None) == FactorSpec(row=(1,), col=(2,), batch=())
    assert not factor_spec((300, 100), None).factored
    assert not factor_spec((300,), None).factored


def _reference_adafactor(g, p, v_row, v_col, t, row_axis=0, col_axis=1):
    """Textbook factored Adafactor for a matrix (T5 defaults), in NumPy."""
    decay = 1 - (t + 1) ** -0.8
    g2 = g * g + 1e-30
    v_row = decay * v_row + (1 - decay) * g2.mean(axis=col_axis)
    v_col = decay * v_col + (1 - decay) * g2.mean(axis=row_axis)
    approx = np.outer(v_row, v_col) / v_row.mean()
    u = g / np.sqrt(approx)
    u = u / max(1.0, np.sqrt((u * u).mean()) / 1.0)
    u = u * max(np.sqrt((p * p).mean()), 1e-3)
    return -0.1 * u, v_row, v_col


def test_adafactor_matches_reference_and_scan_is_per_layer():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(2, 128, 256)).astype(np.float32)
    axes = ("layers", "embed", "mlp")
    spec = factor_spec(p.shape, axes)
    tx = adafactor(0.1, {"w": spec})
    state = tx.init({"w": jnp.asarray(p)})
    assert state.v_row["w"].shape == (2, 128, 1) and state.v_col["w"].shape == (2, 1, 256)
    refs = [(np.zeros(128), np.zeros(256)) for _ in range(2)]
    for t in range(3):
        g = rng.normal(size=p.shape).astype(np.float32)
        updates, state = tx.update({"w": jnp.asarray(g)}, state, {"w": jnp.asarray(p)})
        for layer in range(2):
            want, vr, vc = _reference_adafactor(g[layer].astype(np.float64),
                                                p[layer].astype(np.float64), *refs[layer], t)
            refs[layer] = (vr, vc)
            np.testing.assert_allclose(np.asarray(updates["w"][layer]), want, rtol=2e-4,
                                       atol=1e-7)
        p = p + np.asarray(updates["w"])


def test_adafactor_unfactored_and_weight_decay_mask():
    params = {"scale": jnp.ones((4, 16)), "kernel": jnp.ones((4, 16, 32))}
    axes = {"scale": ("layers", "embed"), "kernel": ("layers", "embed", "mlp")}
    mask = weight_decay_mask(params, axes)
    assert mask == {"scale": False, "kernel": True}
    tx, _ = make_optimizer(OptimizerConfig(weight_decay=0.5, schedule=ScheduleConfig(
        name="constant", base_learning_rate=0.1, warmup_steps=0)), params, axes)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.allclose(updates["scale"], 0.0)  # zero gradient, no decay
    assert np.allclose(updates["kernel"], -0.1 * 0.5)  # decoupled decay only


def test_adamw_decays_kernels_not_norms():
    params = {"scale": jnp.ones((8,)), "kernel": jnp.ones((8, 8))}
    axes = {"scale": ("embed",), "kernel": ("embed", "mlp")}
    cfg = OptimizerConfig(name="adamw", weight_decay=0.1, grad_clip_norm=1.0,
                          schedule=ScheduleConfig(name="constant", base_learning_rate=1.0,
                                                  warmup_steps=0))
    tx, _ = make_optimizer(cfg, params, axes)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert np.allclose(updates["scale"], 0.0) and np.allclose(updates["kernel"], -0.1)


# ---------------------------------------------------------------- losses

def test_label_smoothing_and_z_loss_match_explicit_soft_targets():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 3))
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    s, z = 0.1, 1e-3
    out = token_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                          LossConfig(z_loss=z, label_smoothing=s))
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    logp = logits - log_z[..., None]
    soft = np.full(logits.shape, s / 6)
    np.put_along_axis(soft, targets[..., None], 1 - s, axis=-1)
    entropy = -((1 - s) * np.log(1 - s) + s * np.log(s / 6))
    want = ((-(soft * logp).sum(-1) - entropy + z * log_z ** 2) * weights).sum()
    assert np.isclose(float(out["loss"]), want, rtol=1e-5)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert np.isclose(float(out["nll"]), (nll * weights).sum(), rtol=1e-5)
    assert float(out["weight"]) == 3.0


# ---------------------------------------------------------------- shardings

def test_optimizer_state_follows_parameter_shardings():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    rules = get_rules("fsdp")
    params = {"w": jax.ShapeDtypeStruct((2, 256, 512), jnp.float32),
              "n": jax.ShapeDtypeStruct((2, 256), jnp.float32)}
    axes = {"w": ("layers", "embed", "mlp"), "n": ("layers", "embed")}
    for name in ("adamw", "adafactor"):
        tx, _ = make_optimizer(OptimizerConfig(name=name), params, axes, total_steps=10)
        opt = jax.eval_shape(tx.init, params)
        shard = opt_state_shardings(opt, axes, mesh, rules)
        specs = {tuple(str(k) for k in path): s.spec
                 for path, s in jax.tree_util.tree_flatten_with_path(shard)[0]}
        assert P(None, "fsdp") in specs.values()
        if name == "adafactor":
            by_name = {k[-2] + "/" + k[-1].split("'")[1]: v for k, v in specs.items()
                       if len(k) >= 2 and "'" in k[-1]}
            assert by_name[".v_row/w"] == P(None, "fsdp")  # [2, 256, 1]: embed sharded
            assert by_name[".v_col/w"] == P()  # [2, 1, 512]: no embed dim left


# ---------------------------------------------------------------- flops

def test_flops_count_by_hand():
    from t5lite.config import ModelConfig
    from t5lite.train.flops import train_flops_per_step

    cfg = ModelConfig(vocab_size=100, d_model=8, num_heads=2, head_dim=4, d_ff=16,
                      num_encoder_layers=1, num_decoder_layers=1, gated=False)
    inp, tgt = 5, 3
    attn_proj = 2 * 8 * 4 * (2 * 2 + 2 * 2)
    ffn = 2 * 8 * 16 * 2
    enc = inp * (attn_proj + 4 * 2 * 4 * inp + ffn)
    dec = tgt * (attn_proj + 4 * 2 * 4 * tgt + 2 * 8 * 4 * 4 + 4 * 2 * 4 * inp + ffn)
    dec += inp * 2 * 8 * 4 * 4 + tgt * 2 * 8 * 100
    assert train_flops_per_step(cfg, 2, inp, tgt) == 3 * 2 * (enc + dec)


# ---------------------------------------------------------------- gin edge

def test_parse_gin_names_file_and_line(tmp_path):
    from t5lite.commands import gin_setup

    bad = tmp_path / "bad.gin"
    bad.write_text("TRAIN_STEPS = 10\nTrainConfig.batch_size = (4,\nX = 1\n")
    with pytest.raises(UserError, match=r"bad.gin, line 3"):
        gin_setup.parse_gin([str(bad)], [])
    unknown = tmp_path / "unknown.gin"
    unknown.write_text("A = 1\n\nNoSuchThing.x = 3\n")
    with pytest.raises(UserError, match=r"unknown.gin, line 3.*NoSuchThing"):
        gin_setup.parse_gin([str(unknown)], [])
    with pytest.raises(UserError, match="not found"):
        gin_setup.parse_gin([str(tmp_path / "missing.gin")], [])


def test_gin_builds_configs_with_unquoted_strings(tmp_path):
    from t5lite.commands import gin_setup

    run = tmp_path / "run.gin"
    run.write_text(textwrap.dedent("""
        include "gin/runs/pretrain.gin"
        TRAIN_STEPS = 7
    """))
    _, bindings = gin_setup.split_gin_overrides(["--gin.MIXTURE_OR_TASK_NAME=demo_ul2",
                                                 "--gin.PARTITIONING=fsdp"])
    gin_setup.parse_gin([str(run)], bindings)
    tc = gin_setup.build("TrainConfig")
    assert tc.train_steps == 7 and tc.partitioning == "fsdp"
    assert tc.optimizer.name == "adafactor" and math.isclose(
        tc.optimizer.schedule.base_learning_rate, 1.0)
    assert gin_setup.build("DataConfig").mixture_or_task_name == "demo_ul2"
    gin_setup.parse_gin([str(run)], [])
    with pytest.raises(UserError, match="MIXTURE_OR_TASK_NAME|missing"):
        gin_setup.build("DataConfig")
