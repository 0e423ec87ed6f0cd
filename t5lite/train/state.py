"""The train state and where each of its arrays lives on the mesh.

`TrainState` is a plain pytree: the step, the parameters as a nested dict of arrays (the "pure
dict" of the model's `nnx.Param` state), the optimiser state and the base RNG key (raw uint32
key data, so it checkpoints like any array). Dropout keys are derived from `(rng, step)`, so a
resumed run draws exactly the masks the uninterrupted run would have drawn.

Shardings come from logical axis names through `t5lite.parallel.rules` (`tree_shardings` for
the parameters, `opt_state_shardings` for the optimiser state: its leaves inherit the axes of
the parameter they belong to). The step and the RNG key are replicated.

Example::

    >>> shardings = train_state_shardings(abstract_state, param_axes, mesh, get_rules("fsdp"))
    >>> shardings.params["decoder"]["logits_dense"]["kernel"].spec
    PartitionSpec('fsdp',)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5lite.parallel.rules import Rules, opt_state_shardings, tree_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a training step reads and writes (checkpointed as a whole)."""

    step: jax.Array  # int32 scalar: number of optimiser updates done
    params: Any  # nested dict of f32 arrays (pure dict of the model's nnx.Param state)
    opt_state: Any  # optax state
    rng: jax.Array  # uint32[2]: base key data; dropout of step t uses fold_in(rng, t)


def train_state_shardings(abstract_state: TrainState, param_axes: Any, mesh: Mesh,
                          rules: Rules) -> TrainState:
    """A TrainState of NamedShardings matching `abstract_state`."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=replicated,
        params=tree_shardings(param_axes, abstract_state.params, mesh, rules),
        opt_state=opt_state_shardings(abstract_state.opt_state, param_axes, mesh, rules),
        rng=replicated,
    )


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings (targets for restore / init)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
