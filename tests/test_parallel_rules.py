"""Logical-axis rules and mesh construction."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from t5lite.errors import ConfigError
from t5lite.parallel.mesh import MeshConfig, make_mesh
from t5lite.parallel.rules import RECIPES, get_rules, logical_to_spec


def test_fsdp_activation_embed_not_sharded_twice():
    rules = get_rules("fsdp")
    assert logical_to_spec(("batch", "length", "embed"), rules) == P(
        ("dcn", "data", "fsdp", "expert"))
    assert logical_to_spec(("embed", "mlp"), rules) == P("fsdp")


def test_fsdp_tp_param_spec():
    assert logical_to_spec(("embed", "mlp"), get_rules("fsdp_tp")) == P("fsdp", "tensor")
    assert logical_to_spec(("mlp", "embed"), get_rules("fsdp_tp")) == P("tensor", "fsdp")


def test_mesh_drops_size_one_and_non_dividing_axes():
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    rules = get_rules("dp_tp")
    assert logical_to_spec(("batch", "length", "embed"), rules, mesh, (8, 5, 3)) == P("data")
    # a batch of 2 cannot be split 4 ways: replicated instead of an error
    assert logical_to_spec(("batch", "length"), rules, mesh, (2, 5)) == P()
    assert logical_to_spec(("embed", "heads", "kv"), rules, mesh, (16, 4, 8)) == P(None, "tensor")


def test_mesh_rest_axis_and_errors():
    assert jax.device_count() == 8
    assert dict(make_mesh(MeshConfig(data=-1, tensor=2)).shape)["data"] == 4
    with pytest.raises(ConfigError, match="does not divide 8 devices"):
        make_mesh(MeshConfig(data=-1, tensor=3))
    with pytest.raises(ConfigError, match="8 devices"):
        make_mesh(MeshConfig(data=2, tensor=2))
    with pytest.raises(ConfigError, match="unknown sharding recipe"):
        get_rules("zero3")
    assert set(RECIPES) == {"dp", "fsdp", "tp", "dp_tp", "fsdp_tp"}
