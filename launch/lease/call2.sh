#!/usr/bin/env bash
# A 15-minute GPU lease, call 2 of 2 (used on one H200 on 2026-12-04; docs/gpu_runbook.md).
#
# Copies the second half of GlaS next to the first (call 1, launch/lease/call1.sh), then runs
# launch/speedrun.sh with --no-bench --fit on call 1's bare-step rate and PyTorch peer (copied into
# its output folder, so --fit and the summary use them): train a budget that fits, tune and score on
# the validation split, summary.md. LIMIT is this call's timeout_s; the speedrun is given a deadline
# 50 s inside it, so the archive is written before the call ends.
# Device call: carry [".whl", ".glas_b", ".bench"], command  LIMIT=480 bash launch/lease/call2.sh
# Extra arguments go to launch/speedrun.sh (e.g. --config.KEY=VALUE). SMOKE=1: the CPU smoke run.
set -u
T0=$(date +%s)
OUT=${OUT:?OUT: the folder that comes back}
LIMIT=${LIMIT:?LIMIT: the timeout_s of this call, in seconds}
W=${GPUWORK:-$HOME/gpuwork}
PY=${PY:-python3}
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
mkdir -p "$W/glas" "$W/sr"
if [[ -d .whl && ! -d "$W/pysite/grain" ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/pysite" .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:$W/pysite
cp .glas_b/* "$W/glas/"
el "staged $(ls "$W/glas" | wc -l) files (171 = all 85 pairs + Grade.csv)"
for f in bench.json torch_baseline.jsonl; do [[ -f "$W/res1/$f" ]] && cp "$W/res1/$f" "$W/sr/$f"; done
export JAX_COMPILATION_CACHE_DIR=$W/xla TQDM_MININTERVAL=20
DEADLINE=$(awk -v l="$LIMIT" -v e="$(( $(date +%s) - T0 ))" 'BEGIN { printf "%.2f", (l - 50 - e) / 60 }')
el "speedrun deadline $DEADLINE min"
EXTRA=()
[[ "${SMOKE:-0}" == 1 ]] && EXTRA=(--smoke --config.data.source=glas)
timeout -s TERM $(( LIMIT - 30 - ($(date +%s) - T0) )) env PYTHON="$PY" launch/speedrun.sh \
  --data-root="$W/glas" --out="$W/sr" --workdir=/tmp/srwork --no-bench --fit --deadline="$DEADLINE" \
  "${EXTRA[@]+"${EXTRA[@]}"}" "$@" > "$W/speedrun.log" 2>&1
el "speedrun rc=$?"
cp "$W/speedrun.log" "$W/sr/"
grep -v "it/s\]$\|s/it\]$" "$W/speedrun.log" | grep -v "^+ " | tail -60
tar czf "$OUT/speedrun.tgz" -C "$W" sr res1
cp "$W/sr/summary.md" "$OUT/" 2>/dev/null
el "call 2 done"
