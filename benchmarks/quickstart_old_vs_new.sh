#!/usr/bin/env bash
# Quickstart throughput of two checkouts, alternating round by round on the same machine, so both
# sides share the same (shared-VM) conditions. Usage:
#   git worktree add /tmp/old 0c3a804    # main before the one-engine rewrite
#   bash benchmarks/quickstart_old_vs_new.sh /tmp/old "$PWD" [ROUNDS] [REQUESTS]
# Prints "side round req/s failed" per run; JSON summaries land in $OUT (default out/qs-old-new).
set -u
OLD=$1 NEW=$2 ROUNDS=${3:-3} REQUESTS=${4:-2000}
OUT=${OUT:-out/qs-old-new}
PY=${PY:-$NEW/.venv/bin/python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
for i in $(seq 1 "$ROUNDS"); do
  for side in old new; do
    if [ "$side" = old ]; then dir=$OLD; else dir=$NEW; fi
    (cd "$dir" && PYTHONPATH="$dir" timeout 600 "$PY" -m infscaled.cli run configs/jobs/quickstart.toml \
       --requests "$REQUESTS" --no-progress --json "$OLDPWD/$OUT/$side-$i.json" > "$OLDPWD/$OUT/$side-$i.log" 2>&1)
    "$PY" -c "import json; d = json.load(open('$OUT/$side-$i.json')); print('$side', $i, round(d['throughput_rps'], 1), d['failed'])"
  done
done
