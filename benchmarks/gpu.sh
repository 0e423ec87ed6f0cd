#!/usr/bin/env bash
# t5lite benchmarks on an accelerator machine without network access.
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else benchmarks/results/gpu
#   DRY_RUN=1 bash benchmarks/gpu.sh /tmp/x   # CPU rehearsal of the whole script: tiny model
#
# Python and JAX: uses $PYTHON (default python3) when it already imports JAX with a GPU backend
# (e.g. a CUDA image that ships JAX). Python packages it lacks travel as wheels in $WHEELS
# (default: .whl/ if it holds wheels, else benchmarks/wheels/) and are installed with
# `pip --no-index --no-deps --target` into a private folder put first on PYTHONPATH; nothing is
# fetched. Fill the folder on a networked machine for the target's Python, e.g. for Python 3.12
# with JAX 0.11.2:
#
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl flax==0.12.12 optax==0.2.8 \
#         orbax-checkpoint==0.12.8 gin-config==0.5.0
#
# (JAX 0.11 needs flax >= 0.12.10. The data stack -- seqio, TensorFlow -- is not needed: the
# benchmarks use synthetic batches.) A smoke test (tiny model: one train step, one decode) runs
# first; when it fails with the carried flax/optax/orbax, the script retries with the machine's
# own copies and only gin-config carried, and stops if that fails too.
#
# What runs, in order, each in its own process under `timeout $RUN_TIMEOUT` (an out-of-memory or
# failing configuration is logged and the script goes on); no new run starts after
# $TIME_BUDGET seconds:
#   train  T5 v1.1-large (783M)  batch 32  cudnn attention   no remat   (+ bf16 jnp.dot peak)
#   train  the same with the step options of issue 16 (sharedbias,castonce,vocabchunk below)
#   train  the same with them and remat save_projections
#   train  T5 v1.1-large (783M)  batch 32  einsum attention  no remat   (the CPU default)
#   train  modern large (571M, RoPE+GQA+SwiGLU)  batch 64  cudnn attention  no remat
#   decode T5 v1.1-large greedy, batch 8 and 64, 512 inputs, 64 new tokens
# All train runs: bfloat16 compute, 512 inputs / 114 targets, packed (two examples per row),
# Adafactor. MFU is model FLOPs / step time / the published dense bf16 peak (989 TFLOP/s for
# H100/H200), and also against the bf16 matmul rate measured in the same run.
# Override the list with RUNS="train:GIN:BATCH:ATTENTION:REMAT[:OPTIONS] ... decode:GIN:BATCH",
# OPTIONS a comma-separated subset of
#   unrolled   ModelConfig.scan_layers=False (one HLO per layer instead of a scanned stack)
#   adamw      AdamW instead of Adafactor
#   notriton   XLA_FLAGS+=--xla_gpu_enable_triton_gemm=false (cuBLAS for every matmul)
#   profile    also trace two steps with jax.profiler; the trace is kept as
#              OUT_DIR/<run>.xplane.pb.gz (read it with benchmarks/profile_summary.py)
#   sharedbias ModelConfig.shared_relative_bias=True (one [1, H, Q, K] relative bias per stack)
#   castonce   ModelConfig.cast_params_once=True (kernels cast to bf16 once per step)
#   vocabchunk the loss over 4096 vocabulary entries at a time (LossConfig.vocab_chunk; no
#              float32 [B, T, V] logits)
#   unrollN    ModelConfig.scan_unroll=N (N layers per iteration of the layer scan)
# and REMAT may be any ModelConfig.remat_policy, e.g. save_projections.
#
# Everything lands in OUT_DIR as gpu_bench.log (all output), results.jsonl (one JSON record per
# run, the fields of benchmarks/train_step.py / vs_transformers.py), summary.txt, and any traces.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT_DIR=${1:-${OUT:-$ROOT/benchmarks/results/gpu}}
if [[ -z "${WHEELS:-}" ]]; then
  if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then WHEELS=$ROOT/.whl; else WHEELS=$ROOT/benchmarks/wheels; fi
fi
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/t5lite-site}
DRY_RUN=${DRY_RUN:-0}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
TIME_BUDGET=${TIME_BUDGET:-400}
RUN_TIMEOUT=${RUN_TIMEOUT:-170}
# every run keeps its compiled programs here: a rerun of the script on the same machine (e.g. after
# a run hit RUN_TIMEOUT) loads them instead of compiling again (t5lite/compile_cache.py)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/t5lite-xla-cache}
INPUTS=512
TARGETS=114
USER_RUNS=${RUNS:-}
RUNS=${RUNS:-"train:gin/models/t5_1_1/large.gin:32:cudnn:none \
train:gin/models/t5_1_1/large.gin:32:cudnn:none:sharedbias,castonce,vocabchunk \
train:gin/models/t5_1_1/large.gin:32:cudnn:save_projections:sharedbias,castonce,vocabchunk \
train:gin/models/t5_1_1/large.gin:32:einsum:none \
train:gin/models/modern/large.gin:64:cudnn:none \
decode:gin/models/t5_1_1/large.gin:8 decode:gin/models/t5_1_1/large.gin:64"}
PEAK_FLAG=(--measure_device_peak)

if [[ "$DRY_RUN" == "1" ]]; then
  RUNS=${USER_RUNS:-"train:gin/models/t5_1_1/tiny.gin:2:einsum:none \
train:gin/models/t5_1_1/tiny.gin:2:einsum:save_projections:sharedbias,castonce,vocabchunk,unroll2 \
train:gin/models/modern/small.gin:2:xla:dots decode:gin/models/t5_1_1/tiny.gin:2"}
  STEPS=1; WARMUP=0; INPUTS=64; TARGETS=16
  PEAK_FLAG=(--no_peak)
fi

mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_bench.log"
SUMMARY="$OUT_DIR/summary.txt"
RESULTS="$OUT_DIR/results.jsonl"
SCRATCH=$(mktemp -d)
: >"$LOG"; : >"$SUMMARY"; : >"$RESULTS"
START=$SECONDS
say() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

say "machine: $(uname -m), $(nproc) CPUs; $PYTHON = $("$PYTHON" --version 2>&1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv 2>&1 | tee -a "$LOG"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
             "orbax-checkpoint", "gin-config", "numpy"):
    try:
        print(f"  machine's {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  machine's {name}: not installed")
EOF

# --- packages: carried wheels first, then the machine's own with gin-config alone ------------
export PYTHONPATH_BASE="$ROOT:$ROOT/tasks${PYTHONPATH:+:$PYTHONPATH}"
smoke() {  # one tiny train step and one tiny decode on the default backend
  PYTHONPATH="$1:$PYTHONPATH_BASE" timeout 300 "$PYTHON" - <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import jax, flax, optax, gin  # noqa: F401
import train_step, vs_transformers
cfg = train_step.model_config_from_gin(["gin/models/t5_1_1/tiny.gin"])
r = train_step.run(cfg, batch_size=2, inputs_length=32, targets_length=8, steps=1, warmup=0,
                   packed=True, measure_peak=False, log=lambda *_: None)
print(f"smoke: train step ok on {jax.devices()[0].device_kind} (jax {jax.__version__}, "
      f"flax {flax.__version__}), loss {r['last_loss']:.3f}")
EOF
}
install_wheels() {  # $1 = target folder, rest = wheel files
  local target=$1; shift
  rm -rf "$target"; mkdir -p "$target"
  [[ $# -eq 0 ]] && return 0
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$target" "$@" >>"$LOG" 2>&1
}
shopt -s nullglob
ALL_WHEELS=("$WHEELS"/*.whl)
GIN_WHEELS=("$WHEELS"/gin_config-*.whl)
CHOSEN=""
for attempt in all gin; do
  if [[ $attempt == all ]]; then wheels=("${ALL_WHEELS[@]}"); else wheels=("${GIN_WHEELS[@]}"); fi
  dir="$SITE-$attempt"
  say "packages ($attempt): ${#wheels[@]} wheel(s) from $WHEELS -> $dir"
  if install_wheels "$dir" "${wheels[@]}" && smoke "$dir" 2>&1 | tee -a "$LOG" | grep -q '^smoke: '; then
    CHOSEN=$dir; break
  fi
  say "smoke test failed with packages ($attempt); see $LOG"
done
if [[ -z "$CHOSEN" ]]; then
  say "error: no working package set (JAX + flax + optax + orbax + gin-config); carry wheels in"
  say "       $WHEELS (see the header of benchmarks/gpu.sh)"
  exit 2
fi
export PYTHONPATH="$CHOSEN:$PYTHONPATH_BASE"
if [[ "$DRY_RUN" != "1" ]] && ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() == "cpu")'; then
  say "error: JAX sees no accelerator (jax.devices() is CPU only)"
  exit 2
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# --- the runs --------------------------------------------------------------------------------
failures=0
record() {  # tag, json path, log path, grep pattern
  local tag=$1 json=$2 log=$3 pattern=$4
  cat "$log" >>"$LOG"
  if [[ -s "$json" ]]; then
    "$PYTHON" -c 'import json,sys; r=json.load(open(sys.argv[1])); r["tag"]=sys.argv[2]; print(json.dumps(r))' \
      "$json" "$tag" >>"$RESULTS"
    echo "$tag: $(grep "$pattern" "$log" | tail -n 1)" | tee -a "$SUMMARY"
  else
    failures=$((failures + 1))
    echo "$tag: FAILED: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-300)" | tee -a "$SUMMARY"
  fi
}
for run in $RUNS; do
  if (( SECONDS - START > TIME_BUDGET )); then
    echo "$run: SKIPPED (time budget of $TIME_BUDGET s spent)" | tee -a "$SUMMARY"
    continue
  fi
  IFS=: read -r kind gin batch attn remat options <<<"$run"
  name=$(basename "$(dirname "$gin")")_$(basename "$gin" .gin)
  if [[ $kind == train ]]; then
    tag="train_${name}_b${batch}_${attn}_remat-${remat}${options:+_${options//,/_}}"
    extra=(); xla_flags=${XLA_FLAGS:-}; profile_dir=""
    for option in ${options//,/ }; do
      case $option in
        unrolled) extra+=(--gin="ModelConfig.scan_layers=False") ;;
        adamw) extra+=(--optimizer=adamw) ;;
        notriton) xla_flags="$xla_flags --xla_gpu_enable_triton_gemm=false" ;;
        sharedbias) extra+=(--gin="ModelConfig.shared_relative_bias=True") ;;
        castonce) extra+=(--gin="ModelConfig.cast_params_once=True") ;;
        vocabchunk) extra+=(--vocab_chunk=4096) ;;
        unroll[0-9]*) extra+=(--gin="ModelConfig.scan_unroll=${option#unroll}") ;;
        profile) profile_dir="$SCRATCH/profile_$tag"; extra+=(--profile_dir="$profile_dir") ;;
        *) say "error: unknown run option '$option' in '$run'"; exit 2 ;;
      esac
    done
    say "train step: $tag"
    XLA_FLAGS="$xla_flags" timeout "$RUN_TIMEOUT" "$PYTHON" benchmarks/train_step.py \
      --gin_file="$gin" --dtype=bfloat16 \
      --packed --batch_size="$batch" --inputs_length="$INPUTS" --targets_length="$TARGETS" \
      --steps="$STEPS" --warmup="$WARMUP" "${PEAK_FLAG[@]}" "${extra[@]}" \
      --gin="ModelConfig.attention_impl=\"$attn\"" --gin="ModelConfig.remat_policy=\"$remat\"" \
      --out="$SCRATCH/$tag.json" >"$SCRATCH/$tag.log" 2>&1
    record "$tag" "$SCRATCH/$tag.json" "$SCRATCH/$tag.log" '^step '
    if [[ -n "$profile_dir" ]]; then
      trace=$(find "$profile_dir" -name '*.xplane.pb' 2>/dev/null | head -n 1)
      if [[ -n "$trace" ]]; then gzip -c "$trace" >"$OUT_DIR/$tag.xplane.pb.gz"
      else say "no trace written for $tag"; fi
    fi
    [[ "$DRY_RUN" == "1" ]] || PEAK_FLAG=()   # the matmul peak is measured once
  else
    tag="decode_${name}_b${batch}"
    say "greedy decode: $tag"
    timeout "$RUN_TIMEOUT" "$PYTHON" benchmarks/vs_transformers.py --gin_file="$gin" \
      --dtype=bfloat16 --skip_train --skip_transformers --decode_batch="$batch" \
      --decode_input_len="$INPUTS" --new_tokens=64 --decode_repeats=3 \
      --out="$SCRATCH/$tag.json" >"$SCRATCH/$tag.log" 2>&1
    record "$tag" "$SCRATCH/$tag.json" "$SCRATCH/$tag.log" '^decode '
  fi
done

rm -rf "$SCRATCH"
say "done: results in $OUT_DIR ($failures failed run(s))"
cat "$SUMMARY"
[[ $failures -eq 0 ]]
