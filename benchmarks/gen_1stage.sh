#!/usr/bin/env bash
# `infscaled run`, 1 stage on 1 GPU, llama-3b bf16, prompts of 128 tokens, 128 new tokens, greedy
# (issue 14's table). Usage on the device machine, repository root:
#   bash benchmarks/gen_1stage.sh OUTDIR "BATCH:LIVE:COMPILE ..."     e.g. "8:16:true 64:128:true"
# Writes OUTDIR/run_BATCH_LIVE_COMPILE.json (the run summary) and prints its headline numbers.
# REQ_PER_LIVE (default 4): requests per live sequence (16 makes the steady state dominate).
# MBIF: the job's [generation] micro_batches_in_flight (absent: the default).
# WARMUP_S: the job's [generation] warmup_s (decode buckets warmed before READY; absent: the default).
# PREFILL_CHUNK: the job's [generation] prefill_chunk_tokens (absent: the default).
# STAGES: the pipeline's stages instead of 1 (files get a suffix _sSTAGES); DEVICES: their
# placement as TOML list items (default: every stage on "cuda:0").
set -u
out=${1:-out/gen_1stage}
cases=${2:-"8:16:true 64:128:true 8:16:false 64:128:false"}
mkdir -p "$out"
for c in $cases; do
  IFS=: read -r batch live compile <<<"$c"
  tag="${batch}_${live}_${compile}${STAGES:+_s$STAGES}"
  job="$out/job_${tag}.toml"
  devices=${DEVICES:-$(for _ in $(seq "${STAGES:-1}"); do printf '"cuda:0",'; done)}
  cat >"$job" <<TOML
name = "gen-1stage-${batch}-${live}"
[model]
source = "builtin:llama-3b"
dtype = "bfloat16"
[pipeline]
stages = ${STAGES:-1}
cuda_graphs = true
compile = ${compile}
[placement]
devices = [${devices%,}]
[generation]
max_batch_sequences = ${batch}
kv_budget_tokens = $((live * 272))
prompt_tokens = 128
output_tokens = 128
${WARMUP_S:+warmup_s = ${WARMUP_S}}
${MBIF:+micro_batches_in_flight = ${MBIF}}
${PREFILL_CHUNK:+prefill_chunk_tokens = ${PREFILL_CHUNK}}
[workload]
requests = $((live * ${REQ_PER_LIVE:-4}))
concurrency = ${live}
seed = 0
TOML
  # GEN_LOG=INFO: the workers' log (graph captures per decode bucket) goes to the .txt as well.
  timeout "${RUN_TIMEOUT:-240}" python3 -m infscaled.cli ${GEN_LOG:+--log-level $GEN_LOG} run "$job" --no-progress --json "$out/run_${tag}.json" \
    >"$out/run_${tag}.txt" 2>&1
  echo "case batch=${batch} live=${live} compile=${compile} stages=${STAGES:-1} rc=$?"
  python3 - "$out/run_${tag}.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001 - report and go on with the next case
    print("  no summary:", e); sys.exit(0)
q = d.get("latency_ms", {})
print(f"  completed {d.get('completed')} failed {d.get('failed')} tok/s {d.get('tokens_per_s', 0):.0f} "
      f"(middle half {d.get('tokens_per_s_middle', 0):.0f}) "
      f"TPOT p50 {q.get('tpot_p50', 0):.2f} ms p99 {q.get('tpot_p99', 0):.2f} TTFT p50 {q.get('ttft_p50', 0):.0f} p99 {q.get('ttft_p99', 0):.0f} ms")
PY
done
