#!/usr/bin/env bash
# Training throughput, scaling efficiency and memory per GPU, on 1 GPU and on all GPUs of this machine.
#   scripts/bench_multigpu.sh OUT_DIR
# For each case, `python -m streamdit_core train-bench` runs under torchrun with 1 rank, then with all GPUs (when
# there are 2 or more), writing OUT_DIR/<case>-w<N>.json; then OUT_DIR/summary.{json,md} (printed) compares them.
# Cases (CASES, default "bundled wan2.1-1.3b"):
#   bundled      the bundled teacher's config (configs/bundled_teacher.json): batch 256 per GPU, compiled, bf16
#   wan2.1-1.3b  Wan 2.1 1.3B layout, random weights, 480p buffer: latents 16x16x60x104, batch 1 per GPU, bf16,
#                activation checkpointing
# Environment: NGPU (default: all visible GPUs), CASES, STEPS / WARMUP (timed / untimed steps; defaults per case
# below), DEVICE (cuda; "cpu" with NGPU=2 CASES=tiny is a CPU smoke test of this script), EXTRA (more
# train-bench arguments, e.g. "--no-compile"). Each torchrun is a separate command in OUT_DIR/bench.log; a
# finished case is skipped when its JSON exists (rerun after an interruption to complete the set).
set -euo pipefail
OUT=${1:?usage: scripts/bench_multigpu.sh OUT_DIR}
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
if [[ "$DEVICE" == cuda ]]; then
  NGPU=${NGPU:-$(python -c "import torch; print(torch.cuda.device_count())")}
  if [[ "$NGPU" -lt 1 ]]; then echo "no CUDA GPU visible (DEVICE=cpu NGPU=2 CASES=tiny for a CPU smoke test)" >&2; exit 2; fi
else
  NGPU=${NGPU:-2}
fi
CASES=${CASES:-"bundled wan2.1-1.3b"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
{
  date -u +"start %FT%TZ"
  if [[ "$DEVICE" == cuda ]]; then nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; fi
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None)"
} >>"$OUT/bench.log" 2>&1
for case in $CASES; do
  case "$case" in
    bundled) steps=${STEPS:-30}; warmup=${WARMUP:-10} ;;
    wan2.1-1.3b) steps=${STEPS:-8}; warmup=${WARMUP:-3} ;;
    *) steps=${STEPS:-5}; warmup=${WARMUP:-2} ;;
  esac
  worlds=1
  if [[ "$NGPU" -gt 1 ]]; then worlds="1 $NGPU"; fi
  for n in $worlds; do
    if [[ -f "$OUT/$case-w$n.json" ]]; then echo "skip $case on $n (done)" >>"$OUT/bench.log"; continue; fi
    echo "== $case on $n rank(s), $steps timed steps after $warmup" | tee -a "$OUT/bench.log"
    # shellcheck disable=SC2086
    torchrun --standalone --nproc_per_node="$n" -m streamdit_core train-bench --case "$case" --device "$DEVICE" \
      --steps "$steps" --warmup "$warmup" --out "$OUT" ${EXTRA:-} >>"$OUT/bench.log" 2>&1 \
      || echo "FAILED: $case on $n rank(s) (see $OUT/bench.log)" | tee -a "$OUT/bench.log"
  done
done
rm -rf "$OUT/scratch"
python -m streamdit_core train-bench --summarize --out "$OUT" | tee -a "$OUT/bench.log"
