#!/usr/bin/env bash
# On the lent GPU machine (device tool): the digits-world measurements, students trained on the GPU
# (several `rglcd-fast train` processes at once), sampled and scored on the host's CPU as on any machine.
#   device run:  bash scripts/gpu_digits.sh sweep|eval|lrm   (carry .whl: see scripts/device_env.sh)
# sweep: rglcd-fast sweep (SEEDS, default 0; SCALES, default "0.1 0.3 1 3") -> $OUT/reward_vs_frechet.{png,md}
# eval:  rglcd-fast eval --seeds ${SEEDS:-0,1,2} -> $OUT/digits_eval.md
# lrm:   digits LRMs pre-trained side by side, LRM_VARIANTS="name:--max-train-steps 6000 ...;name2:..."
#        (python -m rglcd_fast.world.lrm), each printing its pairwise accuracy against the expert
# LIMIT (seconds) stops the work in time for the results to be packed (a device call's limit kills everything).
# The tables and the plot come back in $OUT; they, the sample grids, the LRMs and the students' training logs
# (logs.csv, validation grids) in $OUT/results.tar.gz (the device returns at most 8 files). The extension is not
# built: the ops run their PyTorch references (same math), which is all a tiny world needs.
set -uo pipefail
OUT=${OUT:-/tmp/rglcd_out}
mkdir -p "$OUT"
source scripts/device_env.sh
work=${WORK:-/tmp/rglcd_digits}
results=$work/results  # -> $OUT/results.tar.gz; the tables and the plot also straight to $OUT
mkdir -p "$results" "$work/lrm"
start=$(date +%s)
case "${1:-sweep}" in
  sweep) timeout "${LIMIT:-infinity}" python3 -m rglcd_fast.cli sweep --work-dir "$work/sweep" --seeds "${SEEDS:-0}" --jobs "${JOBS:-8}" \
           --reward-scales ${SCALES:-0.1 0.3 1 3} --out "$results/reward_vs_frechet.png" --quiet ${EXTRA:-} ;;
  eval) timeout "${LIMIT:-infinity}" python3 -m rglcd_fast.cli eval --work-dir "$work/eval" --seeds "${SEEDS:-0,1,2}" --jobs "${JOBS:-8}" \
          --out "$results/digits_eval.md" --quiet ${EXTRA:-} ;;
  lrm) IFS=';' read -ra variants <<< "${LRM_VARIANTS:-preset:}"
       for variant in "${variants[@]}"; do
         name=${variant%%:*}
         timeout "${LIMIT:-infinity}" python3 -m rglcd_fast.world.lrm --out "$results/lrm/$name" ${variant#*:} > "$work/lrm/$name.log" 2>&1 &
       done
       wait
       for log in "$work"/lrm/*.log; do echo "$(basename "$log" .log): $(grep -h "pairwise accuracy\|Error" "$log" | tail -1) $(tail -1 "$log")"; done
       true ;;
  *) echo "usage: $0 sweep|eval|lrm"; exit 2 ;;
esac
status=$?
echo "$1: exit $status after $(( $(date +%s) - start )) s"
for csv in $(find "$work" -name logs.csv); do  # the students' training logs and validation grids
  run=$(dirname "$csv"); dest="$results/runs/${run#$work/}"
  mkdir -p "$dest" && cp "$csv" "$dest/" && cp -r "$run/samples" "$dest/" 2>/dev/null
done
for log in $(find "$work" -name "*.log" -not -path "$results/*"); do
  dest="$results/runs/${log#$work/}"; mkdir -p "$(dirname "$dest")" && cp "$log" "$dest"
done
cp "$results"/*.md "$results"/*.png "$OUT/" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$results" .
exit $status
