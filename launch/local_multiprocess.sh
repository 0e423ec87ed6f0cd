#!/usr/bin/env bash
# Run `t5lite train` as N local processes (multi-host rehearsal on one machine, CPU devices,
# gloo collectives). Every process gets DEVICES simulated CPU devices; the mesh spans all of them.
#
#   launch/local_multiprocess.sh 2 4 --gin_file=gin/demo.gin --model_dir=runs/mp_demo
#
# Process 0 writes metrics and model-dir files; all processes write their checkpoint shards.
# T5LITE overrides the t5lite executable (default .venv/bin/t5lite); PORT the coordinator port.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS t5lite-train-flags..." >&2
  exit 2
fi
NUM=$1; DEVICES=$2; shift 2
cd "$(dirname "$0")/.."
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < NUM; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES}" \
  T5LITE_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" T5LITE_NUM_PROCESSES="${NUM}" \
  T5LITE_PROCESS_ID="${i}" \
    "${T5LITE:-.venv/bin/t5lite}" train --cpu_collectives=gloo "$@" &
  pids+=($!)
done
# forward a stop request (preemption rehearsal) to every process
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
