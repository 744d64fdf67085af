#!/usr/bin/env bash
# One device call: GPU tests, then the benchmark and the trace summary (see BENCHMARKS.md).
# Usage (on the device machine, repository root): bash benchmarks/device_run.sh [bench args...]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-out/device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "gpus", torch.cuda.device_count())'
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # GPU_TESTS: which files (all of their tests are marked gpu); the generation ones compile kernels.
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
    ${GPU_TESTS:-tests/test_gpu.py tests/test_gpu_generation.py tests/test_paged_attention.py tests/test_gpu_sampling.py} -s \
    2>&1 | tee "$OUT/tests.txt" | grep -E "worst relative|replayed|passed|failed|Error|assert" | tail -20
fi
timeout "${BENCH_TIMEOUT:-420}" python3 -m benchmarks.gpu_bench --out "$OUT" "$@" 2>&1 | grep -v "^\s*$" | tee "$OUT/bench.txt" | tail -40
for t in "$OUT"/stage-*.json; do [ -f "$t" ] && python3 -m benchmarks.trace_summary "$t" | tee -a "$OUT/trace_summary.txt" | head -30; done
ls -la "$OUT"
