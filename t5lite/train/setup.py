"""Everything a run needs before its first step: the abstract model, shardings, optimiser, the
jitted step functions, and where the train state comes from.

The state is born sharded: shapes come from `jax.eval_shape` (no memory), shardings from the
logical axes, and the state is created by a jit whose `out_shardings` are those shardings, so no
host ever holds the whole model.

Where the first state comes from (`plan_start`, which only reads):

1. a checkpoint in `model_dir` — it wins over `init_from` (a restarted or preempted run must
   continue, not start over). A full checkpoint restores everything (params, optimiser state,
   step, RNG, data position); a params-only checkpoint restores the parameters and builds a
   fresh optimiser state;
2. else `init_from` — parameters only (fine-tuning), step 0, fresh optimiser state;
3. else a fresh initialisation from the seed.

A checkpoint whose parameter shapes do not match the config is refused with a message naming the
first mismatching parameter, before anything in the model dir is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5lite import checkpoint
from t5lite.config import ModelConfig
from t5lite.errors import ConfigError
from t5lite.models import build_model, param_logical_axes
from t5lite.parallel.rules import (Rules, axes_to_pure, get_rules, logical_to_sharding,
                                   partitioned)
from t5lite.train.config import TrainConfig
from t5lite.train.optim import make_optimizer
from t5lite.train.state import TrainState, abstract_with_shardings, train_state_shardings
from t5lite.train.steps import (make_apply_fn, make_eval_step, make_train_step,
                                  new_train_state)


@dataclasses.dataclass
class TrainSetup:
    """The compiled pieces of a run on one mesh."""

    model_config: ModelConfig
    train_config: TrainConfig
    mesh: Mesh
    rules: Rules
    graphdef: nnx.GraphDef
    rest: nnx.State  # non-parameter model state (RNG streams), replicated
    param_axes: Any  # pure dict of logical-axis tuples
    abstract_state: TrainState  # ShapeDtypeStructs carrying the target shardings
    state_shardings: TrainState
    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]
    batch_sharding: NamedSharding  # for [batch] (and, extended, [batch, length]) arrays
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[Any, dict], dict]
    fresh_state: Callable[[], TrainState]
    state_from_params: Callable[[Any, Any], TrainState]

    def model(self, params: Any) -> nnx.Module:
        """The NNX model with these parameters (for evaluation hooks such as decoding)."""
        return nnx.merge(self.graphdef, params, self.rest)

    def traced(self):
        """Context for tracing/compiling: the mesh and the logical-axis rules."""
        return partitioned(self.mesh, self.rules)


def batch_axes_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split on `mesh` under `rules`."""
    spec = logical_to_sharding(("batch",), mesh, rules).spec
    axes = spec[0] if len(spec) else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def make_setup(model_config: ModelConfig, train_config: TrainConfig, mesh: Mesh) -> TrainSetup:
    """Abstract model, shardings, optimiser and jitted step functions (nothing allocated yet)."""
    rules = get_rules(train_config.partitioning)
    split = batch_axes_size(mesh, rules)
    micro = train_config.batch_size // train_config.microbatches
    if micro % split != 0:
        raise ConfigError(
            f"batch size {train_config.batch_size} (microbatches of {micro}) is not divisible "
            f"by the {split} data-parallel positions of mesh {dict(mesh.shape)} under "
            f"partitioning={train_config.partitioning!r}; choose a batch size that is a "
            f"multiple of {split * train_config.microbatches}.")
    seed = train_config.seed

    def build() -> nnx.Module:
        return build_model(model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

    abstract_model = nnx.eval_shape(build)
    graphdef, abs_params_state, _ = nnx.split(abstract_model, nnx.Param, ...)
    param_axes = axes_to_pure(param_logical_axes(abs_params_state))
    abs_params = nnx.to_pure_dict(abs_params_state)
    tx, schedule = make_optimizer(train_config.optimizer, abs_params, param_axes,
                                  total_steps=train_config.train_steps)

    abstract_state = jax.eval_shape(lambda p: new_train_state(p, tx, seed), abs_params)
    shardings = train_state_shardings(abstract_state, param_axes, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = logical_to_sharding(("batch",), mesh, rules, (train_config.batch_size,))

    def fresh() -> TrainState:
        model = build()
        params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
        return new_train_state(params, tx, seed)

    def rest_only() -> nnx.State:
        return nnx.split(build(), nnx.Param, ...)[2]

    with partitioned(mesh, rules):
        abs_rest = jax.eval_shape(rest_only)
        rest_shardings = jax.tree.map(lambda _: replicated, abs_rest)
        rest = jax.jit(rest_only, out_shardings=rest_shardings)()
        apply_fn = make_apply_fn(graphdef, rest)
        step_fn = make_train_step(apply_fn, tx, schedule, train_config.loss,
                                  train_config.microbatches)
        train_step = jax.jit(step_fn, in_shardings=(shardings, None),
                             out_shardings=(shardings, replicated), donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(apply_fn), in_shardings=(shardings.params, None),
                            out_shardings=replicated)
        fresh_state = jax.jit(fresh, out_shardings=shardings)
        from_params = jax.jit(lambda p, step: new_train_state(p, tx, seed, step),
                              in_shardings=(shardings.params, None), out_shardings=shardings)

    def run_traced(fn):
        def wrapped(*args):
            with partitioned(mesh, rules):
                return fn(*args)

        return wrapped

    return TrainSetup(
        model_config=model_config, train_config=train_config, mesh=mesh, rules=rules,
        graphdef=graphdef, rest=rest, param_axes=param_axes,
        abstract_state=abstract_with_shardings(abstract_state, shardings),
        state_shardings=shardings, tx=tx, schedule=schedule, batch_sharding=batch_sharding,
        train_step=run_traced(train_step), eval_step=run_traced(eval_step),
        fresh_state=run_traced(fresh_state), state_from_params=run_traced(from_params))


# ---------------------------------------------------------------- where the state comes from

@dataclasses.dataclass(frozen=True)
class StartPlan:
    source: str  # "checkpoint" | "checkpoint_params" | "init_from" | "scratch"
    path: str | None
    step: int | None
    reason: str


def plan_start(setup: TrainSetup, model_dir: str, init_from: str | None) -> StartPlan:
    """Decide (read-only) where the first train state comes from; validate shapes."""
    abs_params = setup.abstract_state.params
    latest = checkpoint.latest_step(model_dir)
    if latest is not None:
        checkpoint.check_params_compatible(model_dir, abs_params, latest)
        kind = checkpoint.checkpoint_kind(model_dir, latest)
        also = f"; init_from={init_from} is ignored because" if init_from else "; "
        if kind == "train":
            return StartPlan("checkpoint", model_dir, latest,
                             f"resuming from the checkpoint of step {latest} in {model_dir}"
                             f"{also} a checkpoint in model_dir always wins (restarts continue)")
        return StartPlan("checkpoint_params", model_dir, latest,
                         f"starting from the params-only checkpoint of step {latest} in "
                         f"{model_dir} with a fresh optimiser state{also} a checkpoint in "
                         "model_dir always wins")
    if init_from:
        step = checkpoint.check_params_compatible(init_from, abs_params)
        return StartPlan("init_from", init_from, step,
                         f"no checkpoint in {model_dir}: taking the parameters of step {step} "
                         f"from init_from={init_from}; optimiser state, step and data "
                         "position start fresh")
    return StartPlan("scratch", None, None,
                     f"no checkpoint in {model_dir} and no init_from: initialising from seed "
                     f"{setup.train_config.seed}")


def load_start(setup: TrainSetup, plan: StartPlan,
               checkpointer: checkpoint.TrainCheckpointer) -> tuple[TrainState, int]:
    """(train state, data position) according to `plan`."""
    if plan.source == "checkpoint":
        state, meta = checkpointer.restore(plan.step, setup.abstract_state)
        return state, int(meta.get("data_position", 0))
    if plan.source in ("checkpoint_params", "init_from"):
        params = checkpoint.restore_params(plan.path, setup.abstract_state.params,
                                           setup.state_shardings.params, plan.step)
        step = plan.step if plan.source == "checkpoint_params" else 0
        return setup.state_from_params(params, step), 0
    return setup.fresh_state(), 0
