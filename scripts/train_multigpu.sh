#!/usr/bin/env bash
# The bundled model's training on all GPUs of one machine with torchrun (FSDP2): teacher, distillation, export.
#   scripts/train_multigpu.sh RUN_DIR [TEACHER_MINUTES] [DISTILL_MINUTES]
# Same steps as scripts/train_bundled_gpu.sh; NGPU (default: all visible GPUs) ranks each train `batch` clips of
# the config per step, so the global batch is NGPU times the config's (the learning rate is the config's).
# Any run resumes on any number of GPUs (RUN_DIR/*/checkpoint). EXTRA: more train/distill arguments, e.g.
# "--batch 128" (per GPU) or "--grad-accum 2".
set -euo pipefail
RUN=${1:?usage: scripts/train_multigpu.sh RUN_DIR [TEACHER_MINUTES] [DISTILL_MINUTES]}
TEACHER_MIN=${2:-20}
DISTILL_MIN=${3:-8}
NGPU=${NGPU:-$(python -c "import torch; print(torch.cuda.device_count())")}
cd "$(dirname "$0")/.."
mkdir -p "$RUN"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
launch() { torchrun --standalone --nproc_per_node="$NGPU" -m streamdit_core "$@"; }
{
  date -u +"start %FT%TZ on $NGPU GPU(s)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  # shellcheck disable=SC2086
  launch train --config configs/bundled_teacher.json --out "$RUN/teacher" --minutes "$TEACHER_MIN" --resume ${EXTRA:-}
  date -u +"teacher done %FT%TZ"
  # shellcheck disable=SC2086
  launch distill --config configs/bundled_distill.json --teacher "$RUN/teacher/ema.safetensors" \
    --out "$RUN/student" --minutes "$DISTILL_MIN" --resume ${EXTRA:-}
  date -u +"student done %FT%TZ"
  python -m streamdit_core export --ckpt "$RUN/teacher/ema.safetensors" --out "$RUN/export/streamdit-bundled-teacher.safetensors"
  python -m streamdit_core export --ckpt "$RUN/student/ema.safetensors" --out "$RUN/export/streamdit-bundled.safetensors"
  date -u +"all done %FT%TZ"
} >>"$RUN/train.log" 2>&1
