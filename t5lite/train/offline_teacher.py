"""Offline teachers: the teacher's top-k logits of the exact training stream, on disk.

For a teacher too large to share the accelerators with the student, `t5lite teacher-logits`
runs it once over the first N steps of the training stream — the same task, seed, feature
lengths, global batch and per-host data shards as `t5lite train` — and stores per step and per
host the top-k (default 64) logits, their token ids and the teacher's log-probability of each
target token (for the `teacher_ce` metric). Training then reads them back in step with its data
position, so a resumed run reads exactly what the uninterrupted run read.

Layout::

    LOGITS_DIR/
      meta.json                      teacher, top_k, task, batch size, feature lengths, seed
      shard-00000-of-00001/
        step-00000000.npz            topk_logits float16 [rows, targets, k],
        step-00000001.npz            topk_ids uint16|int32 [rows, targets, k],
        ...                          target_logp float32 [rows, targets]

LOGITS_DIR may be local or `gs://` (every file goes through `t5lite.storage`). Each step file
is written whole (a temporary name renamed on a local disk, one upload to a bucket), so an
interrupted writer leaves only complete files and a restart continues at the first missing step
(resumable).

Example::

    t5lite teacher-logits --gin_file=gin/demo.gin --gin_file=gin/runs/distill.gin \\
        --gin.TEACHER_MODEL_DIR=runs/teacher --output_dir=runs/teacher_logits --steps=500
    t5lite train --gin_file=gin/demo.gin --gin_file=gin/runs/distill.gin \\
        --gin.TEACHER_MODEL_DIR=runs/teacher --gin.TEACHER_LOGITS_DIR=runs/teacher_logits \\
        --model_dir=runs/student_offline
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from t5lite import storage
from t5lite.errors import UserError
from t5lite.parallel.hosts import DataShard
from t5lite.train.distill import TARGET_LOGP, TOPK_IDS, TOPK_LOGITS

META_FILE = "meta.json"


def shard_dir(root: str, shard: DataShard) -> str:
    return storage.join(root, f"shard-{shard.index:05d}-of-{shard.count:05d}")


def step_file(root: str, shard: DataShard, position: int) -> str:
    return storage.join(shard_dir(root, shard), f"step-{position:08d}.npz")


def stream_meta(data_config: Any, batch_size: int, teacher_model_dir: str,
                top_k: int) -> dict:
    """What identifies the stream the logits belong to (checked again when training)."""
    return {"task": data_config.mixture_or_task_name,
            "task_feature_lengths": dict(data_config.task_feature_lengths),
            "seed": data_config.seed, "pack": bool(data_config.pack),
            "shuffle": bool(data_config.shuffle), "batch_size": int(batch_size),
            "teacher_model_dir": storage.abspath(teacher_model_dir), "top_k": int(top_k)}


def read_meta(root: str) -> dict:
    path = storage.join(root, META_FILE)
    if not storage.exists(path):
        raise UserError(f"{path} not found: {root} holds no teacher logits; write them with "
                        "`t5lite teacher-logits`.")
    return json.loads(storage.read_text(path))


def check_meta(root: str, expected: dict) -> dict:
    """Refuse logits written for another stream or teacher (top_k may differ)."""
    meta = read_meta(root)
    for key, value in expected.items():
        if key == "top_k":
            continue
        if meta.get(key) != value:
            raise UserError(f"the teacher logits in {root} were written for {key}="
                            f"{meta.get(key)!r} but this run has {key}={value!r}; they would "
                            "not match the training stream. Re-run `t5lite teacher-logits` "
                            "with this run's gin files.")
    return meta


def write_meta(root: str, meta: dict) -> None:
    storage.makedirs(root)
    path = storage.join(root, META_FILE)
    if storage.exists(path):
        check_meta(root, meta)
        if read_meta(root).get("top_k") != meta["top_k"]:
            raise UserError(f"{root} holds top-{read_meta(root)['top_k']} logits; use the same "
                            f"--top_k or another --output_dir (asked for {meta['top_k']}).")
        return
    storage.write_atomic(path, json.dumps(meta, indent=2, sort_keys=True))


def save_step(root: str, shard: DataShard, position: int, topk_logits: np.ndarray,
              topk_ids: np.ndarray, target_logp: np.ndarray) -> int:
    """Write one step's arrays atomically; returns the bytes written."""
    path = step_file(root, shard, position)
    storage.makedirs(storage.dirname(path))
    ids_dtype = np.uint16 if int(topk_ids.max(initial=0)) < 65536 else np.int32
    buffer = io.BytesIO()
    np.savez(buffer, topk_logits=np.asarray(topk_logits, np.float16),
             topk_ids=np.asarray(topk_ids).astype(ids_dtype),
             target_logp=np.asarray(target_logp, np.float32))
    payload = buffer.getvalue()
    storage.write_atomic(path, payload)
    return len(payload)


def load_step(root: str, shard: DataShard, position: int) -> dict[str, np.ndarray]:
    path = step_file(root, shard, position)
    if not storage.exists(path):
        raise UserError(f"no teacher logits for data position {position} ({path}); the "
                        f"offline logits in {root} cover fewer steps than this run trains. "
                        "Write more with `t5lite teacher-logits --steps=N` (it continues where "
                        "it stopped) or lower TRAIN_STEPS.")
    with np.load(io.BytesIO(storage.read_bytes(path))) as z:
        return {TOPK_LOGITS: z["topk_logits"].astype(np.float32),
                TOPK_IDS: z["topk_ids"].astype(np.int32),
                TARGET_LOGP: z["target_logp"]}


class OfflineTeacherData:
    """A DataSource that adds the stored teacher logits to another source's train batches."""

    def __init__(self, data: Any, root: str):
        self.data = data
        self.root = root

    def train_batches(self, shard: DataShard, start_batch: int) -> Iterator[dict]:
        position = start_batch
        for batch in self.data.train_batches(shard, start_batch):
            extra = load_step(self.root, shard, position)
            rows, length = batch["decoder_target_tokens"].shape
            if extra[TOPK_LOGITS].shape[:2] != (rows, length):
                raise UserError(f"teacher logits of position {position} in {self.root} have "
                                f"shape {extra[TOPK_LOGITS].shape[:2]} but the batch has "
                                f"{(rows, length)}; they were written for another batch size "
                                "or host layout.")
            yield {**batch, **extra}
            position += 1

    def eval_batches(self, shard: DataShard) -> Iterable[dict] | None:
        return self.data.eval_batches(shard)


def local_rows(x: Any) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in row order."""
    import jax

    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    pieces: dict[int, np.ndarray] = {}
    for s in x.addressable_shards:
        start = s.index[0].start or 0
        pieces.setdefault(start, np.asarray(s.data))
    return np.concatenate([pieces[k] for k in sorted(pieces)], axis=0)


def write_teacher_logits(distill: Any, student: Any, train_config: Any, data: Any,
                         data_config: Any, mesh: Any, output_dir: str, steps: int,
                         top_k: int = 64, log: Any = print) -> dict:
    """Run the teacher over the first `steps` global batches of the training stream and store
    this host's top-k logits (continuing after the last complete step file)."""
    import time

    import jax
    import jax.numpy as jnp

    from t5lite.parallel.hosts import data_shard_info, host_to_global
    from t5lite.parallel.rules import get_rules, logical_to_sharding
    from t5lite.train.teacher import load_teacher

    if steps <= 0 or top_k <= 0:
        raise UserError(f"--steps={steps} and --top_k={top_k} must be positive.")
    if top_k > student.vocab_size:
        raise UserError(f"--top_k={top_k} exceeds the vocabulary size {student.vocab_size}.")
    rules = get_rules(train_config.partitioning)
    teacher = load_teacher(distill, student, mesh, rules)
    batch_sharding = logical_to_sharding(("batch",), mesh, rules, (train_config.batch_size,))
    shard = data_shard_info(batch_sharding, train_config.batch_size)
    write_meta(output_dir, stream_meta(data_config, train_config.batch_size,
                                       distill.teacher_model_dir, top_k))
    start = 0
    while start < steps and storage.exists(step_file(output_dir, shard, start)):
        start += 1
    stats = {"first_step": start, "steps": steps, "bytes": 0, "seconds": 0.0, "written": 0}
    if start >= steps:
        return stats

    def topk(params, batch):
        logits = teacher.logits(params, batch)
        values, ids = jax.lax.top_k(logits, top_k)
        logp = jax.nn.log_softmax(logits, axis=-1)
        target = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None].astype(
            jnp.int32), axis=-1)[..., 0]
        return values, ids, target

    with jax.set_mesh(mesh):
        fn = jax.jit(topk, in_shardings=(teacher.shardings, None))
        t0 = time.time()
        stream = data.train_batches(shard, start)
        for position in range(start, steps):
            host_batch = next(stream)
            batch = host_to_global(host_batch, batch_sharding, train_config.batch_size)
            values, ids, target = fn(teacher.params, batch)
            stats["bytes"] += save_step(output_dir, shard, position, local_rows(values),
                                        local_rows(ids), local_rows(target))
            stats["written"] += 1
            if (position + 1) % 100 == 0 or position + 1 == steps:
                log(f"teacher-logits: {position + 1}/{steps} steps written to "
                    f"{shard_dir(output_dir, shard)}")
        stats["seconds"] = time.time() - t0
    return stats


__all__ = ["OfflineTeacherData", "write_teacher_logits", "check_meta", "load_step", "local_rows", "read_meta",
           "save_step", "step_file", "stream_meta", "write_meta"]
