#!/usr/bin/env bash
# The 2-rank gloo test (tests/test_train_trainer.py::test_two_processes_stay_in_sync_and_resume) N times,
# P runs at a time, CPU only: the evidence that it does not flake. Each failure's log (both ranks' output,
# with every thread's Python stack on a native abort) is kept as $OUT/two_ranks_fail_<i>.log.
#   bash scripts/loop_two_ranks.sh [N=30] [P=1]
set -u
N=${1:-30} P=${2:-1} OUT=${OUT:-/tmp/rglcd_out}
mkdir -p "$OUT"
one() {
  local log="/tmp/two_ranks_$1.log"
  CUDA_VISIBLE_DEVICES= timeout 900 python3 -m pytest -q -x -p no:cacheprovider --basetemp="/tmp/two_ranks_$1" \
    tests/test_train_trainer.py -k two_processes > "$log" 2>&1
  local code=$?
  if [ $code -eq 0 ]; then rm -f "$log"; else mv "$log" "$OUT/two_ranks_fail_$1.log"; fi
  echo "run $1: exit $code"
}
export -f one
export OUT
seq 1 "$N" | xargs -P "$P" -I{} bash -c 'one {}' | tee "$OUT/two_ranks_summary.txt"
echo "two-rank test: $(grep -c 'exit 0' "$OUT/two_ranks_summary.txt") of $N passed" | tee -a "$OUT/two_ranks_summary.txt"
