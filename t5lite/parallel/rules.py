"""Logical axis names -> mesh axes: one rules table per sharding recipe.

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
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
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


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Map a tree of logical-axis tuples and a matching tree of arrays/ShapeDtypeStructs to
    NamedShardings. Leaves of `logical_tree` are tuples of names (or None = replicated)."""

    def one(axes: Any, leaf: Any) -> NamedSharding:
        shape = getattr(leaf, "shape", ())
        if axes is None:
            axes = (None,) * len(shape)
        return logical_to_sharding(tuple(axes), mesh, rules, shape)

    return jax.tree.map(one, logical_tree, shape_tree,
                        is_leaf=lambda x: x is None or (isinstance(x, tuple) and
                                                        all(isinstance(a, (str, type(None)))
                                                            for a in x)))


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


def active_mesh_and_rules() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) set by the innermost `axis_rules` context, or None."""
    return _ACTIVE.get()


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
