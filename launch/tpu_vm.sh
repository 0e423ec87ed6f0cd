#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (v4/v5e/v5p/v6e): the same command on every worker; JAX finds
# the other hosts by itself (T5LITE_DISTRIBUTED=auto -> jax.distributed.initialize()).
#
#   export TPU_NAME=my-v5p-64 ZONE=us-east5-a MODEL_DIR=gs://my-bucket/runs/t5_base
#   launch/tpu_vm.sh setup      # once: copy this checkout to every worker, install t5lite[tpu]
#   launch/tpu_vm.sh train --gin_file=gin/models/t5_1_1/base.gin --gin_file=gin/runs/pretrain.gin \
#       --gin.MIXTURE_OR_TASK_NAME=c4_span_corruption
#
# Variables:
#   TPU_NAME   the TPU VM (slice) name                                            (required)
#   ZONE       its zone                                                           (required)
#   MODEL_DIR  the run's model dir, passed as --model_dir; every host must see it: a gs:// path
#              (or a filesystem mounted on all workers)                     (required for train)
#   PROJECT    the Google Cloud project (default: gcloud's configured one)
#   REMOTE_DIR where the checkout lives on the workers (default: t5lite, i.e. ~/t5lite)
#   EXTRAS     the pip extras installed by `setup` (default: tpu)
#
# `setup` sends the committed checkout (`git archive HEAD`; a plain tar when this is no git
# checkout) to /tmp on every worker, unpacks it into REMOTE_DIR, creates REMOTE_DIR/.venv and
# runs `pip install -e ".[tpu]"` there. `train` (also the default verb) runs
# `t5lite train --model_dir=$MODEL_DIR "$@"` on all workers at once. Preemption: the TPU
# runtime sends SIGTERM; t5lite saves the current step and exits 0, so re-running `train`
# resumes from MODEL_DIR.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
REMOTE_DIR=${REMOTE_DIR:-t5lite}
EXTRAS=${EXTRAS:-tpu}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then WHERE+=(--project="${PROJECT}"); fi

verb=train
if [[ $# -gt 0 && ( "$1" == setup || "$1" == train ) ]]; then verb=$1; shift; fi

on_all_workers() {
  "${GCLOUD[@]}" ssh "${TPU_NAME}" "${WHERE[@]}" --worker=all --command="$1"
}

case "$verb" in
  setup)
    here="$(cd "$(dirname "$0")/.." && pwd)"
    tarball="$(mktemp -d)/t5lite.tar.gz"
    if git -C "$here" rev-parse --git-dir >/dev/null 2>&1; then
      git -C "$here" archive --format=tar.gz -o "$tarball" HEAD
    else
      tar -czf "$tarball" -C "$here" --exclude=.venv --exclude=runs --exclude=.git .
    fi
    "${GCLOUD[@]}" scp "$tarball" "${TPU_NAME}:/tmp/t5lite.tar.gz" "${WHERE[@]}" --worker=all
    on_all_workers "set -e; mkdir -p ${REMOTE_DIR} && tar -xzf /tmp/t5lite.tar.gz -C ${REMOTE_DIR} && cd ${REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install --quiet --upgrade pip && .venv/bin/pip install --quiet -e '.[${EXTRAS}]'"
    rm -f "$tarball"
    ;;
  train)
    : "${MODEL_DIR:?set MODEL_DIR to the run directory every worker sees (e.g. gs://bucket/run)}"
    ARGS=$(printf ' %q' "--model_dir=${MODEL_DIR}" "$@")
    on_all_workers "cd ${REMOTE_DIR} && T5LITE_DISTRIBUTED=auto .venv/bin/t5lite train${ARGS}"
    ;;
esac
