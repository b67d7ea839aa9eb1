#!/usr/bin/env bash
# The bundled model's full training run on one GPU: teacher (buffered flow matching, mixed partitions), then
# per-segment multistep distillation into the one-step student, then fp16 export in files under 16 MiB.
# Usage: scripts/train_bundled_gpu.sh RUN_DIR [TEACHER_MINUTES] [DISTILL_MINUTES]
set -euo pipefail
RUN=${1:?run folder}
TEACHER_MIN=${2:-20}
DISTILL_MIN=${3:-8}
mkdir -p "$RUN"
export PYTHONUNBUFFERED=1
{
  date -u +"start %FT%TZ"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python -m streamdit_core train --config configs/bundled_teacher.json --out "$RUN/teacher" --minutes "$TEACHER_MIN" --resume
  date -u +"teacher done %FT%TZ"
  python -m streamdit_core distill --config configs/bundled_distill.json --teacher "$RUN/teacher/ema.safetensors" \
    --out "$RUN/student" --minutes "$DISTILL_MIN" --resume
  date -u +"student done %FT%TZ"
  python -m streamdit_core export --ckpt "$RUN/teacher/ema.safetensors" --out "$RUN/export/streamdit-bundled-teacher.safetensors"
  python -m streamdit_core export --ckpt "$RUN/student/ema.safetensors" --out "$RUN/export/streamdit-bundled.safetensors"
  date -u +"all done %FT%TZ"
} >>"$RUN/train.log" 2>&1
