"""A training process for the subprocess tests (hard kill, SIGTERM, multi-process).

    python tests/train_child.py MODE MODEL_DIR [PROCESS_ID PORT]

MODE:
  kill9     train to 2N with checkpoints every N; once step N's checkpoint is on disk, SIGKILL
            itself (a hard crash mid-run)
  sigterm   train a long run; send itself SIGTERM at batch 3 (a preemption notice)
  multihost one of 2 processes x 4 CPU devices (gloo); prints the train losses as JSON
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


def main() -> None:
    model_dir = sys.argv[2]
    if MODE == "kill9":
        tc, mc = resume_config(2 * N_STEPS)
        data = KillAfterCheckpoint(tc.batch_size, model_dir, N_STEPS)
        train(mc, tc, make_mesh(MeshConfig(data=-1)), data, model_dir, console=False)
        sys.exit(3)  # never reached
    if MODE == "sigterm":
        tc, mc = resume_config(1000)
        result = train(mc, tc, make_mesh(MeshConfig(data=-1)), TermAtBatch(tc.batch_size, eval_batches=0),
                       model_dir, console=False)
        sys.exit(0 if result.preempted else 4)
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
