#!/usr/bin/env bash
# On the lent GPU machine (device tool): build rglcd_fast from source, run the whole test suite
# (CUDA cases included), the op tests under compute-sanitizer, and the op benchmark.
#   device run:  bash scripts/gpu_check.sh [tests|fuzz|sanitizer|bench|sampling|sampling_sdxl|train|train_sdxl|vae_decode|fp8_teacher|multi_gpu|two_ranks|all]...
#   (carry .whl, an ignored folder holding the diffusers and importlib_metadata wheels: see scripts/device_env.sh)
# Logs and benchmark tables go to $OUT (the device tool brings them back; commit the tables under
# benchmarks/results/ as ops_<card>.md, sampling_<card>.md and train_step_<card>.md). RGLCD_COMMIT names the
# commit measured where the copy on the device has no git history. "train" (the SD2.1-scale training-step
# benchmark, a few minutes) and "multi_gpu" (a machine of several GPUs: data-parallel training through
# accelerate launch on 1 and all GPUs, SD2.1 scale and the digits world, and a 2-rank resume) run only when
# named: "all" leaves them out, and so "two_ranks" (the 2-rank gloo test in a loop on the CPUs, beside the rest).
# Run serially the whole test suite does not fit one call's 10 minutes (46% of it in 500 s on an H100); the
# tests stage runs pytest-xdist workers. Where that does not fit either, split it with PYTEST_ARGS, e.g.
# "tests/test_[a-r]*.py" in one call and "tests/test_[s-z]*.py" (RGLCD_SKIP_BUILD=1, the machine warm) in the next,
# or copy the cut-off call's tests.log into the tree and name it in TESTS_AFTER: the next call runs what it did not pass.
set -uo pipefail
OUT=${OUT:-/tmp/rglcd_out}
mkdir -p "$OUT"
stages=${*:-all}
# The image's default compiler (CC/CXX point at /opt/gcc) links libstdc++ statically: C++ exceptions
# thrown by our kernels then crash instead of reaching Python. The system g++ shares torch's libstdc++.
export CC=gcc CXX=g++
# NVLink multicast stays off (device docs: it can take the host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
source scripts/device_env.sh  # diffusers (the schedulers' equivalence tests)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

start=$(date +%s)
if [ "${RGLCD_SKIP_BUILD:-0}" != 1 ]; then  # 1: stages run side by side after one build (e.g. one per GPU)
  python3 setup.py build_ext --inplace --force > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
fi
python3 -c "import rglcd_fast as r; assert r.has_cuda_kernels(), r.extension_load_error(); print('CUDA kernels active')" || exit 1

status=0
run_stage() { [[ " $stages " == *" all "* || " $stages " == *" $1 "* ]]; }
if [[ " $stages " == *" two_ranks "* ]]; then  # CPU only, beside the GPU stages: TWO_RANKS_RUNS runs, 4 at a time
  OUT=$OUT bash scripts/loop_two_ranks.sh "${TWO_RANKS_RUNS:-40}" 4 > "$OUT/two_ranks_loop.log" 2>&1 &
  two_ranks=$!
fi
if run_stage tests; then  # PYTEST_ARGS: what to run (default: all of tests/)
  # The image lacks the test extra's wandb and datasets (and has no package index): their tests are left
  # out by name, and said so.
  absent=()
  python3 -c "import wandb" 2>/dev/null \
    || absent+=(--deselect "tests/test_train_cli.py::test_validation_grids_reach_the_tracker_as_images[wandb]")
  python3 -c "import datasets" 2>/dev/null || absent+=(--deselect tests/test_train_data.py::test_hugging_face_data_sets_on_disk
    --deselect tests/test_train_data.py::test_the_runs_data_settings_reach_the_data_set)
  [ ${#absent[@]} -eq 0 ] || echo "left out (package absent here): ${absent[*]}" | tee "$OUT/tests_left_out.txt"
  # The whole suite takes longer than one device call serially: TEST_WORKERS pytest-xdist workers share the
  # GPU, and each test's outcome is written to tests.log as it ends (-v), so a call cut off by its time
  # limit still names what passed and what failed; a test hung past TEST_TIMEOUT s fails with its stack.
  # Each worker gets its share of the CPU threads (torch takes all cores per process otherwise), and idle workers
  # steal queued tests from one held by a long test.
  parallel=() threads=()
  workers=${TEST_WORKERS:-8}
  python3 -c "import xdist" 2>/dev/null && parallel+=(-n "$workers" --dist worksteal) \
    && threads=(env OMP_NUM_THREADS=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 )))
  python3 -c "import pytest_timeout" 2>/dev/null && parallel+=(--timeout "${TEST_TIMEOUT:-400}")
  selection=(${PYTEST_ARGS:-tests})
  if [ -n "${TESTS_AFTER:-}" ]; then  # a cut-off call's tests.log, copied into the tree: run what it did not pass
    python3 -m pytest --collect-only -q "${selection[@]}" 2>/dev/null | grep "^tests/.*::" | sort -u > "$OUT/collected.txt"
    sed -nE 's/.*(PASSED|SKIPPED|XFAIL|XPASS) (tests\/.*[^ ]) *$/\2/p' "$TESTS_AFTER" | sort -u \
      | comm -23 "$OUT/collected.txt" - > "$OUT/unfinished.txt"
    mapfile -t selection < "$OUT/unfinished.txt"
    echo "TESTS_AFTER: ${#selection[@]} tests not passed in $TESTS_AFTER"
  fi
  "${threads[@]}" python3 -m pytest -v -rfEs --tb=short "${parallel[@]}" "${selection[@]}" "${absent[@]}" > "$OUT/tests.log" 2>&1
  [ $? -eq 0 ] || status=1
  grep -E "(FAILED|ERROR) " "$OUT/tests.log" | sed 's/^\[gw[0-9]*\] *\[ *[0-9]*%\] *//' | sort -u | head -30
  tail -3 "$OUT/tests.log"
fi
if run_stage fuzz; then  # the property-based op tests on the GPU kernels
  RGLCD_FUZZ_DEVICE=cuda RGLCD_FUZZ_EXAMPLES=${RGLCD_FUZZ_EXAMPLES:-300} python3 -m pytest -q tests/test_fuzz.py 2>&1 \
    | tee "$OUT/fuzz_cuda.log" | tail -5
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if run_stage sanitizer; then
  # The op tests' CUDA cases (SANITIZER_TOOLS / SANITIZER_FILES / SANITIZER_SELECT narrow it to fit a device call).
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck initcheck}; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
      python3 -m pytest -q -x ${SANITIZER_FILES:-tests/test_consistency.py tests/test_solver.py tests/test_reward.py} \
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
if run_stage sampling_sdxl; then  # SDXL architecture, 1024 px, batch 1
  python3 benchmarks/bench_sampling.py --arch sdxl --out "$OUT/sampling_sdxl.md" ${SAMPLING_ARGS:-} 2>&1 \
    | tee "$OUT/sampling_sdxl.log" | tail -20
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [[ " $stages " == *" train "* ]]; then  # TRAIN_ARGS: e.g. "--reward off --steps 20"
  python3 benchmarks/bench_train_step.py --out "$OUT/train_step.md" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_step.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [[ " $stages " == *" vae_decode "* ]]; then  # the VAE decode, upsamplers folded or not (VAE_ARGS: e.g. --arch sdxl)
  python3 benchmarks/bench_vae_decode.py --out "$OUT/vae_decode.md" ${VAE_ARGS:-} 2>&1 | tee "$OUT/vae_decode.log" | tail -14
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [[ " $stages " == *" fp8_teacher "* ]]; then  # the teacher in float8 (torchao: its wheel carried in .whl)
  python3 benchmarks/bench_fp8_teacher.py --out "$OUT/fp8_teacher.md" ${FP8_ARGS:-} 2>&1 | tee "$OUT/fp8_teacher.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [[ " $stages " == *" train_sdxl "* ]]; then  # the LCM-LoRA step at SDXL scale, script vs ours (TRAIN_SDXL_ARGS)
  python3 benchmarks/bench_train_step_sdxl.py --out "$OUT/train_step_sdxl.md" ${TRAIN_SDXL_ARGS:-} 2>&1 \
    | tee "$OUT/train_step_sdxl.log" | tail -10
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [[ " $stages " == *" multi_gpu "* ]]; then  # MULTI_GPU_PARTS: any of sd21 fsdp_sdxl digits pytest (default all); MULTI_GPU_ARGS,
  # MULTI_GPU_REWARD and MULTI_GPU_COUNTS (GPUs a run, default "1 N") narrow the sd21 runs
  gpus=$(nvidia-smi -L | wc -l)
  launch() {  # launch N ARGS...: one process per GPU on the first N GPUs
    local n=$1; shift
    accelerate launch --num_processes "$n" --num_machines 1 $([ "$n" -gt 1 ] && echo --multi_gpu) \
      --mixed_precision bf16 --dynamo_backend no "$@"
  }
  parts=${MULTI_GPU_PARTS:-sd21 fsdp_sdxl digits pytest}
  if [[ " $parts " == *" sd21 "* ]]; then
    for reward in ${MULTI_GPU_REWARD:-off on}; do
      for n in ${MULTI_GPU_COUNTS:-1 $gpus}; do  # e.g. one count a call for a compile variant (minutes each)
        launch "$n" benchmarks/bench_multi_gpu.py --reward "$reward" --json "$OUT/multi_gpu.jsonl" \
          ${MULTI_GPU_ARGS:-} > "$OUT/sd21_reward_${reward}_${n}gpu.log" 2>&1 || { status=1; tail -20 "$OUT/sd21_reward_${reward}_${n}gpu.log"; }
        tail -1 "$OUT/sd21_reward_${reward}_${n}gpu.log"
      done
    done
  fi
  if [[ " $parts " == *" fsdp_sdxl "* ]]; then  # the full SDXL student sharded (FSDP2) on 2 and on all GPUs
    for n in $(printf '%s\n' 2 "$gpus" | sort -nu); do  # (one 80 GB GPU does not hold it with AdamW)
      launch "$n" benchmarks/bench_multi_gpu.py --arch sdxl --variant rglcd_fast_fsdp --batch "${FSDP_SDXL_BATCH:-4}" \
        --json "$OUT/multi_gpu.jsonl" ${FSDP_SDXL_ARGS:-} > "$OUT/sdxl_fsdp_${n}gpu.log" 2>&1 \
        || { status=1; tail -20 "$OUT/sdxl_fsdp_${n}gpu.log"; }
      tail -1 "$OUT/sdxl_fsdp_${n}gpu.log"
    done
  fi
  digits=()
  if [[ " $parts " == *" digits "* ]]; then  # `rglcd-fast train` as the README runs it, then a resume on all GPUs
    for n in 1 "$gpus"; do
      dir=/tmp/digits_${n}gpu
      rm -rf "$dir"
      launch "$n" -m rglcd_fast.cli train --output-dir "$dir" --progress false > "$OUT/digits_${n}gpu.log" 2>&1 \
        || { status=1; tail -20 "$OUT/digits_${n}gpu.log"; }
      digits+=("$n:$dir")
    done
    launch "$gpus" -m rglcd_fast.cli train --output-dir "/tmp/digits_${gpus}gpu" --progress false \
      --resume-from-checkpoint latest --max-train-steps 400 > "$OUT/digits_resume.log" 2>&1 \
      || { status=1; tail -20 "$OUT/digits_resume.log"; }
    for n in 1 "$gpus"; do
      mkdir -p "$OUT/digits_${n}gpu" && cp -r /tmp/digits_${n}gpu/{logs.csv,samples} "$OUT/digits_${n}gpu/"
    done
    echo "resumed run: steps $(cut -d, -f1 /tmp/digits_${gpus}gpu/logs.csv | tr '\n' ' ')"
  fi
  if [[ " $parts " == *" pytest "* ]]; then  # NCCL: in sync, bitwise resume (DDP, and the FSDP student)
    python3 -m pytest -q tests/test_train_trainer.py -k "two_processes or two_ranks" -p no:cacheprovider \
      > "$OUT/two_ranks_nccl.log" 2>&1 || status=1
    echo "two-rank trainer test (NCCL): $(tail -1 "$OUT/two_ranks_nccl.log")"
  fi
  if [ -s "$OUT/multi_gpu.jsonl" ]; then
    python3 benchmarks/bench_multi_gpu.py --report "$OUT/multi_gpu.jsonl" --digits "${digits[@]}" \
      --out "$OUT/multi_gpu.md" | tail -20
  fi
fi
if [ -n "${two_ranks:-}" ]; then
  wait $two_ranks
  tail -1 "$OUT/two_ranks_loop.log"
  grep -q "of ${TWO_RANKS_RUNS:-40} passed" "$OUT/two_ranks_loop.log" && ! ls "$OUT"/two_ranks_fail_* >/dev/null 2>&1 || status=1
fi
exit $status
