#!/usr/bin/env bash
# A 15-minute GPU lease, call 1 of 2 (used on one H200 on 2026-12-04; docs/gpu_runbook.md).
#
# Why two calls: a call carries at most 64 MiB and the GlaS training set is 65 MB, so
# ../shared/tools/stage_glas.sh splits it into .glas_a and .glas_b. This call installs the carried
# wheels, copies the first half to ~/gpuwork/glas (kept while the machine stays warm), records the
# machine, runs the PyTorch peer and the project's benchmark (batch 8 bf16 train step and tiled
# inference with TTA), and leaves the results in ~/gpuwork/res1 for call 2 (launch/lease/call2.sh),
# which must follow within the machine's idle window.
#
# Before the lease, from the checkout:  ../shared/tools/gpu_wheels.sh --no-tfds;
#   ../shared/tools/stage_glas.sh; echo /.bench/ >> .git/info/exclude; mkdir -p .bench;
#   cp ../shared/bench/torch_baseline.py ../shared/bench/mn_torch_ref.py .bench/
# Device call: carry [".whl", ".glas_a", ".bench"], command  bash launch/lease/call1.sh
# Env: TORCH_RESULT=FILE reuses a peer result measured earlier (the peer's compile takes ~90 s);
#   SMOKE=1 runs the same steps on the CPU at width 1/64 (a test of this script, no figure).
set -u
T0=$(date +%s)
OUT=${OUT:?OUT: the folder that comes back}
W=${GPUWORK:-$HOME/gpuwork}
PY=${PY:-python3}
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
mkdir -p "$W/glas" "$W/res1"
if [[ -d .whl ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/pysite" .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:$W/pysite
cp .glas_a/* "$W/glas/"
el "staged $(ls "$W/glas" | wc -l) files"
export JAX_COMPILATION_CACHE_DIR=$W/xla TQDM_MININTERVAL=10
if [[ "${SMOKE:-0}" == 1 ]]; then
  CFG=(--config configs/glas_speedrun.py:smoke --config.platform=cpu); BATCH=2; STEPS=2; TB=1
else
  CFG=(--config configs/glas_speedrun.py --config.platform=gpu); BATCH=8; STEPS=20; TB=8
fi
{ nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  lscpu | grep -E "Model name|^CPU\(s\)"; free -g; date -u; } > "$W/res1/machine.txt" 2>&1
$PY -m micronet_jax.tools.speedrun_summary machine --json "$W/res1/machine.json" > "$W/res1/machine.log" 2>&1
el "machine rc=$?"; head -c 600 "$W/res1/machine.json"; echo
if [[ -n "${TORCH_RESULT:-}" ]]; then
  cp "$TORCH_RESULT" "$W/res1/torch_baseline.jsonl"; el "torch: reused $TORCH_RESULT"
elif [[ "${SMOKE:-0}" != 1 ]]; then
  timeout 140 $PY .bench/torch_baseline.py 8 10 compiled_bf16 > "$W/res1/torch_baseline.jsonl" 2> "$W/res1/torch.err"
  el "torch rc=$?"; cat "$W/res1/torch_baseline.jsonl"; tail -3 "$W/res1/torch.err"
fi
timeout "${BENCH_LIMIT:-170}" $PY -m micronet_jax.benchmark "${CFG[@]}" --batch $BATCH --steps $STEPS \
  --tile-batch $TB --tta --json "$W/res1/bench.json" > "$W/res1/bench.log" 2>&1
el "bench rc=$?"; grep -v "it/s\]$" "$W/res1/bench.log" | tail -25
tar czf "$OUT/call1.tgz" -C "$W" res1  # At most 8 files come back: one archive.
el "call 1 done"
