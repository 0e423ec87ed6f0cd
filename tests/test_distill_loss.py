"""Distillation maths: the KD loss, its gradient, the T**2 scaling, schedules, and the
decoder-only teacher's view of an encoder-decoder batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5lite.errors import ConfigError
from t5lite.models import build_model
from t5lite.train.distill import (DistillConfig, alpha_at, kd_loss_sums, kd_topk_loss_sums,
                                  prefix_lm_teacher_batch, slice_vocab, temperature_at)
from train_fixtures import tiny_model_config


def _kl_numpy(s, t, w, temp):
    def log_softmax(x):
        x = x.astype(np.float64) / temp
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p = np.exp(log_softmax(t))
    return float(np.sum(temp ** 2 * np.sum(p * (log_softmax(t) - log_softmax(s)), -1) * w))


def test_kd_loss_matches_the_definition_and_is_zero_for_equal_logits():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 3, 11)).astype(np.float32)
    t = rng.normal(size=(2, 3, 11)).astype(np.float32) * 2
    w = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    for temp in (1.0, 2.0, 5.0):
        got = float(kd_loss_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), temp)["kd"])
        assert got == pytest.approx(_kl_numpy(s, t, w, temp), rel=1e-5)
    assert float(kd_loss_sums(jnp.asarray(t), jnp.asarray(t), jnp.asarray(w), 2.0)["kd"]) \
        == pytest.approx(0.0, abs=1e-6)
    # top-k with k = V is the full loss (ids in any order)
    ids = np.argsort(-t, axis=-1)
    topk = np.take_along_axis(t, ids, -1)
    full = kd_topk_loss_sums(jnp.asarray(s), jnp.asarray(topk), jnp.asarray(ids),
                             jnp.asarray(w), 2.0)["kd"]
    assert float(full) == pytest.approx(_kl_numpy(s, t, w, 2.0), rel=1e-5)


def test_kd_gradient_matches_finite_differences_and_the_closed_form():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(1, 2, 7))
    t = rng.normal(size=(1, 2, 7))
    w = np.array([[1.0, 0.5]])
    temp = 2.0

    def f(x):
        return kd_loss_sums(x, jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32),
                            temp)["kd"]

    grad = np.asarray(jax.grad(f)(jnp.asarray(s, jnp.float32)))
    # closed form: d/ds [T^2 KL] = T * (softmax(s/T) - softmax(t/T)) * w
    def softmax(x):
        e = np.exp(x / temp - (x / temp).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    np.testing.assert_allclose(grad, temp * (softmax(s) - softmax(t)) * w[..., None],
                               rtol=1e-4, atol=1e-6)
    eps = 1e-2
    fd = np.zeros_like(s)
    for idx in np.ndindex(s.shape):
        d = np.zeros_like(s)
        d[idx] = eps
        fd[idx] = (_kl_numpy(s + d, t, w, temp) - _kl_numpy(s - d, t, w, temp)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)


def test_kd_gradient_wrt_model_parameters_matches_finite_differences():
    """Through a tiny encoder-decoder: the directional derivative of the KD loss along a random
    parameter direction equals <grad, direction>."""
    cfg = tiny_model_config(num_encoder_layers=1, num_decoder_layers=1)
    model = build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(2)
    enc = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 6)), jnp.int32)
    dec = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 4)), jnp.int32)
    teacher = jnp.asarray(rng.normal(size=(2, 4, cfg.vocab_size)) * 3, jnp.float32)
    w = jnp.ones((2, 4))

    def loss(p):
        state = nnx.State(rest)
        m = nnx.merge(graphdef, p, state)
        logits, _ = m(enc, dec)
        return kd_loss_sums(logits, teacher, w, 2.0)["kd"]

    grads = jax.grad(loss)(params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in
                                             zip(keys, leaves)])
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads),
                                                          jax.tree.leaves(direction)))
    eps = 1e-3
    plus = jax.tree.map(lambda p, d: p + eps * d, params, direction)
    minus = jax.tree.map(lambda p, d: p - eps * d, params, direction)
    numeric = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=2e-2)


def test_t_squared_keeps_gradient_size_comparable_across_temperatures():
    rng = np.random.default_rng(4)
    s = jnp.asarray(rng.normal(size=(4, 8, 50)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 8, 50)) * 2, jnp.float32)
    w = jnp.ones((4, 8))
    norms = {}
    for temp in (1.0, 2.0, 4.0, 8.0):
        g = jax.grad(lambda x: kd_loss_sums(x, t, w, temp)["kd"])(s)
        norms[temp] = float(jnp.linalg.norm(g))
    scaled = [norms[temp] for temp in (2.0, 4.0, 8.0)]
    # with T^2 the gradient norms at T = 2, 4, 8 stay within a factor 2 of each other ...
    assert max(scaled) / min(scaled) < 2.0
    # ... whereas without it they would shrink as 1/T^2 (a factor 16 from T=2 to T=8)
    unscaled = [norms[temp] / temp ** 2 for temp in (2.0, 4.0, 8.0)]
    assert unscaled[0] / unscaled[-1] > 8.0


def test_schedules_and_config_validation():
    cfg = DistillConfig("t", alpha=0.8, alpha_warmup_steps=10, alpha_final=0.2,
                        alpha_decay_steps=20, temperature=4.0, temperature_final=1.0,
                        temperature_decay_steps=30)
    assert [round(float(alpha_at(cfg, s)), 4) for s in (0, 5, 10, 20, 30, 100)] == \
        [0.0, 0.4, 0.8, 0.5, 0.2, 0.2]
    assert [float(temperature_at(cfg, s)) for s in (0, 15, 30, 99)] == [4.0, 2.5, 1.0, 1.0]
    plain = DistillConfig("t")
    assert float(alpha_at(plain, 7)) == 0.5 and float(temperature_at(plain, 7)) == 2.0
    for bad in (dict(alpha=1.5), dict(temperature=0.0), dict(alpha_final=0.1),
                dict(teacher_dtype="float16"), dict(teacher_partitioning="zz")):
        with pytest.raises(ConfigError, match="DistillConfig"):
            DistillConfig("t", **bad)
    with pytest.raises(ConfigError, match="TEACHER_MODEL_DIR"):
        DistillConfig("")
    assert slice_vocab(jnp.zeros((1, 1, 10)), 8).shape == (1, 1, 8)


def _packed_row():
    """One packed enc-dec row (two examples + padding) and the two contiguous prefix-LM rows."""
    ex = [([5, 6, 7, 1], [8, 9, 1]), ([10, 11, 1], [12, 1])]
    li, lt = 9, 7
    enc = np.zeros((1, li), np.int32); es = np.zeros_like(enc); ep = np.zeros_like(enc)
    tgt = np.zeros((1, lt), np.int32); ds = np.zeros_like(tgt); dp = np.zeros_like(tgt)
    din = np.zeros_like(tgt)
    i = j = 0
    for k, (inp, tg) in enumerate(ex, start=1):
        enc[0, i:i + len(inp)] = inp; es[0, i:i + len(inp)] = k
        ep[0, i:i + len(inp)] = np.arange(len(inp)); i += len(inp)
        tgt[0, j:j + len(tg)] = tg; ds[0, j:j + len(tg)] = k
        dp[0, j:j + len(tg)] = np.arange(len(tg))
        din[0, j:j + len(tg)] = [0] + tg[:-1]; j += len(tg)
    batch = {"encoder_input_tokens": enc, "encoder_segment_ids": es, "encoder_positions": ep,
             "decoder_input_tokens": din, "decoder_target_tokens": tgt,
             "decoder_segment_ids": ds, "decoder_positions": dp,
             "decoder_loss_weights": (ds != 0).astype(np.int32)}
    return batch, ex


@pytest.mark.parametrize("position_scheme", ["relative", "rope"])
def test_prefix_lm_teacher_sees_each_packed_example_as_its_own_sequence(position_scheme):
    cfg = tiny_model_config(architecture="decoder_only", num_encoder_layers=0,
                            num_decoder_layers=2, position_scheme=position_scheme)
    model = build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    batch, examples = _packed_row()
    tb = prefix_lm_teacher_batch({k: jnp.asarray(v) for k, v in batch.items()})
    logits, _ = model(tb["decoder_input_tokens"], decoder_segment_ids=tb["decoder_segment_ids"],
                      decoder_positions=tb["decoder_positions"],
                      decoder_causal_attention=tb["decoder_causal_attention"])
    aligned = np.asarray(logits[0, batch["encoder_input_tokens"].shape[1]:])
    j = 0
    for inp, tg in examples:
        seq = inp + tg  # SeqIO's PrefixLMFeatureConverter, one example per row
        dec_in = jnp.asarray([[0] + seq[:-1]])
        causal = jnp.asarray([[1] * (len(inp) + 1) + [0] * (len(tg) - 1)])
        ref, _ = model(dec_in, decoder_causal_attention=causal)
        np.testing.assert_allclose(aligned[j:j + len(tg)], np.asarray(ref[0, len(inp):]),
                                   rtol=2e-5, atol=2e-5)
        j += len(tg)


def test_prefix_lm_teacher_batch_unpacked_rows():
    batch = {"encoder_input_tokens": np.array([[5, 6, 1, 0]]),
             "decoder_input_tokens": np.array([[0, 7, 0]]),
             "decoder_target_tokens": np.array([[7, 1, 0]]),
             "decoder_loss_weights": np.array([[1, 1, 0]])}
    tb = prefix_lm_teacher_batch({k: jnp.asarray(v) for k, v in batch.items()})
    assert tb["decoder_input_tokens"].tolist() == [[0, 5, 6, 0, 1, 7, 0]]
    assert tb["decoder_positions"].tolist()[0][:6] == [0, 1, 2, 3, 3, 4]
    assert tb["decoder_causal_attention"].tolist() == [[1, 1, 1, 0, 1, 0, 0]]
    assert tb["decoder_segment_ids"].tolist() == [[1, 1, 1, 0, 1, 1, 0]]


def test_offline_store_round_trip_and_refusals(tmp_path):
    import dataclasses

    from t5lite.errors import UserError
    from t5lite.parallel.hosts import DataShard
    from t5lite.train.offline_teacher import (OfflineTeacherData, check_meta, save_step,
                                              stream_meta, write_meta)

    @dataclasses.dataclass
    class DC:
        mixture_or_task_name: str = "t"
        task_feature_lengths: dict = dataclasses.field(default_factory=lambda: {"targets": 3})
        seed: int = 0
        pack: bool = True
        shuffle: bool = True

    root = str(tmp_path / "logits")
    meta = stream_meta(DC(), 2, "teacher", 4)
    write_meta(root, meta)
    shard = DataShard(index=0, count=1, local_batch_size=2)
    rng = np.random.default_rng(0)
    for pos in range(3):
        save_step(root, shard, pos, rng.normal(size=(2, 3, 4)), rng.integers(0, 9, (2, 3, 4)),
                  rng.normal(size=(2, 3)))

    class Source:
        def train_batches(self, shard, start):
            i = start
            while True:
                yield {"decoder_target_tokens": np.full((2, 3), i)}
                i += 1

    stream = OfflineTeacherData(Source(), root).train_batches(shard, 1)  # a resumed run
    first = next(stream)
    assert first["decoder_target_tokens"][0, 0] == 1
    assert first["teacher_topk_logits"].shape == (2, 3, 4)
    next(stream)
    with pytest.raises(UserError, match="cover fewer steps"):
        next(stream)
    with pytest.raises(UserError, match="seed=0 but this run has seed=1"):
        check_meta(root, stream_meta(DC(seed=1), 2, "teacher", 4))
    with pytest.raises(UserError, match="top-4"):
        write_meta(root, stream_meta(DC(), 2, "teacher", 8))
