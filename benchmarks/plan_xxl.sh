#!/usr/bin/env bash
# T5 v1.1-XXL pretraining verdicts: one `t5lite plan` per slice and recipe, each in its own
# process, timed by /usr/bin/time (wall, CPU, peak RSS of the planning process).
#   bash benchmarks/plan_xxl.sh "v4-256 v5p-256" "fsdp dp_tp fsdp_tp dp tp"
# Writes benchmarks/results/plan/xxl_<slice>_<recipe>.json (the plan's JSON line) and .time
# (the command, the date, CPU model, load average before, and /usr/bin/time's figures);
# compiled HLO goes to ${HLO_DIR:-/tmp/t5lite_plan_hlo}.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SLICES=${1:-"v4-256 v5p-256"}
RECIPES=${2:-"fsdp dp_tp fsdp_tp dp tp"}
LIMIT=${LIMIT:-1800}
OUT=benchmarks/results/plan
mkdir -p "$OUT"
for slice in $SLICES; do
  for recipe in $RECIPES; do
    cmd="t5lite plan --gin_file=gin/models/t5_1_1/xxl.gin --gin_file=gin/runs/pretrain.gin --topology=$slice --partitioning=$recipe --format=json --save_hlo=${HLO_DIR:-/tmp/t5lite_plan_hlo}"
    {
      echo "command: $cmd"
      echo "date: $(date -u +%FT%TZ)"
      echo "cpu: $(lscpu | grep 'Model name' | sed 's/  */ /g')"
      echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    } > "$OUT/xxl_${slice}_${recipe}.time"
    /usr/bin/time -f "time: %e s wall, %U s user, %S s sys, %M KiB max RSS" -a \
      -o "$OUT/xxl_${slice}_${recipe}.time" nice -n 10 timeout "$LIMIT" \
      $PY -m t5lite.cli ${cmd#t5lite } > "$OUT/xxl_${slice}_${recipe}.json" \
      2> "/tmp/plan_xxl_${slice}_${recipe}.err"
    echo "exit: $?" >> "$OUT/xxl_${slice}_${recipe}.time"
    echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/xxl_${slice}_${recipe}.time"
    cat "$OUT/xxl_${slice}_${recipe}.time"
  done
done
