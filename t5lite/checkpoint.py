"""Checkpoints: the only module of t5lite that talks to Orbax.

Layout: `MODEL_DIR/checkpoints/<step>/` with up to three items

    params   the model parameters (pure dict of arrays)                  always
    train    {"opt_state": {path: array}, "step": int32, "rng": uint32[2]}  full train state only
    meta     JSON {"kind": "train" | "params", "step", "data_position", "format"}

A *params-only* checkpoint (written by `save_params`, e.g. by `t5lite import`) has no `train`
item: `t5lite eval`, inference and `init_from` read it like any other; `t5lite train` resuming
from it builds a fresh optimiser state. The optimiser state is stored as a flat `{path: array}`
dict and rebuilt onto the caller's optimiser structure, so optax's NamedTuples survive the trip.

Saving is asynchronous (the step loop continues while arrays are written) and cooperative across
hosts (every process calls `save`; each writes its own shards). Restoring takes target shardings,
so a checkpoint written on one mesh restores onto another.

Public API used outside training::

    latest_step(model_dir) -> int | None
    restore_params(model_dir, abstract_params, shardings=None, step=None) -> nnx.State
    save_params(model_dir, params, step=0)
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from t5lite.errors import UserError
from t5lite.model_dir import checkpoint_dir
from t5lite.parallel.rules import path_key

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _resolve_dir(path: str) -> str:
    """Accept a model dir (with checkpoints/) or a checkpoints dir itself."""
    path = _abs(path)
    inner = checkpoint_dir(path)
    return inner if os.path.isdir(inner) else path


def _manager(directory: str, *, keep: int | None = None, async_save: bool = False,
             create: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=async_save)
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "train": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _path_str(path: tuple) -> str:
    return "/".join(path_key(path))


def _flat(tree: Any) -> dict[str, Any]:
    return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _to_pure(params: Any) -> Any:
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(getattr(v, "shape", ())) for k, v in _flat(tree).items()}


# ---------------------------------------------------------------- module-level API

def latest_step(model_dir: str) -> int | None:
    """The newest complete checkpoint step in `model_dir` (or a checkpoints dir), or None."""
    directory = _resolve_dir(model_dir)
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def checkpoint_kind(model_dir: str, step: int) -> str:
    """'train' (params + optimiser state) or 'params' (params only)."""
    with _manager(_resolve_dir(model_dir)) as mngr:
        return "train" if mngr.item_metadata(step).get("train") is not None else "params"


def check_params_compatible(model_dir: str, abstract_params: Any, step: int | None = None
                            ) -> int:
    """Raise UserError naming the first parameter whose shape (or presence) differs between the
    checkpoint and `abstract_params`; return the step checked."""
    directory = _resolve_dir(model_dir)
    with _manager(directory) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {directory}; train one with `t5lite train` or "
                            "import one with `t5lite import`.")
        if step not in mngr.all_steps():
            raise UserError(f"no checkpoint for step {step} in {directory}; available steps: "
                            f"{list(mngr.all_steps())}.")
        meta = mngr.item_metadata(step).get("params")
    saved = _flat_shapes(meta.tree if hasattr(meta, "tree") else meta)
    wanted = _flat_shapes(_to_pure(abstract_params))
    for name in sorted(set(saved) | set(wanted)):
        if name not in saved:
            raise UserError(f"checkpoint {directory}/{step} does not fit the model config: "
                            f"parameter {name} {wanted[name]} is missing from the checkpoint.")
        if name not in wanted:
            raise UserError(f"checkpoint {directory}/{step} does not fit the model config: it "
                            f"has parameter {name} {saved[name]} that the model does not have.")
        if saved[name] != wanted[name]:
            raise UserError(f"checkpoint {directory}/{step} does not fit the model config: "
                            f"parameter {name} has shape {saved[name]} in the checkpoint but "
                            f"{wanted[name]} in the config. Use a fresh --model_dir or the "
                            "config the checkpoint was trained with.")
    return step


def _abstract_targets(pure_abstract: Any, shardings: Any) -> Any:
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            pure_abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        pure_abstract, _to_pure(shardings))


def _as_state_like(template: Any, pure: Any) -> Any:
    if isinstance(template, nnx.State):
        out = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(out, pure)
        return out
    return pure


def restore_params(model_dir: str, abstract_params: Any, shardings: Any = None,
                   step: int | None = None) -> Any:
    """Parameters of the checkpoint at `step` (default: latest) in `model_dir`.

    Works on full train-state and params-only checkpoints. `abstract_params` is an nnx.State
    (or pure dict) of arrays / ShapeDtypeStructs giving shapes and dtypes; `shardings` a matching
    tree of shardings (default: the first device). Returns the same kind of tree as given.
    """
    directory = _resolve_dir(model_dir)
    step = check_params_compatible(directory, abstract_params, step)
    pure = _to_pure(abstract_params)
    target = _abstract_targets(pure, shardings)
    with _manager(directory) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))
    return _as_state_like(abstract_params, restored["params"])


def save_params(model_dir: str, params: Any, step: int = 0) -> None:
    """Write a params-only checkpoint (blocking) into `model_dir/checkpoints/<step>`."""
    directory = checkpoint_dir(_abs(model_dir))
    with _manager(directory, create=True) as mngr:
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(_to_pure(params)),
            meta=ocp.args.JsonSave({"kind": "params", "step": int(step), "data_position": 0,
                                    "format": FORMAT_VERSION})), force=True)
        mngr.wait_until_finished()


# ---------------------------------------------------------------- training checkpoints

class TrainCheckpointer:
    """Saves and restores full train states (async, keep-N) for the training loop."""

    def __init__(self, model_dir: str, keep: int | None = None, async_save: bool = True):
        self.directory = checkpoint_dir(_abs(model_dir))
        self._mngr = _manager(self.directory, keep=keep, async_save=async_save, create=True)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, state: Any, data_position: int) -> None:
        """Start saving `state` (a TrainState) at its step; returns before the write ends."""
        step = int(jax.device_get(state.step))
        train = {"opt_state": _flat(state.opt_state), "step": state.step, "rng": state.rng}
        self._mngr.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave({"kind": "train", "step": step,
                                    "data_position": int(data_position),
                                    "format": FORMAT_VERSION})))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) from the full checkpoint at `step`. `abstract_state` is a TrainState of
        ShapeDtypeStructs carrying the target shardings (any mesh)."""
        flat_opt = _flat(abstract_state.opt_state)
        target = {"opt_state": flat_opt, "step": abstract_state.step, "rng": abstract_state.rng}
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            train=ocp.args.StandardRestore(target),
            meta=ocp.args.JsonRestore()))
        train = restored["train"]
        treedef = jax.tree.structure(abstract_state.opt_state)
        saved_keys = set(train["opt_state"])
        if saved_keys != set(flat_opt):
            missing = sorted(set(flat_opt) - saved_keys)[:3]
            raise UserError(f"checkpoint {self.directory}/{step} was written with a different "
                            f"optimiser (state entries {missing} missing); use the optimiser it "
                            "was trained with, or start from it with init_from.")
        opt_state = jax.tree.unflatten(treedef, [train["opt_state"][k] for k in flat_opt])
        state = type(abstract_state)(step=train["step"], params=restored["params"],
                                     opt_state=opt_state, rng=train["rng"])
        return state, dict(restored["meta"])

    def restore_meta(self, step: int) -> dict:
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


# ---------------------------------------------------------------- compatibility (read only)

def opt_state_shapes(opt_state: Any) -> dict[str, tuple[int, ...]]:
    """`{entry: shape}` of an optimiser state as a full checkpoint stores it."""
    return {k: tuple(getattr(v, "shape", ())) for k, v in _flat(opt_state).items()}


def saved_opt_state_shapes(model_dir: str, step: int) -> dict[str, tuple[int, ...]] | None:
    """`{entry: shape}` of the optimiser state saved at `step` (None: a params-only
    checkpoint). Reads metadata only."""
    with _manager(_resolve_dir(model_dir)) as mngr:
        meta = mngr.item_metadata(step).get("train")
    if meta is None:
        return None
    tree = meta.tree if hasattr(meta, "tree") else meta
    return {k: tuple(getattr(v, "shape", ()) or ()) for k, v in tree["opt_state"].items()}
