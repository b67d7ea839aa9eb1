"""Memory and time estimates for fine-tuning Wan 2.1 into StreamDiT on N GPUs (docs/FINETUNE_WAN.md).

Usage: python scripts/wan_finetune_estimates.py [--preset wan2.1-1.3b] [--gpus 1] [--json]

Runs on a CPU in seconds; nothing is downloaded and no weights are needed. Three kinds of numbers, labelled in
the output:

* analytic: parameter count (``ModelConfig.num_parameters``), bytes of weights, gradients, AdamW moments, EMA and
  a distillation teacher as the FSDP2 Trainer keeps them (float32 master weights, float32 gradients, moments
  and EMA, a float32 teacher, all sharded over the ``--gpus`` ranks), plus the bf16 parameters FSDP gathers for
  compute: the root unit (embeddings, head) and two blocks (the running one and the prefetched next one).
* counted: activations that autograd saves for the backward pass of one training forward (batch 1), counted by
  running our real ``StreamDiT`` forward on PyTorch's ``meta`` device (shapes and dtypes only, no memory) in
  bf16 with ``saved_tensors_hooks``. Attention is replaced by a stand-in that saves what flash/cuDNN attention
  saves (q, k, v, output and a float32 log-sum-exp), since the plain math kernel would save the full score
  matrix. Allocator overhead, temporary buffers and workspace are NOT included: treat it as a lower bound of the
  peak, to be confirmed on a GPU.
* extrapolated: step time from the measured forward time in docs/BENCHMARKS.md (H100, bf16, eager, 16 latent
  frames at 832×480: 522.6 ms per model call) scaled by the FLOPs of each case (``bench.model_flops``), with a
  training step ≈ 3 forward passes (forward + backward), 4 with activation checkpointing, and a distillation
  step = 2·teacher_steps teacher forwards (guidance doubles the batch) + one student training step. Per GPU
  and per clip: weak scaling (each rank its own clips) at the measured single-GPU efficiency, no communication.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

import torch

import streamdit_core.model as model_module
from streamdit_core.bench import model_flops
from streamdit_core.config import ModelConfig, preset
from streamdit_core.model import StreamDiT

GiB = 2**30
MEASURED_MS = 522.6  # docs/BENCHMARKS.md: wan2.1-1.3b, latent (16, 16, 60, 104), full attention, H100 bf16 eager
MEASURED_LATENT = (16, 16, 60, 104)
MEASURED_PRESET = "wan2.1-1.3b"  # the measured model (other presets scale by their FLOPs relative to it)


class _FlashLikeAttention(torch.autograd.Function):
    """Saves what a fused attention kernel saves: q, k, v, the output and the log-sum-exp ``[b, h, L]`` fp32."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fake_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    return _FlashLikeAttention.apply(q, k, v)


def _no_meta_autocast(device_type: str, **kwargs: Any) -> Any:
    return contextlib.nullcontext() if device_type == "meta" else _AUTOCAST(device_type, **kwargs)


_AUTOCAST = torch.autocast


def counted_activation_bytes(cfg: ModelConfig, latent: tuple[int, int, int, int], checkpointing: bool) -> int:
    """Bytes autograd saves in one bf16 training forward of batch 1 on ``latent`` (C, F, H, W), per-clip text
    context of ``text_len`` tokens. With ``checkpointing``: each block's input, plus one block's own saved
    tensors (what is alive while that block is recomputed in backward)."""
    with torch.device("meta"):
        model = StreamDiT(cfg.with_(num_layers=1 if checkpointing else cfg.num_layers)).to(torch.bfloat16)
        x = torch.empty(1, *latent, dtype=torch.bfloat16)
        sigma = torch.empty(1, latent[1])
        context = torch.empty(1, cfg.text_len, cfg.text_dim, dtype=torch.bfloat16)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    original, autocast = model_module.attention, torch.autocast
    model_module.attention = _fake_attention
    torch.autocast = _no_meta_autocast  # type: ignore[misc,assignment]  # autocast has no meta device
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, sigma, context)
    finally:
        model_module.attention, torch.autocast = original, autocast  # type: ignore[misc]
    total = sum(seen.values())
    if not checkpointing:
        return total
    tokens = latent[1] * latent[2] * latent[3] // (cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
    block_inputs = cfg.num_layers * tokens * cfg.dim * 2  # bf16 residual stream saved at each block boundary
    return block_inputs + total


def gathered_bf16_bytes(cfg: ModelConfig) -> int:
    """bf16 bytes of the parameters FSDP holds unsharded at once: the root unit and two blocks (analytic)."""
    with torch.device("meta"):
        model = StreamDiT(cfg.with_(num_layers=1))
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - block
    return 2 * (root + 2 * block)


def estimates(name: str, gpus: int = 1) -> dict[str, Any]:
    cfg = preset(name)
    n = cfg.num_parameters()
    state = {
        "weights fp32": 4 * n // gpus,
        "gradients fp32": 4 * n // gpus,
        "AdamW moments fp32": 8 * n // gpus,
        "EMA copy fp32": 4 * n // gpus,
        "gathered bf16 units": gathered_bf16_bytes(cfg),
    }
    teacher = 4 * n // gpus
    cases = []
    for height, width in ((480, 832), (240, 416)):
        for frames in (16, 20):
            latent = (cfg.in_dim, frames, height // 8, width // 8)
            flops = model_flops(cfg, latent, None)
            fwd_ms = MEASURED_MS * flops / model_flops(preset(MEASURED_PRESET), MEASURED_LATENT, None)
            case: dict[str, Any] = {
                "video": f"{width}x{height}, {4 * (frames - 1) + 1} frames -> {frames} latent frames",
                "tokens": frames * (height // 16) * (width // 16),
                "forward_tflop": round(flops / 1e12, 1),
            }
            for ckpt in (False, True):
                act = counted_activation_bytes(cfg, latent, ckpt)
                key = "checkpointing" if ckpt else "no_checkpointing"
                case[key] = {
                    "activations_gib_counted": round(act / GiB, 1),
                    "train_total_gib": round((sum(state.values()) + act) / GiB, 1),
                    "distill_total_gib": round((sum(state.values()) + teacher + act) / GiB, 1),
                    "train_step_s_per_clip_extrapolated": round((4 if ckpt else 3) * fwd_ms / 1000, 2),
                }
            case["distill_step_s_per_clip_extrapolated_teacher_steps_8"] = round((16 + 3) * fwd_ms / 1000, 1)
            cases.append(case)
    return {
        "preset": name,
        "gpus": gpus,
        "parameters_analytic": n,
        "state_gib_analytic": {k: round(v / GiB, 1) for k, v in state.items()},
        "state_total_gib_analytic": round(sum(state.values()) / GiB, 1),
        "distill_teacher_fp32_gib_analytic": round(teacher / GiB, 1),
        "cases": cases,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--gpus", type=int, default=1, help="ranks the FSDP2 state is sharded over (memory per GPU)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    if args.gpus < 1:
        ap.error("--gpus must be >= 1")
    result = estimates(args.preset, args.gpus)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return 0
    w = sys.stdout.write
    w(f"{result['preset']}: {result['parameters_analytic'] / 1e9:.3f} B parameters (analytic); memory per GPU of "
      f"{result['gpus']}\n")  # fmt: skip
    for k, v in result["state_gib_analytic"].items():
        w(f"  {k:<22} {v:6.1f} GiB (analytic)\n")
    w(f"  {'total':<22} {result['state_total_gib_analytic']:6.1f} GiB; a distillation teacher adds "
      f"{result['distill_teacher_fp32_gib_analytic']} GiB\n\n")  # fmt: skip
    w("batch 1 | activations counted on the meta device | step time extrapolated from the measured forward\n")
    for c in result["cases"]:
        w(f"{c['video']} ({c['tokens']} tokens, {c['forward_tflop']} TFLOP per forward)\n")
        for key in ("no_checkpointing", "checkpointing"):
            d = c[key]
            w(f"  {key:<17} activations {d['activations_gib_counted']:6.1f} GiB  train total "
              f"{d['train_total_gib']:6.1f} GiB  distill total {d['distill_total_gib']:6.1f} GiB  "
              f"train step ~{d['train_step_s_per_clip_extrapolated']} s/clip\n")  # fmt: skip
        w(f"  distillation (teacher_steps 8, guidance): ~{c['distill_step_s_per_clip_extrapolated_teacher_steps_8']}"
          " s/clip\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
