"""Everything a run needs before its first step: the abstract model, shardings, optimiser, the
jitted step functions, and where the train state comes from. Evaluation alone
(`make_eval_setup`) gets the model, parameter shardings and eval step without an optimiser.

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
from t5lite.models.compute_cast import step_param_cast
from t5lite.parallel.rules import (Rules, axes_to_pure, get_rules, logical_to_sharding,
                                   partitioned, tree_shardings)
from t5lite.train.config import TrainConfig
from t5lite.train.init_from import check_init_from_config
from t5lite.train.optim import make_optimizer
from t5lite.train.teacher import make_distillation
from t5lite.train.state import TrainState, abstract_with_shardings, train_state_shardings
from t5lite.train.steps import make_apply_fn, make_eval_step, make_train_step, new_train_state


@dataclasses.dataclass(kw_only=True)
class EvalSetup:
    """What evaluation needs on one mesh (no optimiser): sharded parameters' targets, the
    batch sharding and the jitted teacher-forced eval step.

    Example::

        >>> setup = make_eval_setup(model_config, mesh, partitioning="dp", batch_size=32)
        >>> params = checkpoint.restore_params(model_dir, setup.abstract_params,
        ...                                    setup.param_shardings, step)
        >>> Evaluator(setup.eval_step, setup.batch_sharding, 32)(params, batches)
    """

    model_config: ModelConfig
    mesh: Mesh
    rules: Rules
    graphdef: nnx.GraphDef
    rest: nnx.State  # non-parameter model state (RNG streams), replicated
    param_axes: Any  # pure dict of logical-axis tuples
    abstract_params: Any  # ShapeDtypeStructs carrying the target shardings
    param_shardings: Any
    batch_sharding: NamedSharding  # for [batch] (and, extended, [batch, length]) arrays
    eval_step: Callable[[Any, dict], dict]

    def model(self, params: Any) -> nnx.Module:
        """The NNX model with these parameters (for evaluation hooks such as decoding)."""
        return nnx.merge(self.graphdef, params, self.rest)

    def traced(self):
        """Context for tracing/compiling: the mesh and the logical-axis rules."""
        return partitioned(self.mesh, self.rules)


@dataclasses.dataclass(kw_only=True)
class TrainSetup(EvalSetup):
    """The compiled pieces of a training run on one mesh: the evaluation pieces plus the
    optimiser, the train state's shardings and the jitted train step."""

    train_config: TrainConfig
    abstract_state: TrainState  # ShapeDtypeStructs carrying the target shardings
    state_shardings: TrainState
    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    fresh_state: Callable[[], TrainState]
    state_from_params: Callable[[Any, Any], TrainState]


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


def _check_batch_split(batch_size: int, microbatches: int, mesh: Mesh, rules: Rules,
                       partitioning: str) -> None:
    split = batch_axes_size(mesh, rules)
    micro = batch_size // microbatches
    if micro % split != 0:
        raise ConfigError(
            f"batch size {batch_size} (microbatches of {micro}) is not divisible "
            f"by the {split} data-parallel positions of mesh {dict(mesh.shape)} under "
            f"partitioning={partitioning!r}; choose a batch size that is a "
            f"multiple of {split * microbatches}.")


def _run_traced(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    def wrapped(*args):
        with partitioned(mesh, rules):
            return fn(*args)

    def lower(*args):
        with partitioned(mesh, rules):
            return fn.lower(*args)

    wrapped.lower = lower  # ahead-of-time compilation (t5lite plan)
    return wrapped


def _model_parts(model_config: ModelConfig, mesh: Mesh, rules: Rules, seed: int,
                 batch_size: int, compile_only: bool = False) -> dict[str, Any]:
    """The pieces evaluation and training share (the EvalSetup fields), plus `build` and the
    abstract (unsharded) parameters."""

    def build() -> nnx.Module:
        return build_model(model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

    def rest_only() -> nnx.State:
        return nnx.split(build(), nnx.Param, ...)[2]

    abstract_model = nnx.eval_shape(build)
    graphdef, abs_params_state, _ = nnx.split(abstract_model, nnx.Param, ...)
    param_axes = axes_to_pure(param_logical_axes(abs_params_state))
    abs_params = nnx.to_pure_dict(abs_params_state)
    param_shardings = tree_shardings(param_axes, abs_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    if compile_only:  # the mesh's devices may be compile-only: build the small rest here
        with jax.default_device(jax.devices("cpu")[0]):
            rest = jax.jit(rest_only)()
    with partitioned(mesh, rules):
        abs_rest = jax.eval_shape(rest_only)
        if not compile_only:
            rest = jax.jit(rest_only,
                           out_shardings=jax.tree.map(lambda _: replicated, abs_rest))()
        eval_step = jax.jit(make_eval_step(make_apply_fn(graphdef, rest)),
                            in_shardings=(param_shardings, None), out_shardings=replicated)
    return dict(model_config=model_config, mesh=mesh, rules=rules, graphdef=graphdef,
                rest=rest, param_axes=param_axes,
                abstract_params=abstract_with_shardings(abs_params, param_shardings),
                param_shardings=param_shardings,
                batch_sharding=logical_to_sharding(("batch",), mesh, rules, (batch_size,)),
                eval_step=_run_traced(eval_step, mesh, rules), build=build,
                unsharded_params=abs_params)


def make_eval_setup(model_config: ModelConfig, mesh: Mesh, partitioning: str, batch_size: int,
                    seed: int = 0) -> EvalSetup:
    """Abstract model, parameter shardings and the jitted eval step for a global batch of
    `batch_size` rows (nothing allocated but the model's small non-parameter state)."""
    rules = get_rules(partitioning)
    _check_batch_split(batch_size, 1, mesh, rules, partitioning)
    parts = _model_parts(model_config, mesh, rules, seed, batch_size)
    del parts["build"], parts["unsharded_params"]
    return EvalSetup(**parts)


def make_setup(model_config: ModelConfig, train_config: TrainConfig, mesh: Mesh, *,
               compile_only: bool = False) -> TrainSetup:
    """Abstract model, shardings, optimiser and jitted step functions (nothing allocated yet).

    `compile_only=True` (for `t5lite plan`): `mesh` may hold compile-only devices (a TPU
    topology on a CPU host); the model's small non-parameter state is then built on this host's
    CPU instead of on the mesh, and the steps can only be lowered (`setup.train_step.lower`).
    """
    tc = train_config
    rules = get_rules(tc.partitioning)
    _check_batch_split(tc.batch_size, tc.microbatches, mesh, rules, tc.partitioning)
    seed = tc.seed
    parts = _model_parts(model_config, mesh, rules, seed, tc.batch_size, compile_only)
    build, abs_params = parts.pop("build"), parts.pop("unsharded_params")
    tx, schedule = make_optimizer(tc.optimizer, abs_params, parts["param_axes"],
                                  total_steps=tc.train_steps, freeze=tc.freeze)
    abstract_state = jax.eval_shape(lambda p: new_train_state(p, tx, seed), abs_params)
    shardings = train_state_shardings(abstract_state, parts["param_axes"], mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def fresh() -> TrainState:
        params = nnx.to_pure_dict(nnx.split(build(), nnx.Param, ...)[1])
        return new_train_state(params, tx, seed)

    distill = make_distillation(tc.distill, model_config, mesh, rules)  # None without KD
    with partitioned(mesh, rules):
        apply_fn = make_apply_fn(parts["graphdef"], parts["rest"])
        step_fn = make_train_step(apply_fn, tx, schedule, tc.loss, tc.microbatches,
                                  distill.loss if distill else None,
                                  param_cast=step_param_cast(model_config))
        if distill is None:
            train_step = jax.jit(step_fn, in_shardings=(shardings, None),
                                 out_shardings=(shardings, replicated), donate_argnums=(0,))
        else:  # the teacher's parameters are a further argument of the jitted step
            train_step = distill.bind(step_fn, shardings, replicated)
        fresh_state = jax.jit(fresh, out_shardings=shardings)
        from_params = jax.jit(lambda p, step: new_train_state(p, tx, seed, step),
                              in_shardings=(shardings.params, None), out_shardings=shardings)

    return TrainSetup(
        **parts, train_config=tc,
        abstract_state=abstract_with_shardings(abstract_state, shardings),
        state_shardings=shardings, tx=tx, schedule=schedule,
        train_step=_run_traced(train_step, mesh, rules),
        fresh_state=_run_traced(fresh_state, mesh, rules),
        state_from_params=_run_traced(from_params, mesh, rules))


# ---------------------------------------------------------------- where the state comes from

@dataclasses.dataclass(frozen=True)
class StartPlan:
    source: str  # "checkpoint" | "checkpoint_params" | "init_from" | "scratch"
    path: str | None
    step: int | None
    reason: str


def plan_start(setup: TrainSetup, model_dir: str, init_from: str | None) -> StartPlan:
    """Decide (read-only) where the first train state comes from; validate shapes."""
    from t5lite.train import preflight

    abs_params = setup.abstract_state.params
    preflight.check_model_dir(model_dir, setup.model_config)  # run files, architecture changes
    latest = checkpoint.latest_step(model_dir)
    if latest is not None:
        checkpoint.check_params_compatible(model_dir, abs_params, latest)
        kind = checkpoint.checkpoint_kind(model_dir, latest)
        if kind == "train":
            preflight.check_optimizer_state(model_dir, latest, setup.abstract_state.opt_state)
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
        check_init_from_config(init_from, setup.model_config)  # names the ModelConfig field
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
