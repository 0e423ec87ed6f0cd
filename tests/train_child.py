"""A training process for the subprocess tests (hard kill, SIGTERM, multi-process).

    python tests/train_child.py MODE MODEL_DIR [PROCESS_ID PORT]

MODE:
  kill9     train to 2N with checkpoints every N; once step N's checkpoint is on disk, SIGKILL
            itself (a hard crash mid-run)
  sigterm   train a long run; send itself SIGTERM at batch 3 (a preemption notice)
  killsave  train to 2N with checkpoints every N, the save of step 2N slowed down: SIGKILL
            itself while that save is in flight (arrays written, checkpoint not committed)
  multihost one of 2 processes x 4 CPU devices (gloo); prints the train losses as JSON
  restore   python tests/train_child.py restore MODEL_DIR OUT.npz: one of T5LITE_NUM_PROCESSES
            processes x 2 CPU devices, started by `initialize_distributed` from the T5LITE_*
            variables; restores MODEL_DIR's latest parameters FSDP-sharded over all processes
            and (process 0) writes them, gathered, to OUT.npz
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

MODE = sys.argv[1]
if MODE == "multihost":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
elif MODE == "restore":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
else:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from t5lite import checkpoint  # noqa: E402
from train_fixtures import SyntheticData  # noqa: E402
from train_fixtures import N_STEPS, resume_config, run_multihost_steps  # noqa: E402

from t5lite.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from t5lite.train.loop import train  # noqa: E402


class KillAfterCheckpoint(SyntheticData):
    def __init__(self, batch_size: int, model_dir: str, step: int):
        super().__init__(batch_size, eval_batches=0)
        self.model_dir, self.step = model_dir, step

    def train_batches(self, shard, start_batch):
        for i, batch in enumerate(super().train_batches(shard, start_batch)):
            if start_batch + i == self.step + 1:  # step N done and its save started
                deadline = time.time() + 120
                while checkpoint.latest_step(self.model_dir) != self.step:
                    if time.time() > deadline:
                        raise RuntimeError("checkpoint never appeared")
                    time.sleep(0.1)
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


class TermAtBatch(SyntheticData):
    def train_batches(self, shard, start_batch):
        for i, batch in enumerate(super().train_batches(shard, start_batch)):
            if start_batch + i == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def _kill_during_save(step: int) -> None:
    """Slow the commit of step `step`'s async save down to a hard kill: the arrays are in the
    `<step>.orbax-checkpoint-tmp-*` dir, the rename that completes the checkpoint never comes."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get().name.startswith(f"{step}."):
            time.sleep(0.5)  # the save is in flight...
            os.kill(os.getpid(), signal.SIGKILL)  # ...when the process dies
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def _restore_sharded(model_dir: str, out: str) -> None:
    import numpy as np
    from jax.experimental import multihost_utils

    from t5lite.model_dir import read_model_config
    from t5lite.parallel.hosts import initialize_distributed
    from t5lite.train.config import TrainConfig
    from t5lite.train.setup import make_setup

    assert initialize_distributed(cpu_collectives="gloo")  # from the T5LITE_* variables
    setup = make_setup(read_model_config(model_dir),
                       TrainConfig(train_steps=1, batch_size=8, partitioning="fsdp"),
                       make_mesh(MeshConfig(data=1, fsdp=-1)))
    params, step = checkpoint.restore_params_and_step(model_dir, setup.abstract_state.params,
                                                      setup.state_shardings.params)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    sharded = sum(1 for _, x in leaves if not x.is_fully_addressable)
    full = multihost_utils.process_allgather([x for _, x in leaves], tiled=True)
    if jax.process_index() == 0:
        np.savez(out, **{jax.tree_util.keystr(p): np.asarray(x)
                         for (p, _), x in zip(leaves, full)})
    print("RESULT " + json.dumps({"step": step, "sharded_leaves": sharded}), flush=True)
    jax.distributed.shutdown()


def main() -> None:
    model_dir = sys.argv[2]
    if MODE == "kill9":
        tc, mc = resume_config(2 * N_STEPS)
        data = KillAfterCheckpoint(tc.batch_size, model_dir, N_STEPS)
        train(mc, tc, make_mesh(MeshConfig(data=-1)), data, model_dir, console=False)
        sys.exit(3)  # never reached
    if MODE == "killsave":
        _kill_during_save(2 * N_STEPS)
        tc, mc = resume_config(2 * N_STEPS)
        train(mc, tc, make_mesh(MeshConfig(data=-1)), SyntheticData(tc.batch_size, eval_batches=0),
              model_dir, console=False)
        sys.exit(3)  # never reached
    if MODE == "sigterm":
        tc, mc = resume_config(1000)
        result = train(mc, tc, make_mesh(MeshConfig(data=-1)), TermAtBatch(tc.batch_size, eval_batches=0),
                       model_dir, console=False)
        sys.exit(0 if result.preempted else 4)
    if MODE == "restore":
        _restore_sharded(model_dir, sys.argv[3])
        return
    if MODE == "multihost":
        process_id, port = int(sys.argv[3]), int(sys.argv[4])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
        result = run_multihost_steps(model_dir)
        print("RESULT " + json.dumps({"step": result.step,
                                      "loss": result.train_metrics["loss"]}), flush=True)
        jax.distributed.shutdown()
        return
    raise SystemExit(f"unknown mode {MODE}")


if __name__ == "__main__":
    main()
