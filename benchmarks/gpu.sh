#!/usr/bin/env bash
# t5lite benchmarks on an accelerator machine without network access.
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else benchmarks/results/gpu
#   DRY_RUN=1 bash benchmarks/gpu.sh /tmp/x   # CPU check of the whole script: tiny model, 1 step
#
# 1. Installs JAX for CUDA and t5lite's model/trainer dependencies from wheels carried with the
#    tree in benchmarks/wheels/ (no network). Fill that folder beforehand on a networked machine
#    with the same OS, CPU architecture and Python (3.11):
#
#        python3.11 -m pip download -d benchmarks/wheels "jax[cuda12]==0.10.2" \
#            "flax==0.12.8" "optax==0.2.8" "orbax-checkpoint==0.12.8" gin-config absl-py numpy
#
#    (The data stack -- seqio, TensorFlow -- is not needed: the benchmarks use synthetic batches.)
#    A virtualenv is created at $VENV (default .venv-gpu); if it already imports jax with a GPU
#    backend the install step is skipped.
# 2. Runs, for a ~1B-parameter encoder-decoder (default T5 v1.1-large shape, 783M parameters;
#    MODEL_GIN=gin/models/modern/large.gin for the modern preset) at 512/114, packed, bfloat16:
#      - benchmarks/train_step.py (compile time, median step, tokens/s, MFU vs PEAK_FLOPS)
#        for BATCH (default 64) with ATTENTION implementations (default "einsum cudnn") and
#        REMAT policies (default "none dots");
#      - greedy decoding speed (batch 8 and 64, 512 inputs, 64 new tokens; t5lite only).
#    Each run writes a JSON file into OUT_DIR; a failing configuration (e.g. out of memory) is
#    logged and the script continues. summary.txt collects the one-line results.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT_DIR=${1:-${OUT:-$ROOT/benchmarks/results/gpu}}
WHEELS=${WHEELS:-$ROOT/benchmarks/wheels}
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-$ROOT/.venv-gpu}
DRY_RUN=${DRY_RUN:-0}
MODEL_GIN=${MODEL_GIN:-gin/models/t5_1_1/large.gin}
BATCH=${BATCH:-64}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
ATTENTION=${ATTENTION:-einsum cudnn}
REMAT=${REMAT:-none dots}
DECODE_BATCHES=${DECODE_BATCHES:-8 64}
INPUTS=512
TARGETS=114

mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_bench.log"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if [[ "$DRY_RUN" == "1" ]]; then
  # CPU rehearsal with the development virtualenv: tiny model, one step, same code paths.
  PY=${PY:-$ROOT/.venv/bin/python}
  MODEL_GIN=gin/models/t5_1_1/tiny.gin
  BATCH=2; STEPS=1; WARMUP=0; INPUTS=64; TARGETS=16
  ATTENTION="einsum xla"; REMAT="none"; DECODE_BATCHES="2"
  PEAK_FLAG=(--no_peak)
  say "DRY_RUN: $PY, $MODEL_GIN, batch $BATCH, $INPUTS/$TARGETS"
else
  PEAK_FLAG=()
  PY="$VENV/bin/python"
  if [[ -x "$PY" ]] && "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
      2>/dev/null; then
    say "using existing $VENV (jax with GPU backend)"
  else
    if ! ls "$WHEELS"/jax_cuda12_plugin-*.whl >/dev/null 2>&1; then
      say "error: no CUDA JAX wheels in $WHEELS; fill it on a networked machine first (see the"
      say "       header of benchmarks/gpu.sh for the pip download command)"
      exit 2
    fi
    say "creating $VENV and installing from $WHEELS (no network)"
    "$PYTHON" -m venv "$VENV" || exit 2
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" \
      "jax[cuda12]==0.10.2" flax optax orbax-checkpoint gin-config absl-py numpy \
      >>"$LOG" 2>&1 || { say "error: pip install from $WHEELS failed (see $LOG)"; exit 2; }
  fi
  "$PY" -c 'import jax; print(jax.__version__, jax.devices())' 2>&1 | tee -a "$LOG"
  if ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() == "cpu")'; then
    say "error: JAX sees no accelerator (jax.devices() is CPU only)"
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv | tee -a "$LOG"
fi

export PYTHONPATH="$ROOT:$ROOT/tasks${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
name=$(basename "$MODEL_GIN" .gin)
failures=0

for attn in $ATTENTION; do
  for remat in $REMAT; do
    tag="train_${name}_b${BATCH}_${attn}_remat-${remat}"
    say "train step: $tag"
    if "$PY" benchmarks/train_step.py --gin_file="$MODEL_GIN" --dtype=bfloat16 --packed \
        --batch_size="$BATCH" --inputs_length="$INPUTS" --targets_length="$TARGETS" \
        --steps="$STEPS" --warmup="$WARMUP" "${PEAK_FLAG[@]}" \
        --gin="ModelConfig.attention_impl=\"$attn\"" --gin="ModelConfig.remat_policy=\"$remat\"" \
        --out="$OUT_DIR/$tag.json" >"$OUT_DIR/$tag.log" 2>&1; then
      echo "$tag: $(grep '^step ' "$OUT_DIR/$tag.log")" | tee -a "$SUMMARY"
    else
      failures=$((failures + 1))
      echo "$tag: FAILED (last lines of $tag.log:)" | tee -a "$SUMMARY"
      tail -n 5 "$OUT_DIR/$tag.log" | tee -a "$SUMMARY"
    fi
  done
done

for b in $DECODE_BATCHES; do
  tag="decode_${name}_b${b}"
  say "greedy decode: $tag"
  if "$PY" benchmarks/vs_transformers.py --gin_file="$MODEL_GIN" --dtype=bfloat16 \
      --skip_train --skip_transformers --decode_batch="$b" --decode_input_len="$INPUTS" \
      --new_tokens=64 --decode_repeats=3 --out="$OUT_DIR/$tag.json" >"$OUT_DIR/$tag.log" 2>&1
  then
    echo "$tag: $(grep '^decode ' "$OUT_DIR/$tag.log")" | tee -a "$SUMMARY"
  else
    failures=$((failures + 1))
    echo "$tag: FAILED (last lines of $tag.log:)" | tee -a "$SUMMARY"
    tail -n 5 "$OUT_DIR/$tag.log" | tee -a "$SUMMARY"
  fi
done

say "done: results in $OUT_DIR ($failures failed configuration(s))"
cat "$SUMMARY"
[[ $failures -eq 0 ]]
