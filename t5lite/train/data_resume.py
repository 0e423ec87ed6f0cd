"""Where a restarted run's input stream continues: restore the saved position, or replay.

A data source that can save its exact position (`SeqioData`: the tf.data iterator state, see
`t5lite.data.iterator_state`) has it saved with every checkpoint, one `DataState` per host; a
restart restores it in seconds however far the run got. A source without that ability (e.g. a
synthetic one in tests) is asked for `train_batches(shard, position)` and must skip `position`
batches itself.

The saved positions belong to one split of the data over hosts (`DataShard.count` data shards
of `local_batch_size` rows). A restart that splits the data differently cannot continue the
same stream and is refused before anything is written (`check_data_shards`).

Example::

    >>> check_data_shards(data, model_dir, plan_step, shard)       # before writing anything
    >>> stream = open_train_stream(data, shard, position, ckpt, plan_step)
    >>> ckpt.save(state, position, snapshot(stream, shard, position))
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from t5lite import checkpoint
from t5lite.parallel.hosts import DataShard

log = logging.getLogger("t5lite.train")


def can_resume_exactly(data: Any) -> bool:
    """True when `data` can continue from a saved stream state (`resume_train_batches`)."""
    return callable(getattr(data, "resume_train_batches", None))


def check_data_shards(data: Any, model_dir: str, step: int | None, shard: DataShard) -> None:
    """Refuse (DataStateMismatch, one line) to resume a checkpoint whose input positions were
    saved for another split of the data over hosts. Reads only."""
    if step is None or not can_resume_exactly(data):
        return
    saved = checkpoint.data_state_shards(model_dir, step)
    if not saved:
        return
    counts = sorted({count for _, count, _ in saved})
    sizes = sorted({size for i, count, size in saved if count == shard.count})
    if shard.count not in counts or (sizes and sizes != [shard.local_batch_size]):
        have = "/".join(map(str, counts))
        saved_rows = sorted({size for _, _, size in saved})
        rows = f" of {'/'.join(map(str, saved_rows))} rows"
        raise checkpoint.DataStateMismatch(
            f"checkpoint step {step} in {model_dir} holds the input positions of {have} data "
            f"shard(s){rows} (hosts reading different data) but this run reads {shard.count} "
            f"of {shard.local_batch_size} rows; the data stream cannot continue exactly. "
            "Resume with the mesh and number of hosts it was written with, or train into a new "
            "--model_dir with TrainConfig.init_from pointing at this one.")


def open_train_stream(data: Any, shard: DataShard, position: int,
                      ckpt: checkpoint.TrainCheckpointer, step: int | None) -> Iterator:
    """This host's training batches from batch `position` on: restored from the state saved
    with checkpoint `step` when there is one, else by asking the source to skip ahead."""
    saved = None
    if step is not None and can_resume_exactly(data):
        saved = ckpt.restore_data_state(step, shard.index, shard.count)
    if saved is None:
        if position:
            log.info("data: skipping %d batches to reach the checkpointed position", position)
        return data.train_batches(shard, position)
    log.info("data: restored the input stream at batch %d from checkpoint step %d (no replay)",
             saved.position, step)
    return data.resume_train_batches(shard, saved.position, saved.files)


def snapshot(stream: Any, shard: DataShard, position: int) -> checkpoint.DataState | None:
    """The stream's exact position after `position` batches, or None when it cannot say."""
    save = getattr(stream, "save_state", None)
    if save is None or getattr(stream, "_t5lite_unsaveable", False):
        return None
    try:
        files = save()
    except Exception as e:  # noqa: BLE001 - e.g. a pipeline op whose state tf.data cannot save
        log.warning("data: the input stream's position cannot be saved (%s); a restart will "
                    "replay the batches up to the checkpoint instead (exact, but slower).",
                    " ".join(str(e).split())[:300])
        stream._t5lite_unsaveable = True
        return None
    return checkpoint.DataState(shard.index, shard.count, shard.local_batch_size, position,
                                files)
