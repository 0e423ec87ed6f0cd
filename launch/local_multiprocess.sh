#!/usr/bin/env bash
# Run `t5lite train` as N cooperating processes on this machine (loopback only), each with its own
# share of the CPU devices. This is a real multi-host run in miniature: jax.distributed, gloo
# collectives, one data shard per process, checkpoints written cooperatively.
#
#   launch/local_multiprocess.sh 2 4 --gin_file=gin/demo.gin --model_dir=runs/demo_2proc
#     -> 2 processes x 4 CPU devices each (a global mesh of 8 devices)
#
# Logs: MODEL_DIR/process_<i>.log. Exits with the first non-zero status of any process.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS t5lite-train-flags..." >&2
  exit 2
fi
num_processes=$1; devices=$2; shift 2
model_dir=""
for arg in "$@"; do
  case "$arg" in --model_dir=*) model_dir=${arg#--model_dir=} ;; esac
done
[ -n "$model_dir" ] || { echo "error: pass --model_dir=DIR" >&2; exit 2; }
mkdir -p "$model_dir"
t5lite=${T5LITE:-$(dirname "$0")/../.venv/bin/t5lite}
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    "$t5lite" train "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num_processes" --process_id="$i" --cpu_collectives=gloo \
    > "$model_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { s=$?; [ $status -ne 0 ] || status=$s; }
done
tail -n 5 "$model_dir/process_0.log"
exit $status
