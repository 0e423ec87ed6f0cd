"""t5lite.models.matmul.einsum: same values and gradients as jnp.einsum; on CPU, 16-bit float
dots are float32-result dots (XLA:CPU's fast path) forward and backward."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.models.matmul import (_as_matmul, accumulated_einsum, einsum, expand_ellipsis,
                                  uses_fast_accumulation)

CASES = [  # the model's weight matmuls (2D after reshapes), then batched forms (plain einsum)
    ("btd,df->btf", (2, 5, 8), (8, 6)),
    ("...d,df->...f", (2, 5, 8), (8, 6)),
    ("btd,dnh->btnh", (2, 5, 8), (8, 3, 4)),
    ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 8)),
    ("...d,vd->...v", (2, 5, 8), (11, 8)),
    ("btkgh,bskh->bkgts", (2, 5, 1, 3, 4), (2, 7, 1, 4)),
    ("gsec,gsd->egcd", (2, 5, 3, 2), (2, 5, 8)),
]


def _operands(a_shape, b_shape, dtype):
    ka, kb = jax.random.split(jax.random.key(0))
    return (jax.random.normal(ka, a_shape).astype(dtype),
            jax.random.normal(kb, b_shape).astype(dtype))


def test_expand_ellipsis():
    assert expand_ellipsis("...d,df->...f", 3, 2) == ("ABd", "df", "ABf")
    assert expand_ellipsis("btd,df->btf", 3, 2) == ("btd", "df", "btf")


def test_which_einsums_are_one_matmul():
    assert _as_matmul("btd", "dnh", "btnh") == (1, False)
    assert _as_matmul("btnh", "nhd", "btd") == (2, False)
    assert _as_matmul("btd", "vd", "btv") == (1, True)
    assert _as_matmul("btkgh", "bskh", "bkgts") is None  # batch letters
    assert _as_matmul("btd", "df", "tbf") is None  # output reordered
    assert _as_matmul("ij", "jk", "i") is None  # k summed inside one operand


@pytest.mark.parametrize("eqn,a_shape,b_shape", CASES)
@pytest.mark.parametrize("preferred", [None, jnp.float32])
def test_values_match_jnp_einsum(eqn, a_shape, b_shape, preferred):
    if preferred is not None and _as_matmul(*expand_ellipsis(eqn, len(a_shape),
                                                             len(b_shape))) is None:
        pytest.skip("plain jnp.einsum; XLA:CPU cannot run some batched bf16 -> f32 dots")
    a, b = _operands(a_shape, b_shape, jnp.bfloat16)
    ours = einsum(eqn, a, b, preferred_element_type=preferred)
    ref = jnp.einsum(eqn, a.astype(jnp.float32), b.astype(jnp.float32))
    assert ours.dtype == (preferred or jnp.bfloat16)
    # one rounding of the float32 sum: within half a bfloat16 ulp of the exact product sums
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref), rtol=2 ** -8,
                               atol=1e-6)
    if preferred is None:
        np.testing.assert_allclose(np.asarray(ours, np.float32),
                                   np.asarray(jnp.einsum(eqn, a, b), np.float32),
                                   rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("eqn,a_shape,b_shape", CASES)
def test_gradients_match_jnp_einsum(eqn, a_shape, b_shape):
    a, b = _operands(a_shape, b_shape, jnp.bfloat16)
    cot = jax.random.normal(jax.random.key(1), jnp.einsum(eqn, a, b).shape)

    def loss(fn, x, y):
        return jnp.sum(fn(eqn, x, y).astype(jnp.float32) * cot)

    ours = jax.grad(lambda x, y: loss(einsum, x, y), argnums=(0, 1))(a, b)
    ref = jax.grad(lambda x, y: loss(jnp.einsum, x, y), argnums=(0, 1))(
        a.astype(jnp.float32), b.astype(jnp.float32))
    for g, r, x in zip(ours, ref, (a, b)):
        assert g.dtype == x.dtype and g.shape == x.shape
        # the cotangent is rounded to bfloat16 once, and so is each gradient
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), rtol=2 ** -6,
                                   atol=2e-2)


def test_float32_operands_are_plain_einsum():
    a, b = _operands((2, 5, 8), (8, 6), jnp.float32)
    assert not uses_fast_accumulation(a, b)
    np.testing.assert_array_equal(einsum("btd,df->btf", a, b), jnp.einsum("btd,df->btf", a, b))


def test_accumulated_einsum_values():
    a, b = _operands((2, 1, 3, 5, 7), (2, 7, 1, 4), jnp.bfloat16)
    ours = accumulated_einsum("bkgts,bskh->btkgh", a, b)
    ref = jnp.einsum("bkgts,bskh->btkgh", a.astype(jnp.float32), b.astype(jnp.float32))
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref), rtol=2 ** -8,
                               atol=1e-6)


def test_single_operand_sums_fall_back_to_jnp_einsum():
    """A letter summed inside one operand has no einsum-shaped gradient: plain jnp.einsum."""
    a, b = _operands((3, 4), (4, 5), jnp.bfloat16)
    out = einsum("ij,jk->i", a, b)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(jnp.einsum("ij,jk->i", a, b), np.float32))
    g = jax.grad(lambda x: jnp.sum(einsum("ij,jk->i", x, b).astype(jnp.float32)))(a)
    assert g.shape == a.shape


def _dot_types(text: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of every dot_general in StableHLO text."""
    elem = r"tensor<(?:[0-9]+x)*(\w+)>"
    return re.findall(rf"stablehlo\.dot_general.*?:\s*\({elem},\s*{elem}\)\s*->\s*{elem}", text)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU fast path")
def test_cpu_forward_and_backward_dots_are_bf16_in_f32_out():
    a, b = _operands((4, 6, 8), (8, 16), jnp.bfloat16)

    def step(fn):
        return jax.jit(jax.value_and_grad(
            lambda x, y: jnp.sum(fn("btd,df->btf", x, y).astype(jnp.float32)),
            argnums=(0, 1))).lower(a, b).as_text()

    ours = _dot_types(step(einsum))
    assert len(ours) == 3, ours  # forward, d a, d b
    assert all(t == ("bf16", "bf16", "f32") for t in ours), ours
    plain = _dot_types(step(jnp.einsum))
    assert len(plain) == 3 and all(t[2] == "bf16" for t in plain), plain  # the slow path


MODEL_VARIANTS = {
    "t5_1_1": {},
    "modern": dict(position_scheme="rope", num_kv_heads=2, activation="silu"),
    "moe": dict(num_experts=2),
}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU fast path")
@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
def test_bfloat16_model_gradients_through_the_fast_path(variant, monkeypatch):
    """A bfloat16 train step of tiny models (every matmul form the model has, forward and
    backward) runs on CPU, and its loss and gradients are as close to the float32 model's as the
    plain bfloat16 path's are."""
    from flax import nnx

    from t5lite.config import ModelConfig
    from t5lite.models import build_model
    from t5lite.models import matmul

    base = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48,
                num_encoder_layers=2, num_decoder_layers=2, relative_num_buckets=8,
                relative_max_distance=16)
    cfg = ModelConfig(**{**base, **MODEL_VARIANTS[variant]})
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(2, 64, size=(2, 12)), jnp.int32)
    dec = jnp.asarray(np.c_[np.zeros((2, 1)), rng.integers(2, 64, size=(2, 6))], jnp.int32)

    def loss_and_grads(dtype):
        model = build_model(cfg.replace(dtype=dtype), rngs=nnx.Rngs(params=0))

        def loss(m):
            logits, _ = m(enc, dec)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 3])

        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return float(value), jax.tree.leaves(nnx.to_pure_dict(grads))

    ref_loss, ref = loss_and_grads("float32")
    fast_loss, fast = loss_and_grads("bfloat16")
    monkeypatch.setattr(matmul, "uses_fast_accumulation", lambda a, b: False)
    plain_loss, plain = loss_and_grads("bfloat16")

    def error(grads):
        return max(float(jnp.linalg.norm(g - r) / (jnp.linalg.norm(r) + 1e-12))
                   for g, r in zip(grads, ref))

    assert abs(fast_loss - ref_loss) <= 2 * abs(plain_loss - ref_loss) + 2e-3
    assert error(fast) <= 2 * error(plain) + 1e-2, (error(fast), error(plain))


def test_compile_target_picks_the_traced_backends_paths():
    """`t5lite plan` traces for TPU devices from a CPU host: inside `compile_target("tpu")` the
    CPU-only matmul form is off, and `compile_and_measure(platform=...)` traces in it."""
    from t5lite.models.target import compile_target, target_backend
    from t5lite.plan.train import compile_and_measure

    a, b = _operands((4, 6, 8), (8, 16), jnp.bfloat16)
    fn = jax.jit(lambda x, y: einsum("btd,df->btf", x, y))
    with compile_target("tpu"):
        assert target_backend() == "tpu" and not uses_fast_accumulation(a, b)
        tpu_dots = _dot_types(fn.lower(a, b).as_text())
    assert tpu_dots == [("bf16", "bf16", "bf16")]
    assert target_backend() == jax.default_backend()
    seen = []

    def lower():
        seen.append(target_backend())
        return jax.jit(lambda x: x + 1).lower(jnp.ones(3))

    compile_and_measure(lower, None, platform="tpu")
    compile_and_measure(lower, None)
    assert seen == ["tpu", jax.default_backend()]
