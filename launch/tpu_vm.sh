#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (v4/v5e/v5p/v6e): the same command on every worker; JAX finds
# the other hosts by itself (T5LITE_DISTRIBUTED=auto -> jax.distributed.initialize()).
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_vm.sh \
#       --gin_file=gin/models/t5_1_1/base.gin --gin_file=gin/runs/pretrain.gin \
#       --gin.MIXTURE_OR_TASK_NAME=c4_span_corruption --model_dir=/mnt/gcs/t5_base
#
# The checkout is expected at ~/t5lite on every worker (`make install` there once). The model dir
# must be a path that every host sees (e.g. a bucket mounted with gcsfuse at /mnt/gcs). Preemption: the TPU runtime sends
# SIGTERM; t5lite saves the current step and exits 0, so re-running this command resumes.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "${TPU}" --zone="${ZONE}" --worker=all \
  --command="cd ~/t5lite && T5LITE_DISTRIBUTED=auto .venv/bin/t5lite train${ARGS}"
