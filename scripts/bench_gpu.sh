#!/usr/bin/env bash
# The H100 benchmark suite of issue 6, in under ~8 minutes: one process per case (a crash or time-out loses
# only that case's unfinished modes: bench.json is rewritten after every measurement), never aborts.
#
#   scripts/bench_gpu.sh OUTDIR
#
# Writes OUTDIR/bench.json + OUTDIR/bench.md (all cases, floors, time to first frame, decoder, targets),
# OUTDIR/logs/<step>.log, OUTDIR/env.txt. Environment:
#   PYTHON        interpreter (default: python)
#   BUDGET_S      total seconds for all steps (default: 470)
#   COMPILE_MODE  torch.compile mode of the compiled levels (default: default; max-autotune-no-cudagraphs
#                 compiles for several minutes per case)
#   REPEATS       timed calls per mode for the large cases (default: 5)
#   EXTRA_MODES   modes appended to the paper-4b and wan-w4 steps, e.g. "kv+layout,kv+layout+compile+graphs"
#                 (safe and fast with the roll window path, to compare; each compiled mode adds ~20 s per
#                 case; those steps get 40 s more per extra mode, so raise BUDGET_S too)
set -u
OUT=${1:?usage: scripts/bench_gpu.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the script changes to the repository root
PY=${PYTHON:-python}
BUDGET=${BUDGET_S:-470}
COMPILE=${COMPILE_MODE:-default}
REPS=${REPEATS:-5}
EXTRA=${EXTRA_MODES:+,$EXTRA_MODES}
EXTRA_S=$(( $(printf %s "$EXTRA" | tr -cd , | wc -c) * 40 ))  # more time for the steps that run them
mkdir -p "$OUT/logs"
cd "$(dirname "$0")/.."
START=$(date +%s)

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" - <<'EOF' 2>&1
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for name in ("triton", "diffusers", "flash_attn"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__, exc)
EOF
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# step NAME CAP_S ARGS...: run one bench process with min(CAP_S, what is left of the budget)
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 30 ]; then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$OUT/logs/skipped.log"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m streamdit_core bench --out "$OUT" "$@" \
    > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - START))s total" | tee -a "$OUT/logs/steps.log"
  tail -n 5 "$OUT/logs/$name.log"
}

# most important first; each case measures: eager full-attention baseline, then the modes
step paper-4b $((250 + EXTRA_S)) --cases paper-4b --repeats "$REPS" --compile-mode "$COMPILE" \
  --modes "plain,safe,fast,fastest$EXTRA" --profile safe,fastest
step wan-w4 $((170 + EXTRA_S)) --cases wan2.1-1.3b-w4 --repeats "$REPS" --compile-mode "$COMPILE" --no-rates \
  --modes "plain,safe,fast,fastest$EXTRA"
step bundled 80 --cases bundled --repeats 20 --compile-mode "$COMPILE" --no-rates --no-decoder \
  --modes plain,safe,fast
step wan-w8 90 --cases wan2.1-1.3b-w8 --repeats "$REPS" --compile-mode "$COMPILE" --no-rates --no-decoder \
  --no-ttff --modes safe,fastest
step wan-full 60 --cases wan2.1-1.3b --repeats 3 --compile-mode "$COMPILE" --no-rates --no-decoder --no-ttff \
  --modes safe

echo "== total $(($(date +%s) - START))s"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
exit 0
