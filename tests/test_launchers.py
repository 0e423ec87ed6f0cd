"""The launchers in launch/, run with fake `gcloud` / `srun` / `scontrol` / `t5lite` on PATH.

Each fake appends one JSON line {"tool", "argv", "env"} to $FAKE_LOG; the tests check the exact
commands and environment each launcher produces, and (SLURM) the signal -> save -> requeue
sequence with a fake t5lite that waits for SIGTERM like the real one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = ("T5LITE_DISTRIBUTED", "T5LITE_COORDINATOR_ADDRESS", "T5LITE_NUM_PROCESSES",
            "T5LITE_PROCESS_ID", "XLA_FLAGS", "SLURM_JOB_ID")

FAKE = """#!{python}
import json, os, shutil, signal, sys, time
tool = {tool!r}
record = {{"tool": tool, "argv": sys.argv[1:], "cwd": os.getcwd(),
          "env": {{k: os.environ[k] for k in {keys!r} if k in os.environ}}}}
log = os.environ["FAKE_LOG"]
if tool == "gcloud" and "scp" in sys.argv:
    src = sys.argv[sys.argv.index("scp") + 1]
    shutil.copy(src, log + ".scp.tar.gz")      # what was sent, for the test to open
with open(log, "a") as f:
    f.write(json.dumps(record) + "\\n")
if tool == "srun":                            # run the step like srun does (one task here)
    os.execvp(sys.argv[2], sys.argv[2:])
if tool == "t5lite" and os.environ.get("FAKE_T5LITE_WAIT"):
    def saved(signum, frame):
        with open(log, "a") as f:
            f.write(json.dumps({{"tool": "t5lite", "event": "saved on SIGTERM"}}) + "\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, saved)
    open(os.environ["FAKE_T5LITE_WAIT"], "w").close()   # "training"
    for _ in range(600):
        time.sleep(0.1)
    sys.exit(3)                                  # never signalled
"""


def _fake(bin_dir: Path, tool: str) -> Path:
    path = bin_dir / tool
    path.write_text(FAKE.format(python=sys.executable, tool=tool, keys=ENV_KEYS))
    path.chmod(0o755)
    return path


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "srun", "scontrol", "t5lite"):
        _fake(bin_dir, tool)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if k not in ENV_KEYS and k not in ("TPU_NAME", "ZONE", "MODEL_DIR", "PROJECT")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log))

    def calls():
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return env, calls, bin_dir


def _run(script: str, args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], env=env,
                          capture_output=True, text=True, timeout=60, **kw)


# ---------------------------------------------------------------- Cloud TPU VM

def test_tpu_vm_setup_installs_tpu_extra_on_every_worker(fakes):
    env, calls, _ = fakes
    env.update(TPU_NAME="my-v5p-64", ZONE="us-east5-a", PROJECT="proj")
    r = _run("tpu_vm.sh", ["setup"], env)
    assert r.returncode == 0, r.stderr
    scp, ssh = calls()
    assert scp["tool"] == "gcloud"
    assert scp["argv"][:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp["argv"][4].endswith("t5lite.tar.gz")
    assert scp["argv"][5:] == ["my-v5p-64:/tmp/t5lite.tar.gz", "--zone=us-east5-a",
                               "--project=proj", "--worker=all"]
    with tarfile.open(env["FAKE_LOG"] + ".scp.tar.gz") as tar:   # the checkout that was sent
        names = set(tar.getnames())
    assert {"pyproject.toml", "t5lite/cli.py", "launch/tpu_vm.sh"} <= names
    assert ssh["argv"] == [
        "compute", "tpus", "tpu-vm", "ssh", "my-v5p-64", "--zone=us-east5-a", "--project=proj",
        "--worker=all",
        "--command=set -e; mkdir -p t5lite && tar -xzf /tmp/t5lite.tar.gz -C t5lite && "
        "cd t5lite && python3 -m venv .venv && .venv/bin/pip install --quiet --upgrade pip && "
        ".venv/bin/pip install --quiet -e '.[tpu]'"]


def test_tpu_vm_train_runs_t5lite_on_all_workers_with_model_dir(fakes, tmp_path):
    env, calls, bin_dir = fakes
    env.update(TPU_NAME="tpu1", ZONE="europe-west4-a", MODEL_DIR="gs://bucket/runs/base")
    r = _run("tpu_vm.sh", ["train", "--gin_file=gin/demo.gin",
                           "--gin.MIXTURE_OR_TASK_NAME=my task"], env)
    assert r.returncode == 0, r.stderr
    (ssh,) = calls()
    command = ("cd t5lite && T5LITE_DISTRIBUTED=auto .venv/bin/t5lite train "
               "--model_dir=gs://bucket/runs/base --gin_file=gin/demo.gin "
               "--gin.MIXTURE_OR_TASK_NAME=my\\ task")
    assert ssh["argv"] == ["compute", "tpus", "tpu-vm", "ssh", "tpu1", "--zone=europe-west4-a",
                           "--worker=all", f"--command={command}"]
    # what a worker's shell makes of that command: the exact argv and environment
    home = tmp_path / "worker_home"
    (home / "t5lite" / ".venv" / "bin").mkdir(parents=True)
    os.symlink(bin_dir / "t5lite", home / "t5lite" / ".venv" / "bin" / "t5lite")
    subprocess.run(["bash", "-c", command], cwd=home, env=env, check=True, timeout=60)
    worker = calls()[-1]
    assert worker["tool"] == "t5lite"
    assert worker["argv"] == ["train", "--model_dir=gs://bucket/runs/base",
                              "--gin_file=gin/demo.gin", "--gin.MIXTURE_OR_TASK_NAME=my task"]
    assert worker["env"]["T5LITE_DISTRIBUTED"] == "auto"
    # `train` is also the default verb
    r = _run("tpu_vm.sh", ["--gin_file=gin/demo.gin"], env)
    assert r.returncode == 0 and calls()[-1]["argv"][-1].endswith(
        "train --model_dir=gs://bucket/runs/base --gin_file=gin/demo.gin")


@pytest.mark.parametrize("missing, message", [("TPU_NAME", "set TPU_NAME"), ("ZONE", "set ZONE"),
                                              ("MODEL_DIR", "set MODEL_DIR")])
def test_tpu_vm_names_a_missing_variable(fakes, missing, message):
    env, calls, _ = fakes
    env.update(TPU_NAME="t", ZONE="z", MODEL_DIR="gs://b/r")
    del env[missing]
    r = _run("tpu_vm.sh", ["train"], env)
    assert r.returncode != 0 and message in r.stderr
    assert calls() == []


# ---------------------------------------------------------------- SLURM

def _start_slurm(env, tmp_path, args=()):
    ready = tmp_path / "training"
    env.update(SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(tmp_path), T5LITE="t5lite",
               FAKE_T5LITE_WAIT=str(ready), MODEL_DIR="gs://bucket/run")
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "gpu_slurm.sbatch"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        if ready.exists():
            break
        time.sleep(0.1)
    assert ready.exists(), proc.communicate(timeout=10)
    return proc


def test_slurm_time_limit_saves_then_requeues(fakes, tmp_path):
    env, calls, _ = fakes
    proc = _start_slurm(env, tmp_path, ["--gin_file=gin/demo.gin"])
    proc.send_signal(signal.SIGUSR1)       # what `#SBATCH --signal=B:USR1@300` sends
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    srun, t5lite, saved, scontrol = calls()
    assert srun["argv"] == ["--kill-on-bad-exit=1", "t5lite", "train",
                            "--model_dir=gs://bucket/run", "--gin_file=gin/demo.gin"]
    assert srun["env"]["T5LITE_DISTRIBUTED"] == "auto"
    assert t5lite["argv"] == ["train", "--model_dir=gs://bucket/run", "--gin_file=gin/demo.gin"]
    assert saved["event"] == "saved on SIGTERM"
    assert scontrol["argv"] == ["requeue", "4242"]
    assert "requeueing" in err


def test_slurm_preemption_saves_without_own_requeue(fakes, tmp_path):
    env, calls, _ = fakes
    proc = _start_slurm(env, tmp_path)
    proc.send_signal(signal.SIGTERM)       # SLURM preempting a --requeue job requeues it itself
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert [c["tool"] for c in calls()] == ["srun", "t5lite", "t5lite"]
    assert calls()[-1]["event"] == "saved on SIGTERM"


def test_slurm_finished_run_is_not_requeued(fakes, tmp_path):
    env, calls, _ = fakes
    env.update(SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(tmp_path), T5LITE="t5lite")
    r = _run("gpu_slurm.sbatch", ["--model_dir=runs/x"], env)
    assert r.returncode == 0, r.stderr
    assert [c["tool"] for c in calls()] == ["srun", "t5lite"]
    assert calls()[1]["argv"] == ["train", "--model_dir=runs/x"]


def test_slurm_script_asks_for_requeue_and_an_early_signal():
    text = (ROOT / "launch" / "gpu_slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@300" in text


# ---------------------------------------------------------------- local processes

def test_local_multiprocess_environment(fakes):
    env, calls, _ = fakes
    env.update(T5LITE="t5lite", PORT="12345")
    r = _run("local_multiprocess.sh", ["2", "4", "--gin_file=gin/demo.gin",
                                       "--model_dir=runs/mp"], env)
    assert r.returncode == 0, r.stderr
    procs = sorted(calls(), key=lambda c: c["env"]["T5LITE_PROCESS_ID"])
    assert [c["env"] for c in procs] == [
        {"T5LITE_COORDINATOR_ADDRESS": "127.0.0.1:12345", "T5LITE_NUM_PROCESSES": "2",
         "T5LITE_PROCESS_ID": str(i), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        for i in range(2)]
    assert all(c["argv"] == ["train", "--cpu_collectives=gloo", "--gin_file=gin/demo.gin",
                             "--model_dir=runs/mp"] for c in procs)
    assert all(c["cwd"] == str(ROOT) for c in procs)
