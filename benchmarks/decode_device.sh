#!/usr/bin/env bash
# One device call for issue 14 (BENCHMARKS.md section 14): GPU tests, matrix-product shapes,
# the whole-model decode step, `infscaled run` with 1 stage, and (phase prefill, only when named)
# a generation stage's prefill (benchmarks/prefill_step.py). Phases are chosen by PHASES
# (default "tests gemm step gen"); each phase has its own time limit so the call ends inside
# the device's 10 minutes; `poisson` (benchmarks/gen_poisson.py) and `hostprof` (one gen case
# with py-spy on every process and the stage's GPU trace) and `tune` (the paged decode kernel's
# launch choices) and `poissonprof` (a Poisson run with py-spy and per-request timings) also run
# only when named.
# Run on the device machine from a copy of the repository root:
#   OUT=DIR bash benchmarks/decode_device.sh
#   OUT=DIR PHASES="prefill" PREFILL_ARGS="--profile" bash benchmarks/decode_device.sh
# Environment: STEP_ARGS (extra decode_step arguments), GEN_CASES (gen_1stage.sh cases),
# GPU_TESTS (test files), TUNE_ARGS (benchmarks/paged_decode_tune.py arguments), HOSTPROF_CASE / HOSTPROF_REQ / HOSTPROF_S, POISSON_ARGS (benchmarks/gen_poisson.py arguments), PREFILL_ARGS
# (prefill_step arguments, default --profile), T_TESTS / T_GEMM / T_STEP / T_GEN / T_POISSON /
# T_PREFILL (seconds per phase; T_GEN is per case: a llama-3b stage builds in
# 6-16 s (section 20; ~70 s before its weights were made in a thread pool), and with compile each
# new decode bucket compiles: a 16 x live requests case took 60-90 s).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1
OUT=${OUT:-out/device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
log="$OUT/log.txt"
{
  date -u
  nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
} 2>&1 | tee -a "$log"
for phase in ${PHASES:-tests gemm step gen}; do
  t0=$(date +%s)
  case $phase in
    tests)
      timeout "${T_TESTS:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu -rA -s \
        ${GPU_TESTS:-tests/test_gpu.py tests/test_gpu_generation.py tests/test_gpu_sampling.py tests/test_paged_attention.py tests/test_decode_warmup.py} \
        >"$OUT/tests.txt" 2>&1
      echo "tests rc=$?" | tee -a "$log"
      grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|worst relative|replayed|passed|failed" "$OUT/tests.txt" | tail -30 | tee -a "$log"
      ;;
    gemm)
      timeout "${T_GEMM:-150}" python3 -m benchmarks.gemm_shapes --out "$OUT" 2>&1 | grep -v WRONG | tee -a "$log" | tail -40
      ;;
    step)
      timeout "${T_STEP:-240}" python3 -m benchmarks.decode_step --out "$OUT" ${STEP_ARGS:---variants flex:compiled,flex:compiled:fused,triton:compiled:fused,triton:eager:fused --profile} \
        2>&1 | grep -vE "^\s*$|Warning|warn\(" | tee -a "$log" | tail -60
      ;;
    prefill)
      timeout "${T_PREFILL:-150}" python3 -m benchmarks.prefill_step --out "$OUT" ${PREFILL_ARGS:---profile} \
        2>&1 | grep -vE "^\s*$|Warning|warn\(|USDT" | tee -a "$log" | tail -120
      ;;
    tune)
      timeout "${T_TUNE:-200}" python3 -m benchmarks.paged_decode_tune --out "$OUT" ${TUNE_ARGS:-} \
        2>&1 | grep -vE "Warning|warn\(" | tee -a "$log" | tail -20
      ;;
    poisson)
      timeout "${T_POISSON:-240}" python3 -m benchmarks.gen_poisson --out "$OUT" ${POISSON_ARGS:-} >"$OUT/poisson_run.txt" 2>&1
      grep -vE "Warning|warn\(" "$OUT/poisson_run.txt" | tail -20 | tee -a "$log"
      ;;
    gen)
      rm -rf /tmp/gen && mkdir -p /tmp/gen
      GEN_LOG=INFO RUN_TIMEOUT=${T_GEN:-240} bash benchmarks/gen_1stage.sh /tmp/gen "${GEN_CASES:-8:16:true 64:128:true}" 2>&1 | tee -a "$log"
      for f in /tmp/gen/run_*.json; do [ -f "$f" ] && cp "$f" "$OUT/gen_$(basename "$f")"; done
      for f in /tmp/gen/run_*.txt; do [ -f "$f" ] && cp "$f" "$OUT/gen_$(basename "$f")"; done
      ;;
    hostprof)
      # Where the time of a step goes: one case of gen_1stage.sh (HOSTPROF_CASE "BATCH:LIVE",
      # compile off; HOSTPROF_REQ requests per live sequence keep it serving) with the stage's GPU
      # trace (INFSCALED_PROFILE_DIR: decode micro-batches 300-339, engine/profile.py) and the
      # host sampled by py-spy (a wheel in .whl) for HOSTPROF_S seconds, every process and thread,
      # from 3 s after the stage's decode warm-up ended.
      rm -rf /tmp/hp && mkdir -p /tmp/hp
      IFS=: read -r hb hl <<<"${HOSTPROF_CASE:-16:16}"
      INFSCALED_PROFILE_DIR=$OUT GEN_LOG=INFO REQ_PER_LIVE=${HOSTPROF_REQ:-60} RUN_TIMEOUT=${T_HOSTPROF:-150} \
        bash benchmarks/gen_1stage.sh /tmp/hp "$hb:$hl:false" >/tmp/hp/case.txt 2>&1 &
      for _ in $(seq 120); do grep -qs "decode warm-up:" /tmp/hp/run_*.txt && break; sleep 1; done
      sleep 3
      pid=$(pgrep -f "infscaled.cli.* run /tmp/hp/job" | head -1)
      timeout 60 /tmp/site/bin/py-spy record --pid "$pid" --subprocesses --threads -d "${HOSTPROF_S:-6}" -r 200 -f raw \
        -o "$OUT/hostprof_raw.txt" 2>&1 | tail -2 | tee -a "$log"
      python3 -m benchmarks.pyspy_summary "$OUT/hostprof_raw.txt" --min-samples 100 >"$OUT/hostprof.txt" 2>&1
      wait
      cat /tmp/hp/case.txt | tee -a "$log"
      cp /tmp/hp/run_*.json "$OUT/hostprof_run.json" 2>/dev/null
      [ -f "$OUT/stage-0.0.json" ] && python3 -m benchmarks.trace_summary "$OUT/stage-0.0.json" 2>&1 | tee -a "$log"
      ;;
    poissonprof)
      # Where a Poisson run's time goes (BENCHMARKS.md section 26: 8/s did worse after the prompt
      # kernel, cause not found): gen_poisson with POISSON_ARGS (keep --warmup >= 1: its "ready in"
      # line, printed after the warm-up, starts the sampling), every request's timings in its JSON,
      # py-spy on every process and thread for HOSTPROF_S seconds from the first rate, and a GPU
      # trace of the micro-batches INFSCALED_PROFILE_STEPS names (FIRST:COUNT; default 300:40,
      # inside the warm-up).
      rm -rf /tmp/pp && mkdir -p /tmp/pp
      INFSCALED_PROFILE_DIR=$OUT timeout "${T_POISSON:-240}" python3 -m benchmarks.gen_poisson --out "$OUT" \
        ${POISSON_ARGS:-} >/tmp/pp/run.txt 2>&1 &
      for _ in $(seq 240); do grep -qs "^ready in" /tmp/pp/run.txt && break; sleep 1; done
      pid=$(pgrep -f "^python3 -m benchmarks.gen_poisson" | head -1)
      timeout 60 /tmp/site/bin/py-spy record --pid "$pid" --subprocesses --threads -d "${HOSTPROF_S:-10}" -r 200 -f raw \
        -o "$OUT/poissonprof_raw.txt" 2>&1 | tail -2 | tee -a "$log"
      python3 -m benchmarks.pyspy_summary "$OUT/poissonprof_raw.txt" --min-samples 100 >"$OUT/poissonprof.txt" 2>&1
      wait
      grep -vE "Warning|warn\(" /tmp/pp/run.txt | tail -20 | tee -a "$log"
      [ -f "$OUT/stage-0.0.json" ] && python3 -m benchmarks.trace_summary "$OUT/stage-0.0.json" 2>&1 | tee -a "$log"
      ;;
  esac
  echo "phase $phase: $(( $(date +%s) - t0 )) s" | tee -a "$log"
done
# A warm-up that failed leaves its buckets to be captured while serving (a slower run that still
# passes): say so loudly (section 27: a whole session's Poisson runs were made that way).
if grep -rl "warm-up failed" "$OUT" /tmp/gen /tmp/pp /tmp/hp 2>/dev/null | grep -v "$log"; then
  echo "WARNING: a stage's warm-up failed in this call (files above): its timings include captures" | tee -a "$log"
fi
ls -la "$OUT"
