"""EncoderDecoder behaviour: packing, causality, scan == unrolled, GQA, MoE, remat, dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5lite.config import ModelConfig
from t5lite.models import build_model, param_logical_axes
from t5lite.models.layout import convert_layout, load_params, params_dict
from t5lite.models.mlp import MoE

TINY = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2,
            num_decoder_layers=2, relative_num_buckets=8, relative_max_distance=16)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def model_of(cfg: ModelConfig, seed: int = 0):
    return build_model(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def batch(seed=0, b=2, s=12, t=7):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, TINY["vocab_size"], size=(b, s)).astype(np.int32)
    dec = rng.integers(2, TINY["vocab_size"], size=(b, t)).astype(np.int32)
    dec[:, 0] = 0
    return jnp.asarray(enc), jnp.asarray(dec)


@pytest.mark.parametrize("position_scheme", ["relative", "rope"])
def test_packed_example_equals_example_alone(position_scheme):
    cfg = tiny(position_scheme=position_scheme)
    model = model_of(cfg)
    rng = np.random.default_rng(1)
    a_enc, b_enc = rng.integers(2, 64, 5), rng.integers(2, 64, 4)
    a_dec, b_dec = np.r_[0, rng.integers(2, 64, 3)], np.r_[0, rng.integers(2, 64, 2)]
    # alone, padded
    enc = np.zeros((1, 12), np.int32)
    enc[0, :5] = a_enc
    dec = np.zeros((1, 8), np.int32)
    dec[0, :4] = a_dec
    alone, _ = model(jnp.asarray(enc), jnp.asarray(dec))
    # packed: [b, a, padding] so that a does not start at position 0 of the row
    p_enc = np.zeros((1, 12), np.int32)
    p_enc[0, :9] = np.r_[b_enc, a_enc]
    e_seg = np.zeros((1, 12), np.int32)
    e_seg[0, :9] = [1] * 4 + [2] * 5
    e_pos = np.zeros((1, 12), np.int32)
    e_pos[0, :9] = np.r_[np.arange(4), np.arange(5)]
    p_dec = np.zeros((1, 8), np.int32)
    p_dec[0, :7] = np.r_[b_dec, a_dec]
    d_seg = np.zeros((1, 8), np.int32)
    d_seg[0, :7] = [1] * 3 + [2] * 4
    d_pos = np.zeros((1, 8), np.int32)
    d_pos[0, :7] = np.r_[np.arange(3), np.arange(4)]
    packed, _ = model(jnp.asarray(p_enc), jnp.asarray(p_dec),
                      encoder_segment_ids=jnp.asarray(e_seg), decoder_segment_ids=jnp.asarray(d_seg),
                      encoder_positions=jnp.asarray(e_pos), decoder_positions=jnp.asarray(d_pos))
    np.testing.assert_allclose(np.asarray(packed[0, 3:7]), np.asarray(alone[0, :4]),
                               atol=2e-5, rtol=1e-5)


def test_encoder_padding_is_ignored():
    model = model_of(tiny())
    enc, dec = batch()
    enc = enc.at[:, 8:].set(0)
    ref, _ = model(enc, dec)
    longer = jnp.concatenate([enc, jnp.zeros((2, 5), jnp.int32)], axis=1)
    out, _ = model(longer, dec)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("changes", [{}, dict(position_scheme="rope", num_kv_heads=2)])
def test_decoder_is_causal(changes):
    model = model_of(tiny(**changes))
    enc, dec = batch()
    ref, _ = model(enc, dec)
    for t in (1, 4, 6):
        changed = dec.at[:, t].set((dec[:, t] + 7) % 64)
        out, _ = model(enc, changed)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(ref[:, :t]))
        assert not np.allclose(np.asarray(out[:, t]), np.asarray(ref[:, t]))


@pytest.mark.parametrize("changes", [
    {},
    dict(tie_embeddings=True, gated=False, activation="relu", num_encoder_layers=3),
    dict(num_experts=2, moe_layer_period=2, num_encoder_layers=4, position_scheme="rope"),
])
def test_scanned_equals_unrolled(changes):
    scanned_cfg = tiny(scan_layers=True, **changes)
    unrolled_cfg = scanned_cfg.replace(scan_layers=False)
    scanned = model_of(scanned_cfg)
    unrolled = model_of(unrolled_cfg, seed=5)
    load_params(unrolled, convert_layout(params_dict(scanned), scanned_cfg, unrolled_cfg))
    enc, dec = batch()
    a, aux_a = scanned(enc, dec)
    b, aux_b = unrolled(enc, dec)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    for name in aux_a:
        np.testing.assert_allclose(float(aux_a[name]), float(aux_b[name]), rtol=1e-5, atol=1e-7)
    # and back again
    back = convert_layout(params_dict(unrolled), unrolled_cfg, scanned_cfg)
    jax.tree.map(np.testing.assert_array_equal, back, params_dict(scanned))


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_cfg = tiny(num_kv_heads=2, position_scheme="rope")
    mha_cfg = gqa_cfg.replace(num_kv_heads=None)
    gqa, mha = model_of(gqa_cfg), model_of(mha_cfg)
    pure = params_dict(gqa)

    def repeat_kv(tree):
        if isinstance(tree, dict):
            return {k: (jnp.repeat(v, 2, axis=-2) if k in ("k", "v") and not isinstance(v, dict)
                        else repeat_kv(v)) for k, v in tree.items()}
        return tree

    load_params(mha, repeat_kv(pure))
    enc, dec = batch()
    np.testing.assert_allclose(np.asarray(gqa(enc, dec)[0]), np.asarray(mha(enc, dec)[0]),
                               atol=1e-5, rtol=1e-5)
    # num_kv_heads == num_heads is plain multi-head attention
    explicit = model_of(mha_cfg.replace(num_kv_heads=4))
    load_params(explicit, params_dict(mha))
    np.testing.assert_array_equal(np.asarray(explicit(enc, dec)[0]), np.asarray(mha(enc, dec)[0]))


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_attention_implementations_agree(impl):
    cfg = tiny(num_kv_heads=2)
    ref = model_of(cfg.replace(attention_impl="einsum"))
    other = model_of(cfg.replace(attention_impl=impl))
    load_params(other, params_dict(ref))
    enc, dec = batch()
    enc = enc.at[0, 6:].set(0)
    np.testing.assert_allclose(np.asarray(other(enc, dec)[0]), np.asarray(ref(enc, dec)[0]),
                               atol=1e-5, rtol=1e-5)


def test_cudnn_config_runs_on_cpu_through_the_einsum_core():
    """A GPU-trained (bf16 + cuDNN) config still evaluates on a CPU, identically to einsum."""
    cfg = tiny(num_kv_heads=2).replace(dtype="bfloat16")
    ref = model_of(cfg.replace(attention_impl="einsum"))
    gpu_trained = model_of(cfg.replace(attention_impl="cudnn"))
    load_params(gpu_trained, params_dict(ref))
    enc, dec = batch()
    np.testing.assert_array_equal(np.asarray(gpu_trained(enc, dec)[0], np.float32),
                                  np.asarray(ref(enc, dec)[0], np.float32))


def test_one_expert_moe_equals_dense_ffn():
    dense_cfg = tiny()
    moe_cfg = dense_cfg.replace(num_experts=1, experts_top_k=1)
    dense, moe = model_of(dense_cfg), model_of(moe_cfg, seed=3)
    pure = params_dict(dense)
    moe_pure = params_dict(moe)
    for stack in ("encoder", "decoder"):
        mlp = pure[stack]["layers"]["mlp"]
        moe_pure[stack]["layers"]["mlp"].update({k: v[:, None] for k, v in mlp.items()})
        pure[stack]["layers"]["mlp"] = moe_pure[stack]["layers"]["mlp"]
    load_params(moe, pure)
    enc, dec = batch()
    a, _ = dense(enc, dec)
    b, aux = moe(enc, dec)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    assert float(aux["moe_dropped_fraction"]) == 0.0
    # one expert is perfectly "balanced": aux loss 1 per MoE layer (4 layers), times the weight
    np.testing.assert_allclose(float(aux["moe_aux_loss"]), 4 * moe_cfg.router_aux_loss_weight,
                               rtol=1e-6)


@pytest.mark.parametrize("capacity_factor, dropless", [(0.5, False), (1.0, False), (1.0, True)])
def test_every_token_is_routed_or_dropped(capacity_factor, dropless):
    cfg = tiny(num_experts=4, experts_top_k=2, expert_capacity_factor=capacity_factor,
               moe_dropless=dropless)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 16, cfg.d_model))
    token_mask = jnp.ones((3, 16), bool).at[2, 10:].set(False)
    dispatch, combine, stats = moe.route(x, token_mask)
    routed = float(jnp.sum(dispatch))
    assert stats["assigned"] == (16 * 2 + 10) * 2
    np.testing.assert_allclose(routed + float(stats["dropped"]), float(stats["assigned"]))
    assert float(jnp.max(jnp.sum(dispatch, axis=1))) <= 1.0  # one token per expert slot
    assert float(jnp.sum(dispatch[2, 10:])) == 0.0  # padding is never dispatched
    if dropless:
        assert float(stats["dropped"]) == 0.0
    if capacity_factor == 0.5:
        assert float(stats["dropped"]) > 0.0
    # combine weights are the (renormalised) gates of the dispatched assignments
    per_token = jnp.sum(combine, axis=(2, 3))
    assert float(jnp.max(per_token)) <= 1.0 + 1e-6
    y, _ = moe(x, token_mask)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))


def test_remat_and_dropout():
    cfg = tiny(dropout_rate=0.2)
    base = model_of(cfg)
    enc, dec = batch()
    train = nnx.jit(lambda m, key: m(enc, dec, deterministic=False, dropout_rng=key)[0])
    a, _ = base(enc, dec, deterministic=True)
    b, c = train(base, jax.random.key(0)), train(base, jax.random.key(0))
    d = nnx.jit(lambda m: m(enc, dec, deterministic=False)[0])(base)  # model's own stream
    assert not np.allclose(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
    assert d.shape == a.shape and not np.allclose(np.asarray(d), np.asarray(a))

    def loss(model):
        logits, _ = model(enc, dec, deterministic=False, dropout_rng=jax.random.key(2))
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    grad_fn = nnx.jit(nnx.grad(loss))  # eager remat/grad dispatch is very slow
    ref_grads = grad_fn(base)
    for policy, scan in (("full", False), ("save_attention_out", True)):
        if True:
            cfg_p = cfg.replace(remat_policy=policy, scan_layers=scan)
            other = model_of(cfg_p)
            load_params(other, convert_layout(params_dict(base), cfg, cfg_p))
            grads = nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(other))
            if not scan:
                grads = convert_layout(grads, cfg_p, cfg)
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4),
                         grads, nnx.to_pure_dict(ref_grads))


def test_bfloat16_compute_keeps_float32_logits_and_params():
    model = model_of(tiny(dtype="bfloat16", num_experts=2))
    enc, dec = batch()
    logits, aux = model(enc, dec)
    assert logits.dtype == jnp.float32 and aux["moe_aux_loss"].dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params_dict(model)))
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_every_param_has_logical_axes():
    model = model_of(tiny(num_experts=2, moe_layer_period=2))
    axes = param_logical_axes(nnx.state(model, nnx.Param))
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_axes) == len(flat_shapes)
    known = {"vocab", "embed", "heads", "kv_heads", "kv", "mlp", "expert", "relpos_buckets",
             "layers"}
    for names, value in zip(flat_axes, flat_shapes):
        assert len(names) == value.ndim and set(names) <= known, names


@pytest.mark.parametrize("name,reference", [
    ("gelu", lambda x: jax.nn.gelu(x, approximate=True)), ("silu", jax.nn.silu)])
def test_activations_match_jax_and_round_once_in_bfloat16(name, reference):
    """The activations' float32 values and hand-written gradients equal autodiff of jax.nn's
    formula; in bfloat16 the value is the float32 one rounded once (not after every op)."""
    from t5lite.models.layers import activation_fn

    act = activation_fn(name)
    x = jnp.linspace(-8.0, 8.0, 1001, dtype=jnp.float32)
    np.testing.assert_allclose(act(x), reference(x), rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(act(v) * jnp.cos(v)))(x)
    want = jax.grad(lambda v: jnp.sum(reference(v) * jnp.cos(v)))(x)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)
    xb = x.astype(jnp.bfloat16)
    out = act(xb)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, reference(xb.astype(jnp.float32)).astype(jnp.bfloat16))
    gb = jax.grad(lambda v: jnp.sum(act(v).astype(jnp.float32)))(xb)
    assert gb.dtype == jnp.bfloat16
