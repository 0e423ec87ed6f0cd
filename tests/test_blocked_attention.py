"""The blocked CPU attention core computes the einsum core's function, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.models.attention import attention_core, einsum_attention_core
from t5lite.models.blocked_attention import blocked_attention_core, rows_per_step
from t5lite.models.masks import key_padding_mask, segment_mask

B, T, S, D = 2, 5, 7, 4


def _inputs(heads: int, kv_heads: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, heads, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, kv_heads, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, kv_heads, D)), dtype)
    return q, k, v, rng


def _bias(rng, rows: int, heads: int):
    return jnp.asarray(rng.standard_normal((rows, heads, T, S)), jnp.float32)


def _masks():
    valid = jnp.array([[True] * S, [True] * 4 + [False] * 3])
    segments_q = jnp.array([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    segments_k = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0]])
    # the last query row of the first element sees no key at all (fully masked row)
    return {"none": None, "padding": key_padding_mask(valid),
            "segments": segment_mask(segments_q, segments_k),
            # shared by all rows, [1, 1, T, S]: query t sees keys <= t + 2
            "shared": (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + 2)[None, None]}


CASES = [  # (heads, kv_heads, bias rows, bias heads, mask)
    (4, 4, 1, 4, "padding"), (4, 4, None, None, "none"), (4, 2, 1, 4, "segments"),
    (6, 2, B, 6, "padding"), (4, 1, 1, 1, "segments"), (4, 2, B, 1, "none"),
    (4, 2, 1, 4, "shared"), (2, 2, B, 2, "shared"),
]


def _written_out_loop(q, k, v, *, bias, mask):
    """The bfloat16 path's loop with its hand-written backward (`_core`), on any dtype."""
    from t5lite.models.blocked_attention import _core, _Plan

    plan = _Plan(batch=q.shape[0], q_len=q.shape[1], seq=k.shape[1], num_heads=q.shape[2],
                 kv_heads=k.shape[2], per_step=rows_per_step(q.shape[0], jnp.bfloat16))
    return _core(plan, q, k, v, bias, mask)


@pytest.mark.parametrize("written_out", [False, True])
@pytest.mark.parametrize("heads,kv_heads,bias_rows,bias_heads,mask_name", CASES)
def test_values_and_gradients_match_the_einsum_core(heads, kv_heads, bias_rows, bias_heads,
                                                   mask_name, written_out):
    """float32 values and gradients of q, k, v and the bias, for the float32 path (JAX
    differentiates the loop) and for the bfloat16 path's written-out backward loop."""
    core = _written_out_loop if written_out else blocked_attention_core
    q, k, v, rng = _inputs(heads, kv_heads, jnp.float32)
    bias = None if bias_rows is None else _bias(rng, bias_rows, bias_heads)
    mask = _masks()[mask_name]
    weights = jnp.asarray(rng.standard_normal((B, T, heads, D)), jnp.float32)

    def loss(core, q, k, v, bias):
        return jnp.sum(core(q, k, v, bias=bias, mask=mask) * weights)

    want = einsum_attention_core(q, k, v, bias=bias, mask=mask)
    got = jax.jit(lambda *a: core(*a, bias=bias, mask=mask))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    argnums = (1, 2, 3, 4) if bias is not None else (1, 2, 3)
    grads_want = jax.grad(loss, argnums)(einsum_attention_core, q, k, v, bias)
    grads_got = jax.jit(jax.grad(loss, argnums), static_argnums=0)(core, q, k, v, bias)
    for name, g, w in zip("qkvb", grads_got, grads_want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_rows_per_step():
    assert [rows_per_step(b, jnp.float32) for b in (1, 2, 3, 4, 6, 8, 9)] == [1, 2, 3, 4, 3, 4, 3]
    assert [rows_per_step(b, jnp.bfloat16) for b in (1, 2, 3, 4, 6, 8)] == [1, 2, 1, 2, 2, 2]


@pytest.mark.parametrize("batch", [1, 3, 4, 6, 8])
def test_any_number_of_rows_per_step_gives_the_einsum_core(batch):
    """Rows grouped 1, 3 or 4 per loop step (float32), with a bias and a mask per row, give the
    einsum core's values and gradients."""
    rng = np.random.default_rng(batch)
    q = jnp.asarray(rng.standard_normal((batch, T, 4, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, S, 2, D)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.standard_normal((batch, 4, T, S)), jnp.float32)
    mask = key_padding_mask(jnp.arange(S)[None, :] < rng.integers(1, S + 1, (batch, 1)))
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(core, q, k, v, bias):
        return jnp.sum(core(q, k, v, bias=bias, mask=mask) * weights)

    want = einsum_attention_core(q, k, v, bias=bias, mask=mask)
    got = jax.jit(lambda *a: blocked_attention_core(*a, bias=bias, mask=mask))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grads_want = jax.grad(loss, (1, 2, 3, 4))(einsum_attention_core, q, k, v, bias)
    grads_got = jax.jit(jax.grad(loss, (1, 2, 3, 4)), static_argnums=0)(
        blocked_attention_core, q, k, v, bias)
    for name, g, w in zip("qkvb", grads_got, grads_want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_bfloat16_stays_bfloat16_and_close():
    q, k, v, rng = _inputs(4, 2, jnp.bfloat16, seed=1)
    bias = _bias(rng, 1, 4)
    mask = _masks()["segments"]
    got = blocked_attention_core(q, k, v, bias=bias, mask=mask)
    want = einsum_attention_core(q, k, v, bias=bias, mask=mask)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32),
                               rtol=2e-2, atol=2e-2)
    grad = jax.grad(lambda q: jnp.sum(blocked_attention_core(q, k, v, bias=bias, mask=mask)
                                      .astype(jnp.float32)))(q)
    assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))


def test_backward_keeps_no_probabilities():
    """Between the passes the blocked core keeps q, k, v, bias and mask, nothing [heads, T, S]
    per row; the einsum core keeps its float32 probabilities."""
    rng = np.random.default_rng(2)
    length, heads = 16, 4
    q, k, v = (jnp.asarray(rng.standard_normal((B, length, heads, D)), jnp.float32)
               for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((1, heads, length, length)), jnp.float32)
    mask = key_padding_mask(jnp.ones((B, length), bool))
    probabilities = B * heads * length * length

    def largest_residual(core) -> int:
        _, residuals = jax.vjp(lambda q, k, v: core(q, k, v, bias=bias, mask=mask), q, k, v)
        return max(x.size for x in jax.tree.leaves(residuals) if hasattr(x, "size"))

    assert largest_residual(einsum_attention_core) >= probabilities
    assert largest_residual(blocked_attention_core) <= max(q.size, bias.size) < probabilities


def _uses_blocks(fn, *args) -> bool:
    # a fresh function each time: jax caches traces by function, not by t5lite's context
    return "scan" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))  # lax.map is a scan


def test_the_model_core_takes_blocks_on_one_cpu_device_only():
    """attention_core runs blocks on CPU for long sequences, traced for one device and without
    probability dropout; short sequences, dropout, a multi-device mesh or another target keep
    the einsum core."""
    from t5lite.models.target import compile_target

    rng = np.random.default_rng(3)
    long_q, long_kv = (jnp.asarray(rng.standard_normal((2, 64, 2, 4)), jnp.float32)
                       for _ in range(2))
    short = jnp.asarray(rng.standard_normal((2, 8, 2, 4)), jnp.float32)

    def core(q, kv, **kw):
        return attention_core(q, kv, kv, bias=None, mask=None, **kw)

    assert _uses_blocks(core, long_q, long_kv)
    assert not _uses_blocks(core, short, short)
    assert not _uses_blocks(lambda q, kv: core(q, kv, dropout_rate=0.1,
                                               dropout_key=jax.random.key(0)), long_q, long_kv)
    with compile_target("tpu"):
        assert not _uses_blocks(core, long_q, long_kv)
    mesh = jax.make_mesh((2,), ("data",))
    with jax.set_mesh(mesh):
        assert not _uses_blocks(core, long_q, long_kv)
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with jax.set_mesh(one):
        assert _uses_blocks(core, long_q, long_kv)


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_packed_model_loss_and_gradients_match_with_blocks(monkeypatch, remat_policy):
    """A whole packed encoder-decoder (scanned layers, relative bias, segment masks) gives the
    same logits and parameter gradients whichever core runs its attention."""
    from flax import nnx

    from t5lite.config import ModelConfig
    from t5lite.models import attention, build_model

    cfg = ModelConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                      num_encoder_layers=2, num_decoder_layers=2, dtype="float32",
                      remat_policy=remat_policy)
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    rng = np.random.default_rng(4)
    enc = jnp.asarray(rng.integers(2, 64, size=(2, 64)), jnp.int32)
    dec = jnp.asarray(rng.integers(2, 64, size=(2, 64)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 40 + [2] * 20 + [0] * 4], 2, axis=0), jnp.int32)

    def loss(model):
        logits, _ = model(enc, dec, encoder_segment_ids=segments, decoder_segment_ids=segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

    def run():  # a fresh jit each time: the choice of core is made while tracing
        return jax.jit(lambda m: nnx.value_and_grad(loss, has_aux=True)(m))(model)

    assert attention.takes_blocks(64, 64)
    (_, blocked_logits), blocked_grads = run()
    monkeypatch.setattr(attention, "_BLOCKED_MIN_LOGITS", 1 << 40)
    assert not attention.takes_blocks(64, 64)
    (_, einsum_logits), einsum_grads = run()
    np.testing.assert_allclose(blocked_logits, einsum_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(nnx.state(blocked_grads)),
                         jax.tree.leaves(nnx.state(einsum_grads))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
