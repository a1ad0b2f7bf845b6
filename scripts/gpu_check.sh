#!/usr/bin/env bash
# On the lent GPU machine (device tool): build rglcd_fast from source, run the whole test suite
# (CUDA cases included), the op tests under compute-sanitizer, and the op benchmark.
#   device run:  bash scripts/gpu_check.sh [tests|sanitizer|bench|sampling|train|all]...   (carry .whl: see shared/wheels)
# Logs and benchmark tables go to $OUT (the device tool brings them back; commit the tables under
# benchmarks/results/ as ops_<card>.md, sampling_<card>.md and train_step_<card>.md). RGLCD_COMMIT names the
# commit measured where the copy on the device has no git history. "train" (the SD2.1-scale training-step
# benchmark, a few minutes) runs only when named: "all" leaves it out.
set -uo pipefail
OUT=${OUT:-/tmp/rglcd_out}
mkdir -p "$OUT"
stages=${*:-all}
# The image's default compiler (CC/CXX point at /opt/gcc) links libstdc++ statically: C++ exceptions
# thrown by our kernels then crash instead of reaching Python. The system g++ shares torch's libstdc++.
export CC=gcc CXX=g++
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if ls .whl/*.whl >/dev/null 2>&1; then  # diffusers (the schedulers' equivalence tests) is not on the image
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

start=$(date +%s)
python3 setup.py build_ext --inplace --force > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import rglcd_fast as r; assert r.has_cuda_kernels(), r.extension_load_error(); print('CUDA kernels active')" || exit 1

status=0
run_stage() { [[ " $stages " == *" all "* || " $stages " == *" $1 "* ]]; }
if run_stage tests; then  # PYTEST_ARGS: what to run (default: all of tests/)
  python3 -m pytest -q -rs ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if run_stage sanitizer; then
  # The op tests' CUDA cases (SANITIZER_TOOLS / SANITIZER_SELECT narrow it to fit a device call).
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck initcheck}; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
      python3 -m pytest -q -x tests/test_consistency.py tests/test_solver.py tests/test_reward.py \
      -k "${SANITIZER_SELECT:-cuda and not compile and not opcheck}" -p no:cacheprovider \
      > "$OUT/sanitizer_$tool.log" 2>&1
    code=$?
    echo "compute-sanitizer $tool: exit $code; $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer_$tool.log" | tail -2 | tr '\n' ' ')"
    [ $code -eq 0 ] || status=1
  done
fi
if run_stage bench; then
  python3 benchmarks/bench_ops.py --out "$OUT/ops.md" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if run_stage sampling; then
  python3 benchmarks/bench_sampling.py --out "$OUT/sampling.md" ${SAMPLING_ARGS:-} 2>&1 | tee "$OUT/sampling.log" | tail -20
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [[ " $stages " == *" train "* ]]; then  # TRAIN_ARGS: e.g. "--reward off --steps 20"
  python3 benchmarks/bench_train_step.py --out "$OUT/train_step.md" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_step.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
