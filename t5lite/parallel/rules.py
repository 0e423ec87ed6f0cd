"""Partitioning: logical axis names -> mesh axes -> shardings, in one place.

This module is the single home of "where does an array live on the mesh":

- recipes (`RECIPES`, `get_rules`): one rules table per sharding recipe;
- single arrays: `logical_to_spec` / `logical_to_sharding`;
- trees: `is_axes` (the leaf test of a logical-axes tree), `axes_to_pure`, `path_key`,
  `tree_shardings` (params and any tree shaped like them) and `opt_state_shardings`
  (optimiser-state leaves inherit the axes of the parameter they belong to);
- tracing: `partitioned(mesh, rules)` sets the mesh and the activation rules, inside which
  `constrain` shards activations by logical names.

Model code names every parameter and main activation dimension with a *logical* axis
(`batch`, `length`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`, `expert`,
`relpos_buckets`, `layers`). A recipe maps those names to *mesh* axes (`dcn`, `data`, `fsdp`,
`tensor`, `expert`). Switching DP <-> FSDP <-> TP is a change of recipe (or mesh shape), never of
model code.

Resolution rules (the same as T5X/flax's):
- rules are tried in order; a logical name may appear in several rules (first usable one wins);
- a mesh axis is used at most once per array: when a rule's mesh axis is already taken by an
  earlier dimension, that rule is skipped (so under FSDP the activation `[batch, length, embed]`
  gets batch -> (data, fsdp) and embed stays replicated, while the parameter `[embed, mlp]` gets
  embed -> fsdp);
- when the array shape is known, mesh axes that do not divide the dimension are dropped
  (a batch of 1 in decoding is simply replicated instead of failing).

Example::

    >>> spec = logical_to_spec(("batch", "length", "embed"), get_rules("fsdp"))
    >>> spec
    PartitionSpec(('dcn', 'data', 'fsdp', 'expert'), None, None)
    >>> logical_to_spec(("embed", "mlp"), get_rules("fsdp_tp"))
    PartitionSpec('fsdp', 'tensor')
    >>> with partitioned(mesh, "fsdp"):
    ...     compiled = jax.jit(step).lower(*args).compile()  # activations constrained
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5lite.errors import ConfigError

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Mesh axes that carry independent examples. `expert` is included: under expert parallelism
# the tokens are spread over the expert axis too, and dispatch exchanges them (all-to-all).
_BATCH_AXES = ("dcn", "data", "fsdp", "expert")
_TENSOR_PARAMS: Rules = (
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)
_EXPERT: Rules = (("expert", "expert"),)

RECIPES: dict[str, Rules] = {
    # data parallel: batch over every data-like axis, parameters replicated.
    "dp": (("batch", _BATCH_AXES),) + _EXPERT,
    # fully sharded data parallel: parameters' embed dimension over fsdp (ZeRO-3 style).
    "fsdp": (("batch", _BATCH_AXES), ("embed", "fsdp")) + _EXPERT,
    # tensor parallel only (Megatron layout): heads / mlp / vocab over tensor, batch replicated.
    "tp": _TENSOR_PARAMS + _EXPERT,
    # data x tensor parallel.
    "dp_tp": (("batch", _BATCH_AXES),) + _TENSOR_PARAMS + _EXPERT,
    # fsdp x tensor parallel: the usual choice for large models on a pod slice.
    "fsdp_tp": (("batch", _BATCH_AXES), ("embed", "fsdp")) + _TENSOR_PARAMS + _EXPERT,
}

# The recipe inference (`t5lite infer`, `Generator`, `load_model`, decode metrics) uses unless
# told otherwise: batch over the data axes, heads / mlp / vocab over `tensor`.
DEFAULT_INFERENCE_RECIPE = "dp_tp"


def get_rules(name_or_rules: str | Rules) -> Rules:
    """The rules table of a recipe name (or a table given explicitly, returned as a tuple)."""
    if isinstance(name_or_rules, str):
        if name_or_rules not in RECIPES:
            raise ConfigError(f"unknown sharding recipe {name_or_rules!r}; choose one of "
                              f"{sorted(RECIPES)} (or pass an explicit rules table).")
        return RECIPES[name_or_rules]
    return tuple((str(k), v if v is None or isinstance(v, str) else tuple(v))
                 for k, v in name_or_rules)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules,
                    mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry `logical_axes`.

    With `mesh`, mesh axes absent from the mesh or of size 1 are left out; with `shape` too,
    mesh axes whose size does not divide the dimension are left out.
    """
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        chosen: tuple[str, ...] = ()
        if name is not None:
            for rule_name, mesh_axes in rules:
                if rule_name != name:
                    continue
                candidate = tuple(a for a in _as_tuple(mesh_axes) if a not in used)
                if len(candidate) != len(_as_tuple(mesh_axes)):
                    continue  # a mesh axis of this rule is taken already: try the next rule
                if mesh is not None:
                    candidate = tuple(a for a in candidate
                                      if a in mesh.shape and mesh.shape[a] > 1)
                    if shape is not None:
                        kept: list[str] = []
                        size = 1
                        for a in candidate:
                            if shape[dim] % (size * mesh.shape[a]) == 0:
                                kept.append(a)
                                size *= mesh.shape[a]
                        candidate = tuple(kept)
                chosen = candidate
                break
        used.update(chosen)
        if not chosen:
            out.append(None)
        elif len(chosen) == 1:
            out.append(chosen[0])
        else:
            out.append(chosen)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def logical_to_sharding(logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules,
                        shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for an array with the given logical axes (and shape)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))


# ---------------------------------------------------------------- trees of logical axes
def is_axes(x: Any) -> bool:
    """True for a leaf of a logical-axes tree: None (replicated) or a tuple of names / Nones."""
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


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Map a tree of logical-axis tuples and a matching tree of arrays/ShapeDtypeStructs to
    NamedShardings (of the same structure: pure dicts or nnx.State). Leaves of `logical_tree`
    are tuples of names (or None = replicated)."""

    def one(axes: Any, leaf: Any) -> NamedSharding:
        shape = getattr(leaf, "shape", ())
        if axes is None:
            axes = (None,) * len(shape)
        return logical_to_sharding(tuple(axes), mesh, rules, shape)

    return jax.tree.map(one, logical_tree, shape_tree, is_leaf=is_axes)


def opt_state_shardings(abstract_opt_state: Any, param_axes: Any, mesh: Mesh,
                        rules: Rules) -> Any:
    """Shardings for an optimiser state: a leaf whose path ends with a parameter's path and
    that has that parameter's rank takes the parameter's logical axes (Adam moments, Adafactor's
    keepdims statistics whose reduced dims have size 1); others (counters) are replicated."""
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


# ---------------------------------------------------------------- activation constraints
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "t5lite_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: str | Rules) -> Iterator[None]:
    """Within this context (while tracing), `constrain` shards activations on `mesh`."""
    token = _ACTIVE.set((mesh, get_rules(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def tracing_on_one_device() -> bool:
    """True unless the code is traced for a multi-device mesh (t5lite's `axis_rules` or
    `jax.set_mesh`): code that loops over the batch rows (a `lax.map`) is only worth it when
    the rows are not sharded."""
    active = _ACTIVE.get()
    if active is not None and active[0].size > 1:
        return False
    return jax.sharding.get_abstract_mesh().size <= 1


@contextlib.contextmanager
def partitioned(mesh: Mesh | None, rules: str | Rules) -> Iterator[None]:
    """The context for tracing / compiling / running sharded code: `jax.set_mesh(mesh)` plus
    `axis_rules(mesh, rules)`. With `mesh=None` it does nothing (single-device code)."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), axis_rules(mesh, rules):
        yield


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `axis_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} names {tuple(logical_axes)} for an "
                         f"array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(
        x, logical_to_sharding(logical_axes, mesh, rules, x.shape))
