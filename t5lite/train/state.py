"""The train state and where each of its arrays lives on the mesh.

`TrainState` is a plain pytree: the step, the parameters as a nested dict of arrays (the "pure
dict" of the model's `nnx.Param` state), the optimiser state and the base RNG key (raw uint32
key data, so it checkpoints like any array). Dropout keys are derived from `(rng, step)`, so a
resumed run draws exactly the masks the uninterrupted run would have drawn.

Shardings come from logical axis names: parameters use `param_logical_axes` of the model;
optimiser-state leaves inherit the axes of the parameter whose path they end with, when they have
the parameter's rank (Adam moments, Adafactor's keepdims statistics whose reduced dims have size
1 and are therefore not split). Everything else (counters, scalars) is replicated.

Example::

    >>> shardings = train_state_shardings(abstract_state, param_axes, mesh, get_rules("fsdp"))
    >>> shardings.params["decoder"]["logits_dense"]["kernel"].spec
    PartitionSpec('fsdp',)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5lite.parallel.rules import Rules, logical_to_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a training step reads and writes (checkpointed as a whole)."""

    step: jax.Array  # int32 scalar: number of optimiser updates done
    params: Any  # nested dict of f32 arrays (pure dict of the model's nnx.Param state)
    opt_state: Any  # optax state
    rng: jax.Array  # uint32[2]: base key data; dropout of step t uses fold_in(rng, t)


def is_axes(x: Any) -> bool:
    """True for a leaf of a logical-axes tree: None or a tuple of names / Nones."""
    return x is None or (isinstance(x, tuple) and all(isinstance(a, (str, type(None)))
                                                      for a in x))


def path_key(path: tuple) -> tuple[str, ...]:
    """A tree path as a tuple of plain strings (DictKey/GetAttrKey/SequenceKey alike)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def to_pure(state: Any) -> Any:
    """nnx.State -> nested dict of arrays (identity for anything else)."""
    if isinstance(state, nnx.State):
        return nnx.to_pure_dict(state)
    return state


def axes_to_pure(axes_tree: Any) -> Any:
    """A logical-axes tree shaped like an nnx.State -> nested dict of axis tuples."""
    if isinstance(axes_tree, nnx.State):
        axes_tree = nnx.to_pure_dict(axes_tree)

    def walk(node: Any) -> Any:
        if is_axes(node):
            return node
        if isinstance(node, nnx.Variable):
            return walk(node.get_value() if hasattr(node, "get_value") else node[...])
        if hasattr(node, "items"):
            return {k: walk(v) for k, v in node.items()}
        raise TypeError(f"unexpected node {type(node).__name__} in a logical-axes tree")

    return walk(axes_tree)


def param_shardings(abstract_params: Any, param_axes: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a pure-dict params tree from its logical axes."""

    def one(axes, leaf):
        axes = axes if axes is not None else (None,) * len(leaf.shape)
        return logical_to_sharding(tuple(axes), mesh, rules, leaf.shape)

    return jax.tree.map(one, param_axes, abstract_params, is_leaf=is_axes)


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_axes: Any,
                        mesh: Mesh, rules: Rules) -> Any:
    """Shardings for an optimiser state: a leaf whose path ends with a parameter's path and
    that has that parameter's rank takes the parameter's logical axes; others are replicated."""
    by_path: dict[tuple[str, ...], tuple] = {}
    for path, axes in jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=is_axes)[0]:
        by_path[path_key(path)] = axes
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        key = path_key(path)
        for start in range(len(key)):
            axes = by_path.get(key[start:])
            if axes is not None and len(axes) == len(leaf.shape):
                return logical_to_sharding(tuple(axes), mesh, rules, leaf.shape)
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def train_state_shardings(abstract_state: TrainState, param_axes: Any, mesh: Mesh,
                          rules: Rules) -> TrainState:
    """A TrainState of NamedShardings matching `abstract_state`."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=replicated,
        params=param_shardings(abstract_state.params, param_axes, mesh, rules),
        opt_state=opt_state_shardings(abstract_state.opt_state, abstract_state.params,
                                      param_axes, mesh, rules),
        rng=replicated,
    )


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings (targets for restore / init)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def rng_data(seed: int) -> jax.Array:
    """uint32[2] key data of `jax.random.key(seed)` (threefry)."""
    return jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
