#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: copy this checkout to every worker, install, and start
# `t5lite train` on all workers at once. JAX discovers the pod topology itself
# (T5LITE_DISTRIBUTED=auto -> jax.distributed.initialize() with no arguments).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b MODEL_DIR=gs://bucket/runs/small \
#     launch/tpu_vm.sh --gin_file=gin/models/t5_1_1/small.gin --gin_file=gin/runs/pretrain.gin \
#       --gin.MIXTURE_OR_TASK_NAME=c4_span_corruption
#
# MODEL_DIR should be a gs:// path (shared by all workers; Orbax writes it cooperatively).
# Preemption: the TPU runtime sends SIGTERM; t5lite saves the current step and exits 0, and
# running this script again resumes from that checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"; : "${ZONE:?set ZONE}"; : "${MODEL_DIR:?set MODEL_DIR}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-t5lite}
# jax for TPU: the libtpu wheel comes from the jax[tpu] extra.
INSTALL="cd $REMOTE_DIR && python3.11 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]>=0.10,<0.11'"
ARGS=$(printf ' %q' "$@")

tar czf /tmp/t5lite-src.tgz --exclude=.venv --exclude=runs --exclude=.git .
gcloud compute tpus tpu-vm scp /tmp/t5lite-src.tgz "$TPU_NAME":/tmp/ --worker=all --zone="$ZONE" $PROJECT_FLAG
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" $PROJECT_FLAG --command="
  mkdir -p $REMOTE_DIR && tar xzf /tmp/t5lite-src.tgz -C $REMOTE_DIR && ($INSTALL) &&
  cd $REMOTE_DIR && T5LITE_DISTRIBUTED=auto .venv/bin/t5lite train --model_dir=$MODEL_DIR $ARGS"
