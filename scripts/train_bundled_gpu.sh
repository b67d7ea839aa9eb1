#!/usr/bin/env bash
# The bundled model's training run on one GPU: teacher (buffered flow matching, mixed partitions), then
# per-segment multistep distillation into the one-step student, fp16 export in files under 16 MiB, and the full
# evaluation of both (teacher with --perf fast: compiled blocks and CUDA graphs make its 16 calls per chunk cheap).
# Usage: scripts/train_bundled_gpu.sh RUN_DIR [TEACHER_MINUTES] [DISTILL_MINUTES]
# Environment (a stage's input must exist: distill needs RUN_DIR/teacher/ema.safetensors):
#   TEACHER_CONFIG  teacher config (default configs/bundled_teacher.json; e.g. configs/bundled_teacher_v4.json)
#   DISTILL_CONFIG  distillation config (default configs/bundled_distill.json; e.g. configs/bundled_distill_v4.json)
#   STAGES          which stages run, any of "teacher distill export eval" (default: all four; one GPU machine may be
#                   held 30 minutes, so a long run splits: STAGES=teacher, then STAGES="distill export eval" on the
#                   same RUN_DIR)
#   INIT            start the teacher from these weights (e.g. the previous part's live.safetensors); a checkpoint
#                   already in RUN_DIR/teacher wins (--resume)
#   EVAL            1 (default) = run the full evaluation of teacher and student into RUN_DIR/eval; 0 = skip
set -euo pipefail
RUN=${1:?run folder}
TEACHER_MIN=${2:-20}
DISTILL_MIN=${3:-8}
TEACHER_CONFIG=${TEACHER_CONFIG:-configs/bundled_teacher.json}
DISTILL_CONFIG=${DISTILL_CONFIG:-configs/bundled_distill.json}
STAGES=" ${STAGES:-teacher distill export eval} "
if [ "${EVAL:-1}" != 1 ]; then STAGES=${STAGES/ eval / }; fi
stage() { [[ $STAGES == *" $1 "* ]]; }
INIT_ARGS=()
if [ -n "${INIT:-}" ]; then INIT_ARGS=(--init "$INIT"); fi
mkdir -p "$RUN"
export PYTHONUNBUFFERED=1
{
  date -u +"start %FT%TZ"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  if stage teacher; then
    python -m streamdit_core train --config "$TEACHER_CONFIG" "${INIT_ARGS[@]}" --out "$RUN/teacher" \
      --minutes "$TEACHER_MIN" --resume
    date -u +"teacher done %FT%TZ"
  fi
  if stage distill; then
    python -m streamdit_core distill --config "$DISTILL_CONFIG" --teacher "$RUN/teacher/ema.safetensors" \
      --out "$RUN/student" --minutes "$DISTILL_MIN" --resume
    date -u +"student done %FT%TZ"
  fi
  if stage export; then
    python -m streamdit_core export --ckpt "$RUN/teacher/ema.safetensors" --out "$RUN/export/streamdit-bundled-teacher.safetensors"
    python -m streamdit_core export --ckpt "$RUN/student/ema.safetensors" --out "$RUN/export/streamdit-bundled.safetensors"
    date -u +"export done %FT%TZ"
  fi
  if stage eval; then
    python -m streamdit_core eval --model "$RUN/export/streamdit-bundled.safetensors" --device cuda \
      --out "$RUN/eval" --name student_full_gpu
    python -m streamdit_core eval --model "$RUN/export/streamdit-bundled-teacher.safetensors" --device cuda \
      --perf fast --out "$RUN/eval" --name teacher_full_gpu
    date -u +"eval done %FT%TZ"
  fi
  date -u +"all done %FT%TZ"
} >>"$RUN/train.log" 2>&1
