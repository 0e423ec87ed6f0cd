"""The train-step options of issue 16 compute what the default path computes.

shared_relative_bias (one [1, H, Q, K] bias) == per-row bias on packed rows; the loss over
vocabulary chunks == the loss from the logits (z-loss, label smoothing, a padded last chunk);
kernels cast once per step == cast per layer; remat save_projections and scan_unroll == the
plain scan. Gradients included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5lite.config import ModelConfig
from t5lite.errors import ConfigError
from t5lite.models import build_model
from t5lite.models.compute_cast import cast_matmul_kernels, widen_like
from t5lite.models.features import OutputFeatures
from t5lite.models.layout import load_params, params_dict
from t5lite.parallel.hosts import host_to_global
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.train.chunked_loss import chunked_token_loss_sums
from t5lite.train.config import TrainConfig
from t5lite.train.losses import LossConfig, token_loss_sums
from t5lite.train.optim import OptimizerConfig
from t5lite.train.schedules import ScheduleConfig
from t5lite.train.setup import make_setup
from t5lite.train.steps import make_apply_fn
from train_fixtures import global_batch, tiny_model_config

TINY = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2,
            num_decoder_layers=2, relative_num_buckets=8, relative_max_distance=16)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def packed_batch(b: int = 2, s: int = 12, t: int = 8, seed: int = 0) -> dict[str, jax.Array]:
    """Two examples per row then padding; positions restart at 0 in every segment."""
    rng = np.random.default_rng(seed)

    def segments(length: int, first: int, second: int):
        seg = np.array([1] * first + [2] * second + [0] * (length - first - second), np.int32)
        pos = np.concatenate([np.arange(first), np.arange(second),
                              np.zeros(length - first - second, int)]).astype(np.int32)
        return np.tile(seg, (b, 1)), np.tile(pos, (b, 1))

    enc_seg, enc_pos = segments(s, 5, 4)
    dec_seg, dec_pos = segments(t, 3, 4)
    enc = rng.integers(2, TINY["vocab_size"], (b, s)).astype(np.int32) * (enc_seg > 0)
    tgt = rng.integers(2, TINY["vocab_size"], (b, t)).astype(np.int32) * (dec_seg > 0)
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], axis=1)
    dec_in[dec_pos == 0] = 0
    batch = dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in,
                 decoder_target_tokens=tgt, decoder_loss_weights=(dec_seg > 0).astype(np.int32),
                 encoder_segment_ids=enc_seg, encoder_positions=enc_pos,
                 decoder_segment_ids=dec_seg, decoder_positions=dec_pos)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _loss_and_grads(cfg: ModelConfig, pure: dict, batch: dict):
    model = build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    load_params(model, pure)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply = make_apply_fn(graphdef, rest)

    def loss(p):
        logits, _ = apply(p, batch, None)
        return token_loss_sums(logits, batch["decoder_target_tokens"],
                               batch["decoder_loss_weights"], LossConfig())["loss"], logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        nnx.to_pure_dict(params))
    return value, logits, grads


def _assert_trees_close(a, b, rtol, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32),
                                                         np.asarray(y, np.float32),
                                                         rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_shared_relative_bias_equals_per_row_bias_on_packed_rows(impl):
    cfg = tiny(attention_impl=impl)
    pure = params_dict(build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
    batch = packed_batch()
    want, want_logits, want_grads = _loss_and_grads(cfg, pure, batch)
    got, got_logits, got_grads = _loss_and_grads(cfg.replace(shared_relative_bias=True), pure,
                                                 batch)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    _assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-6)
    # the shared bias is really one [1, H, T, T] tensor
    model = build_model(cfg.replace(shared_relative_bias=True), rngs=nnx.Rngs(params=0))
    assert model.encoder.sequence_bias(batch["encoder_positions"], 12).shape == (1, 4, 12, 12)
    assert build_model(cfg, rngs=nnx.Rngs(params=0)).encoder.sequence_bias(
        batch["encoder_positions"], 12).shape == (2, 4, 12, 12)


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("chunk,smoothing", [(8, 0.1), (37, 0.0), (64, 0.2), (5, 0.0)])
def test_chunked_loss_equals_loss_from_logits(vocab_major, chunk, smoothing):
    rng = np.random.default_rng(chunk)
    vocab, dim = 37, 16
    hidden = jnp.asarray(rng.normal(size=(2, 5, dim)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(vocab, dim) if vocab_major else (dim, vocab)) * 0.5,
                         jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (2, 5)), jnp.int32)
    targets = targets.at[0, 0].set(vocab - 1)  # a target in the padded last chunk
    weights = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32).at[0, 0].set(1.0)
    config = LossConfig(z_loss=1e-2, label_smoothing=smoothing, vocab_chunk=chunk)

    def reference(h, w):
        return token_loss_sums(OutputFeatures(h, w, vocab_major).logits(), targets, weights,
                               config)

    def chunked(h, w):
        return chunked_token_loss_sums(OutputFeatures(h, w, vocab_major), targets, weights,
                                       config)

    want, got = jax.jit(reference)(hidden, kernel), jax.jit(chunked)(hidden, kernel)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    grad = lambda f: jax.jit(jax.grad(lambda h, w: f(h, w)["loss"], argnums=(0, 1)))  # noqa
    _assert_trees_close(grad(chunked)(hidden, kernel), grad(reference)(hidden, kernel),
                        rtol=1e-4, atol=1e-6)


def test_cast_matmul_kernels_casts_kernels_only_and_keeps_gradients():
    cfg = tiny(dtype="bfloat16")
    pure = params_dict(build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
    cast = cast_matmul_kernels(pure, jnp.bfloat16)
    enc = cast["encoder"]
    assert enc["layers"]["self_attention"]["q"].dtype == jnp.bfloat16
    assert enc["layers"]["mlp"]["wi_0"].dtype == jnp.bfloat16
    assert cast["lm_head"].dtype == jnp.bfloat16
    assert enc["layers"]["pre_mlp_norm"]["scale"].dtype == jnp.float32
    assert cast["embed"]["embedding"].dtype == jnp.float32
    assert enc["relpos"]["embedding"].dtype == jnp.float32
    batch = packed_batch()
    model = build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    apply = make_apply_fn(graphdef, rest)

    def loss(p):
        logits, _ = apply(p, batch, None)
        return token_loss_sums(logits, batch["decoder_target_tokens"],
                               batch["decoder_loss_weights"], LossConfig())["loss"]

    want = jax.jit(jax.grad(loss))(pure)
    got = widen_like(jax.jit(jax.grad(loss))(cast), pure)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got))
    # the kernels' weight gradients are bf16 matmul outputs on both paths
    _assert_trees_close(got, want, rtol=2e-2, atol=1e-4)


def _step(model_config: ModelConfig, loss: LossConfig, microbatches: int = 1):
    schedule = ScheduleConfig(name="constant", base_learning_rate=1e-2, warmup_steps=0)
    tc = TrainConfig(train_steps=10, batch_size=8, microbatches=microbatches, loss=loss,
                     optimizer=OptimizerConfig(name="adamw", schedule=schedule))
    setup = make_setup(model_config, tc, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    state = setup.fresh_state()
    state, metrics = setup.train_step(state, host_to_global(global_batch(0, 8),
                                                            setup.batch_sharding, 8))
    return jax.device_get(metrics), jax.device_get(state.params)


def test_train_step_with_vocab_chunks_equals_the_logits_step():
    cfg = tiny_model_config()
    loss = LossConfig(z_loss=1e-3, label_smoothing=0.1)
    want, want_params = _step(cfg, loss)
    for microbatches in (1, 2):
        got, got_params = _step(cfg, LossConfig(z_loss=1e-3, label_smoothing=0.1,
                                                vocab_chunk=24), microbatches)
        for name in ("loss", "cross_entropy", "z_loss", "accuracy", "grad_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
        # AdamW's first step is ~lr * sign(g): a gradient entry near 0 moves by a fraction of
        # the 1e-2 step when the summation order changes, hence atol 1e-3
        _assert_trees_close(got_params, want_params, rtol=1e-5, atol=1e-3)


def test_train_step_with_kernels_cast_once_equals_the_default_step():
    cfg = tiny_model_config(dtype="bfloat16")
    want, _ = _step(cfg, LossConfig())
    for microbatches in (1, 2):
        got, params = _step(cfg.replace(cast_params_once=True), LossConfig(), microbatches)
        # bf16 compute: XLA fuses the casts differently (same values up to bf16 rounding)
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-3)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-2)
        assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))


@pytest.mark.parametrize("changes", [dict(remat_policy="save_projections"),
                                     dict(scan_unroll=2),
                                     dict(remat_policy="save_projections", scan_unroll=3)])
def test_remat_save_projections_and_scan_unroll_keep_gradients(changes):
    cfg = tiny(num_encoder_layers=3, num_decoder_layers=3)
    pure = params_dict(build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
    batch = packed_batch()
    want, want_logits, want_grads = _loss_and_grads(cfg, pure, batch)
    got, got_logits, got_grads = _loss_and_grads(cfg.replace(**changes), pure, batch)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    _assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-6)


def test_bad_option_values_are_refused():
    with pytest.raises(ConfigError, match="scan_unroll"):
        tiny(scan_unroll=0)
    with pytest.raises(ConfigError, match="vocab_chunk"):
        LossConfig(vocab_chunk=-1)
    with pytest.raises(ConfigError, match="remat_policy"):
        tiny(remat_policy="save_everything")


@pytest.mark.parametrize("tied", [False, True])
def test_output_features_give_the_models_logits(tied):
    cfg = tiny(tie_embeddings=tied)
    model = build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    batch = packed_batch()
    kwargs = dict(encoder_segment_ids=batch["encoder_segment_ids"],
                  decoder_segment_ids=batch["decoder_segment_ids"],
                  encoder_positions=batch["encoder_positions"],
                  decoder_positions=batch["decoder_positions"])
    logits, _ = model(batch["encoder_input_tokens"], batch["decoder_input_tokens"], **kwargs)
    feats, _ = model(batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                     return_features=True, **kwargs)
    assert isinstance(feats, OutputFeatures) and feats.vocab_major == tied
    np.testing.assert_allclose(feats.logits(), logits, rtol=1e-5, atol=1e-5)


def test_cudnn_masks_folded_into_the_bias_once_per_stack(monkeypatch):
    """With cuDNN attention and shared_relative_bias the stacks fold the packing / causal /
    cross masks into additive biases once (cuDNN takes one bias). On CPU the attention then runs
    the einsum core on the folded bias: same loss and gradients as masks kept apart."""
    from t5lite.models import blocks

    cfg = tiny(dtype="bfloat16", shared_relative_bias=True)
    pure = params_dict(build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
    batch = packed_batch()
    want, want_logits, want_grads = _loss_and_grads(cfg, pure, batch)
    folded = []
    real_fold = blocks.fold_masks
    monkeypatch.setattr(blocks, "cudnn_backend", lambda: True)
    monkeypatch.setattr(blocks, "fold_masks", lambda ctx, dt: folded.append(1) or
                        real_fold(ctx, dt))
    got, got_logits, got_grads = _loss_and_grads(cfg.replace(attention_impl="cudnn"), pure,
                                                 batch)
    assert len(folded) == 2  # once per stack (encoder, decoder), not per layer
    real = np.asarray(batch["decoder_segment_ids"]) > 0
    np.testing.assert_allclose(np.asarray(got_logits)[real], np.asarray(want_logits)[real],
                               rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(got, want, rtol=1e-3)
    _assert_trees_close(got_grads, want_grads, rtol=5e-2, atol=2e-3)


def test_vocab_chunk_with_distillation_is_refused():
    from t5lite.train.distill import DistillConfig

    with pytest.raises(ConfigError, match="vocab_chunk=8 with distillation"):
        TrainConfig(loss=LossConfig(vocab_chunk=8),
                    distill=DistillConfig(teacher_model_dir="/tmp/teacher"))
