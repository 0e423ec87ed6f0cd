"""Checkpoints: the only module of t5lite that talks to Orbax.

Layout: `MODEL_DIR/checkpoints/<step>/` with up to four items

    params   the model parameters (pure dict of arrays)                  always
    train    {"opt_state": {path: array}, "step": int32, "rng": uint32[2]}  full train state only
    meta     JSON {"kind": "train" | "params", "step", "data_position", "format"}
    data     each host's exact input position (`DataState`, t5lite.data.iterator_state), when
             the data source can save one; a restart continues there without replaying batches

Faults (see `scan` and `set_aside_broken`; the detection lives in t5lite/checkpoint_faults.py,
used only from here): a step dir with a zero-length file, unreadable metadata, a missing item, or
a step whose arrays cannot be read, and a `<step>.orbax-checkpoint-tmp-*` dir left by a process
that died while saving, are *broken*: readers skip them (the newest intact step is used) and they
are moved, never deleted, to `MODEL_DIR/checkpoints_broken/` with a warning naming the step and
what is wrong. A full disk while saving raises `DiskFullError` (one
line naming the path and the free space); the partial write is removed (until Orbax's writes
still in flight stop re-creating it: `checkpoint_faults.remove_partial_saves`), earlier steps
stay.

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

import dataclasses
import json
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import args as ocp_args
from orbax.checkpoint._src.handlers import async_checkpoint_handler

from t5lite import checkpoint_faults as _faults
from t5lite import storage
from t5lite.checkpoint_faults import (BROKEN_DIRNAME, Broken,  # noqa: F401  (public here)
                                     BrokenCheckpointError, disk_full_guard, read_json_file,
                                     read_of_step, step_problem)
from t5lite.disk import DiskFullError, disk_full_error, is_disk_full  # noqa: F401
from t5lite.errors import UserError
from t5lite.model_dir import checkpoint_dir
from t5lite.parallel.rules import path_key


FORMAT_VERSION = 1


def _abs(path: str) -> str:
    return storage.abspath(path)  # gs:// paths stay as they are


def _resolve_dir(path: str) -> str:
    """Accept a model dir (with checkpoints/) or a checkpoints dir itself."""
    path = _abs(path)
    inner = checkpoint_dir(path)
    return inner if storage.isdir(inner) else path


def _manager(directory: str, *, keep: int | None = None, async_save: bool = False,
             create: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=async_save)
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "train": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
                "data": DataStateHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _path_str(path: tuple) -> str:
    return "/".join(path_key(path))


def _flat(tree: Any) -> dict[str, Any]:
    return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _to_pure(params: Any) -> Any:
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(getattr(v, "shape", ())) for k, v in _flat(tree).items()}


# ---------------------------------------------------------------- the data item

@dataclasses.dataclass(frozen=True)
class DataState:
    """One host's exact input position: its stream's saved state after `position` batches.

    `shard_index` / `shard_count` say which data shard the host read (`DataShard`); hosts that
    read the same shard (e.g. the two halves of a tensor-parallel pair) save the same state.
    """

    shard_index: int
    shard_count: int
    local_batch_size: int
    position: int
    files: dict[str, bytes]


class DataStateMismatch(UserError):
    """The checkpoint's data positions were written for another split of the data over hosts."""


_DATA_META = re.compile(r"^shard-(\d+)-of-(\d+)\.p(\d+)\.json$")


class DataStateHandler(async_checkpoint_handler.AsyncCheckpointHandler):
    """Orbax handler of the `data` item: every process writes its own `DataState` files
    (`shard-I-of-N.pP.json` plus the state's files), so a save is cooperative across hosts."""

    # The item's directory is an `epath.Path`, local or gs://: reach it through t5lite.storage
    # (`os` functions would put a gs:// path in a local directory named "gs:").
    async def _write(self, directory: epath.Path, state: DataState) -> None:
        stem = f"shard-{state.shard_index}-of-{state.shard_count}.p{jax.process_index()}"
        base = os.fspath(directory)
        storage.makedirs(base)
        for name, payload in state.files.items():
            storage.write_atomic(storage.join(base, f"{stem}.{name}"), payload)
        meta = {"position": state.position, "local_batch_size": state.local_batch_size,
                "files": sorted(state.files)}
        # last: it names the files, and restore looks for it
        storage.write_atomic(storage.join(base, f"{stem}.json"), json.dumps(meta))

    async def async_save(self, directory: epath.Path, args: "DataStateSave"):
        from orbax.checkpoint import future

        return [future.CommitFutureAwaitingContractedSignals(
            self._write(directory, args.state), name="t5lite_data_state_save")]

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        import asyncio

        asyncio.run(self._write(directory, args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore") -> DataState:
        base = os.fspath(directory)
        saved = {}
        for name in storage.listdir(base):
            m = _DATA_META.match(name)
            if m:
                saved.setdefault((int(m[1]), int(m[2])), []).append((int(m[3]), name))
        key = (args.shard_index, args.shard_count)
        if key not in saved:
            counts = sorted({n for _, n in saved})
            have = "/".join(map(str, counts)) or "0"
            raise DataStateMismatch(
                f"checkpoint {storage.dirname(base)} holds the input positions of {have} "
                f"data shard(s) (hosts reading different data) but this run "
                f"reads {args.shard_count}; the data cannot continue exactly. Resume with the "
                "mesh and number of hosts it was written with, or start a new --model_dir with "
                "TrainConfig.init_from pointing at this one.")
        me = jax.process_index()
        _, name = min(saved[key], key=lambda pn: (pn[0] != me, pn[0]))
        meta = json.loads(storage.read_text(storage.join(base, name)))
        stem = name[:-len(".json")]
        files = {fname: storage.read_bytes(storage.join(base, f"{stem}.{fname}"))
                 for fname in meta["files"]}
        return DataState(args.shard_index, args.shard_count, int(meta["local_batch_size"]),
                         int(meta["position"]), files)

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp_args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp_args.CheckpointArgs):
    state: DataState


@ocp_args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp_args.CheckpointArgs):
    shard_index: int
    shard_count: int


def data_state_shards(model_dir: str, step: int) -> list[tuple[int, int, int]]:
    """(shard index, shard count, local batch size) of each input position saved with `step`;
    empty when the checkpoint has none. Reads only small JSON files."""
    base = storage.join(_resolve_dir(model_dir), str(step), "data")
    if not storage.isdir(base):
        return []
    out = []
    for name in sorted(storage.listdir(base)):
        m = _DATA_META.match(name)
        if m:
            size = int(json.loads(storage.read_text(storage.join(base, name)))["local_batch_size"])
            out.append((int(m[1]), int(m[2]), size))
    return out


# ---------------------------------------------------------------- faults (checkpoint_faults.py)

def scan(model_dir: str, unfinished: bool = True) -> tuple[list[int], list[Broken]]:
    """(intact steps, ascending; broken step dirs) of a model dir or checkpoints dir. Reads only.
    `unfinished`: also list `<step>.orbax-checkpoint-tmp-*` dirs (a save that never finished)."""
    return _faults.scan(_resolve_dir(model_dir), unfinished)


def broken_dir(model_dir: str) -> str:
    """Where broken step dirs are moved: MODEL_DIR/checkpoints_broken/."""
    return _faults.broken_dir(_resolve_dir(model_dir))


def set_aside_broken(model_dir: str, unfinished: bool = True,
                     extra: tuple[Broken, ...] = ()) -> list[Broken]:
    """Move every broken step dir of a model dir (or checkpoints dir) aside, with a warning per
    step; see `checkpoint_faults.set_aside_broken`."""
    return _faults.set_aside_broken(_resolve_dir(model_dir), unfinished, extra)


# ---------------------------------------------------------------- module-level API

def latest_step(model_dir: str) -> int | None:
    """The newest intact checkpoint step in `model_dir` (or a checkpoints dir), or None; broken
    steps (see `scan`) are skipped, not moved (local dirs; remote ones: Orbax's view)."""
    directory = _resolve_dir(model_dir)
    if "://" in directory:
        if not storage.isdir(directory):
            return None
        with _manager(directory) as mngr:
            return mngr.latest_step()
    intact = scan(model_dir, unfinished=False)[0]
    return intact[-1] if intact else None


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
        step = latest_step(directory) if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {directory}; train one with `t5lite train` or "
                            "import one with `t5lite import`.")
        if step not in mngr.all_steps():
            raise UserError(f"no checkpoint for step {step} in {directory}; available steps: "
                            f"{list(mngr.all_steps())}.")
        with read_of_step(step, directory):
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
                   step: int | None = None, set_aside: bool = True) -> Any:
    """Parameters of the checkpoint at `step` (default: latest) in `model_dir`.

    Works on full train-state and params-only checkpoints. `abstract_params` is an nnx.State
    (or pure dict) of arrays / ShapeDtypeStructs giving shapes and dtypes; `shardings` a matching
    tree of shardings (default: the first device). Returns the same kind of tree as given.
    Without `step`, broken steps are moved aside (`set_aside_broken`, unless `set_aside=False`)
    and the newest intact one is read; a step whose arrays cannot be read is set aside too.
    """
    return restore_params_and_step(model_dir, abstract_params, shardings, step, set_aside)[0]


def restore_params_and_step(model_dir: str, abstract_params: Any, shardings: Any = None,
                            step: int | None = None, set_aside: bool = True) -> tuple[Any, int]:
    """`restore_params` and the step it read (the newest intact one when `step` is None)."""
    directory = _resolve_dir(model_dir)
    explicit = step is not None
    if not explicit and set_aside:
        set_aside_broken(directory, unfinished=False)
    pure = _to_pure(abstract_params)
    target = _abstract_targets(pure, shardings)
    while True:
        try:
            step = check_params_compatible(directory, abstract_params, step)
            with read_of_step(step, directory), _manager(directory) as mngr:
                restored = mngr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(target)))
            return _as_state_like(abstract_params, restored["params"]), step
        except BrokenCheckpointError as e:
            if explicit or not set_aside:
                raise
            set_aside_broken(directory, unfinished=False, extra=(e.broken,))
            step = None


def save_params(model_dir: str, params: Any, step: int = 0) -> None:
    """Write a params-only checkpoint (blocking) into `model_dir/checkpoints/<step>`."""
    directory = checkpoint_dir(_abs(model_dir))
    with disk_full_guard(directory, step):
        with _manager(directory, create=True) as mngr:
            mngr.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(_to_pure(params)),
                meta=ocp.args.JsonSave({"kind": "params", "step": int(step), "data_position": 0,
                                        "format": FORMAT_VERSION})), force=True)
            mngr.wait_until_finished()


# ---------------------------------------------------------------- training checkpoints

class TrainCheckpointer:
    """Saves and restores full train states (async, keep-N) for the training loop.

    A full disk while saving raises `DiskFullError` from `save`, `wait` or `close` (an async
    write fails after `save` returned); a step that cannot be read raises
    `BrokenCheckpointError` from `restore` (call `set_aside(error)` and plan again).
    """

    def __init__(self, model_dir: str, keep: int | None = None, async_save: bool = True):
        self.directory = checkpoint_dir(_abs(model_dir))
        self._keep, self._async = keep, async_save
        self._mngr = _manager(self.directory, keep=keep, async_save=async_save, create=True)
        self._saving: int | None = None  # the step of the save that may still be in flight

    def latest_step(self) -> int | None:
        self._mngr.reload()
        return latest_step(self.directory)

    def save(self, state: Any, data_position: int, data_state: DataState | None = None) -> None:
        """Start saving `state` (a TrainState) at its step, with this host's `data_state` when
        the data source can save one; returns before the write ends."""
        step = int(jax.device_get(state.step))
        train = {"opt_state": _flat(state.opt_state), "step": state.step, "rng": state.rng}
        items = dict(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave({"kind": "train", "step": step,
                                    "data_position": int(data_position),
                                    "format": FORMAT_VERSION}))
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        with disk_full_guard(self.directory, self._saving):
            self._mngr.wait_until_finished()  # the previous save's errors surface here
        self._saving = step
        with disk_full_guard(self.directory, step):
            self._mngr.save(step, force=True, args=ocp.args.Composite(**items))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) from the full checkpoint at `step`. `abstract_state` is a TrainState of
        ShapeDtypeStructs carrying the target shardings (any mesh)."""
        flat_opt = _flat(abstract_state.opt_state)
        target = {"opt_state": flat_opt, "step": abstract_state.step, "rng": abstract_state.rng}
        with read_of_step(step, self.directory):
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

    def restore_data_state(self, step: int, shard_index: int, shard_count: int
                           ) -> DataState | None:
        """This host's saved input position at `step` (None: the checkpoint has none, e.g. the
        data source cannot save one). `DataStateMismatch` when it was written for another
        number of data shards."""
        if not storage.isdir(storage.join(self.directory, str(step), "data")):
            return None
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            data=DataStateRestore(shard_index, shard_count)))
        return restored["data"]

    def set_aside(self, error: BrokenCheckpointError) -> None:
        """Move the step of `error` (and any other broken step) aside; see `set_aside_broken`."""
        set_aside_broken(self.directory, extra=(error.broken,))
        self._mngr.reload()

    def set_aside_broken(self) -> list[Broken]:
        """Move every broken step dir aside (a training run owns its model dir, so unfinished
        saves are included); call before planning where a run starts."""
        moved = set_aside_broken(self.directory)
        self._mngr.reload()
        return moved

    def restore_meta(self, step: int) -> dict:
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        with disk_full_guard(self.directory, self._saving):
            self._mngr.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
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
