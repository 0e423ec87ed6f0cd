"""Sharded forward on 8 simulated CPU devices equals the single-device forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5lite.config import ModelConfig
from t5lite.models import build_model, param_logical_axes
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.parallel.rules import axis_rules, get_rules, tree_shardings

CFG = ModelConfig(vocab_size=128, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                  num_encoder_layers=2, num_decoder_layers=2, relative_num_buckets=8,
                  relative_max_distance=16, num_experts=2, moe_layer_period=2)


def make():
    return build_model(CFG, rngs=nnx.Rngs(params=0))


@pytest.fixture(scope="module")
def reference():
    """Single-device logits and aux (jitted: eager dispatch of many small ops is slow)."""
    graphdef, state = nnx.split(make())
    enc, dec = inputs()
    return jax.jit(lambda s, e, d: nnx.merge(graphdef, s)(e, d))(state, enc, dec)


def inputs():
    rng = np.random.default_rng(0)
    enc = rng.integers(2, 128, size=(8, 16)).astype(np.int32)
    enc[::3, 10:] = 0
    dec = rng.integers(2, 128, size=(8, 8)).astype(np.int32)
    dec[:, 0] = 0
    return jnp.asarray(enc), jnp.asarray(dec)


@pytest.mark.parametrize("recipe, mesh_cfg", [
    ("dp_tp", MeshConfig(data=4, tensor=2)),
    ("fsdp", MeshConfig(data=2, fsdp=4)),
    ("fsdp_tp", MeshConfig(fsdp=2, tensor=2, expert=2)),
])
def test_sharded_forward_equals_single_device(recipe, mesh_cfg, reference):
    assert len(jax.devices()) == 8
    enc, dec = inputs()
    expected, expected_aux = reference

    mesh = make_mesh(mesh_cfg)
    rules = get_rules(recipe)
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = tree_shardings(param_logical_axes(abstract_state), abstract_state, mesh, rules)

    def init():
        return nnx.split(make())[1]

    state = jax.jit(init, out_shardings=shardings)()
    # parameters really are sharded as the rules say
    flat = dict(nnx.to_flat_state(state))
    path = ("encoder", "layers", "layers", 0, "self_attention", "q")  # MoE every 2nd layer
    q = flat[path]
    assert q.sharding.spec == dict(nnx.to_flat_state(shardings))[path].spec
    if recipe == "dp_tp":
        assert "tensor" in str(q.sharding.spec)
    if recipe == "fsdp":
        assert "fsdp" in str(q.sharding.spec)

    @jax.jit
    def forward(state, enc, dec):
        with axis_rules(mesh, rules):
            return nnx.merge(graphdef, state)(enc, dec)

    with jax.set_mesh(mesh):
        logits, aux = forward(state, enc, dec)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=2e-5, rtol=2e-5)
    for name in aux:
        np.testing.assert_allclose(float(aux[name]), float(expected_aux[name]), rtol=1e-5,
                                   atol=1e-7)
