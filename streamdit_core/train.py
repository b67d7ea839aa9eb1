"""Training (buffered flow matching with mixed partitions) and multistep distillation of the bundled model.

Commands::

    python -m streamdit_core train   --config configs/bundled_teacher.json --out runs/teacher [--resume]
    python -m streamdit_core distill --config configs/bundled_distill.json \
        --teacher runs/teacher/ema.safetensors --out runs/student
    python -m streamdit_core export  --ckpt runs/student/ema.safetensors \
        --out streamdit_core/weights/streamdit-bundled.safetensors

Training step (DESIGN.md §3): a clip of ``B`` frames from the procedural world, a chunk size drawn from
the mix (the full-buffer T2V case with probability ``t2v_share``), per-chunk σ drawn in its band,
``x_σ = (1 − σ)·x + σ·ε`` per frame, loss ``‖v_θ(x_σ, σ, text) − (ε − x)‖²``. Captions are per frame, so
the model learns to follow a prompt that changes inside the buffer. A share of samples drops the caption
(empty prompt) so classifier-free guidance works.

Fine-tuning Wan 2.1 on captioned videos (docs/FINETUNE_WAN.md): ``--init wan.safetensors --data VIDEOS --vae
VAE --text-encoder UMT5``; clips then come from a :class:`~streamdit_core.video_data.ClipSource` (cached VAE
latents in Wan 2.1's normalised latent space, codec ``wan2.1``) instead of the world, and the frozen umT5
embeddings replace the bundled text encoder.

Distillation (per segment, the paper's §4.2): the student's scheme is ``(K=0, N, c, s=1)``; the teacher's is
the same with ``s_teacher`` micro-steps and guidance. From a buffer at the student's staircase (real clips
noised to the levels ``σ_p``), the teacher runs ``s_teacher`` guided Euler micro-steps, which brings every
chunk exactly to the next rung ``σ_p − 1/N``; the student learns to make that move in one unguided step:
``v_target = (x_teacher − x) / (σ_next − σ)``.

Scale-out (``torchrun --nproc_per_node N -m streamdit_core train …``, see docs/TRAINING.md "Multi-GPU"): one
code path for 1 … N ranks (:mod:`streamdit_core.distributed`). Models are sharded with FSDP2 (bf16 parameters,
float32 gradient reduction on GPU), optionally with activation checkpointing. A step's global batch is
``world_size × grad_accum`` micro-batches of ``batch`` clips; micro-batch ``j = rank·grad_accum + m`` draws
everything (clips, partitions, caption dropout, noise) from generators seeded by ``(seed, step, j)``, so the
global batch does not depend on how it is split over ranks and accumulation. Checkpoints: a sharded
``torch.distributed.checkpoint`` folder (``checkpoint/step-…``: live and EMA weights, optimizer) that resumes on
any number of ranks, plus full ``live.safetensors``/``ema.safetensors`` written by rank 0. Only rank 0 logs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from .checkpoint import load_checkpoint, read_metadata, save_checkpoint
from .cli import register_command
from .config import ModelConfig, preset
from .distributed import (
    DistContext,
    InDtype,
    barrier,
    compile_blocks,
    enable_activation_checkpointing,
    full_state_dict,
    init_distributed,
    restore_forwards,
    seed_for,
    set_gradient_sync,
    shard_streamdit,
    shard_text_encoder,
    shutdown_distributed,
)
from .log import LOGGER_NAME, get_logger
from .model import StreamDiT
from .schedule import (
    Partition,
    default_chunk_sizes,
    inference_sigmas,
    next_inference_sigmas,
    sample_chunk_size,
    training_sigmas,
    uniform_sigmas,
)
from .text import TextEncoder, TextEncoderConfig

if TYPE_CHECKING:
    from .video_data import ClipSource

__all__ = [
    "TrainConfig",
    "DistillConfig",
    "Trainer",
    "Distiller",
    "Draws",
    "load_init",
    "flow_matching_loss",
    "distillation_loss",
    "distill_levels",
]

log = get_logger("train")

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``v = f(x [b, C, F, H, W], σ [b, F], context)``: a :class:`StreamDiT` or a wrapper such as ``InDtype``."""

# draw streams of one micro-batch (the last argument of seed_for)
_TRUTH, _SMALL, _NOISE = 0, 1, 2


def _default_mix(frames: int, model: str) -> tuple[int, ...]:
    """``default_chunk_sizes`` in units of the preset's temporal patch ``p`` (frames inside one token share a
    noise level): ``{p, 2p, …, frames}``; the plain mix for ``p = 1``, a model that is not a preset (Wan) or a
    buffer that ``p`` does not divide (the trainer then names the problem)."""
    try:
        pt = preset(model).patch_size[0]
    except ValueError:
        pt = 1
    if frames < 1 or frames % pt:
        return default_chunk_sizes(frames)  # raises for frames < 1
    return tuple(pt * c for c in default_chunk_sizes(frames // pt))


@dataclass(frozen=True)
class TrainConfig:
    """Attributes (all committed as JSON files under ``configs/``):
    model: preset name (``bundled`` …); text_layers/text_heads: the bundled text encoder's size.
    buffer: frames per training clip ``B``; reference_frames: ``K``.
    chunk_sizes: the partition mix (``[]`` = ``{p, 2p, 4p, …, B}`` for the preset's temporal patch ``p``: the
    paper's ``{1, 2, 4, …, B}`` for ``p = 1``); t2v_share: probability of ``c = B``.
    shift: time shift of the training levels. t2v_shift: the time shift of the whole-buffer (``c = B``) samples
    only (``None`` = ``shift``): above 1 it trains more at high noise, where a text-to-video start (and a
    prompt switch) must take shape, colour and motion from the caption alone; the streaming staircase keeps
    ``shift``, so inference is unchanged. caption_dropout: share of samples trained unconditionally.
    batch: clips per micro-batch on each rank; a step's global batch is ``batch × grad_accum × world size``
    (the learning rate is not rescaled with the world size). grad_accum: micro-batches accumulated per step.
    lr, weight_decay, warmup, steps, grad_clip, ema: optimisation.
    bf16: on CUDA, FSDP mixed precision (bf16 parameters and compute, float32 gradient reduction and master
    weights); ignored on CPU. activation_checkpointing: recompute each block's activations in backward.
    compile: ``torch.compile`` each block (falls back to eager, with a warning, if it fails).
    max_minutes: wall-clock budget; the run stops when it is used up (0 = none). The learning-rate schedule
    follows ``max(step/steps, elapsed/budget)`` so a time-limited run still anneals.
    log_every, sample_every, ckpt_every: in steps. seed: all randomness derives from it.
    window: self-attention window of the trained model in tokens ``[frames, height, width]``, or ``None`` to keep
    the preset's (or the ``--init`` checkpoint's). Windows add no parameters, so a checkpoint can continue
    training with another window; checkpoints store it, and inference uses it by default.
    world: keyword overrides for ``WorldConfig``.
    video: keyword overrides for ``video_data.VideoDataConfig`` (training on ``--data`` videos; ``buffer`` then
    counts latent frames).
    """

    model: str = "bundled"
    text_layers: int = 2
    text_heads: int = 4
    buffer: int = 16
    reference_frames: int = 0
    chunk_sizes: tuple[int, ...] = ()
    t2v_share: float = 0.3
    shift: float = 1.0
    t2v_shift: float | None = None
    caption_dropout: float = 0.1
    batch: int = 64
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 500
    steps: int = 20000
    grad_clip: float = 1.0
    ema: float = 0.999
    bf16: bool = True
    activation_checkpointing: bool = False
    compile: bool = False
    max_minutes: float = 0.0
    log_every: int = 50
    sample_every: int = 2000
    ckpt_every: int = 1000
    seed: int = 0
    window: tuple[int, int, int] | None = None
    world: dict[str, object] = field(default_factory=dict)
    video: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        frames = self.buffer - self.reference_frames
        object.__setattr__(self, "chunk_sizes", tuple(self.chunk_sizes) or _default_mix(frames, self.model))
        bad = [c for c in self.chunk_sizes if c < 1 or frames % c]
        if bad:
            raise ValueError(f"chunk_sizes {bad} do not divide buffer − reference_frames = {frames}")
        if not 0 <= self.caption_dropout < 1 or not 0 <= self.t2v_share <= 1:
            raise ValueError("caption_dropout must be in [0, 1) and t2v_share in [0, 1]")
        if self.batch < 1 or self.steps < 1 or self.lr <= 0:
            raise ValueError(f"batch, steps and lr must be positive, got {self.batch}, {self.steps}, {self.lr}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive integer, got {self.grad_accum}")
        if not self.shift > 0 or (self.t2v_shift is not None and not self.t2v_shift > 0):
            raise ValueError(
                f"shift and t2v_shift must be > 0 (t2v_shift may be null), got {self.shift}, {self.t2v_shift}"
            )
        if self.window is not None:
            window = tuple(self.window)
            if len(window) != 3 or not all(isinstance(w, int) and w >= 1 for w in window):
                raise ValueError(f"window must be three positive integers [frames, height, width], got {self.window!r}")
            object.__setattr__(self, "window", window)


# The teacher's inference scheme: micro-steps per chunk and classifier-free guidance. A teacher checkpoint's
# ``streamdit.defaults`` use it (with caption dropout; else guidance 1), and distillation starts from it.
TEACHER_STEPS = 8
TEACHER_GUIDANCE = 3.0


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Distillation: the student runs ``(K=0, N=buffer/chunk, c=chunk, s=1)`` without guidance; the teacher
    the same partition with ``teacher_steps`` micro-steps and ``teacher_guidance``.

    warm_share: share of samples that distil a step of the warm start instead of the staircase: the student's
    stream starts with ``N − 1`` whole-buffer text-to-video steps (uniform levels, :func:`distill_levels`),
    which decide the first objects; without such samples the student takes them unguided and untrained.
    """

    chunk: int = 2
    teacher_steps: int = TEACHER_STEPS
    teacher_guidance: float = TEACHER_GUIDANCE
    warm_share: float = 0.0
    lr: float = 1e-4
    warmup: int = 100
    steps: int = 4000
    caption_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.warm_share <= 1.0:
            raise ValueError(f"warm_share must be in [0, 1], got {self.warm_share}")


def load_config(path: str | os.PathLike[str], cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    data = json.loads(Path(path).read_text())
    data.pop("_comment", None)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    if "chunk_sizes" in data:
        data["chunk_sizes"] = tuple(data["chunk_sizes"])
    return cls(**data)


# ----------------------------------------------------------------------------------------------------------
# Losses (pure functions)
# ----------------------------------------------------------------------------------------------------------


def noise_clip(x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_σ = (1 − σ)·x + σ·ε`` with per-frame σ ``[b, F]`` over x ``[b, C, F, H, W]``."""
    s = sigma.to(x.dtype)[:, None, :, None, None]
    return (1.0 - s) * x + s * noise


def flow_matching_loss(
    model: VelocityModel, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """Buffered flow matching: MSE between ``v_θ(x_σ)`` and ``ε − x`` over non-reference frames
    (reference frames sit at σ = 0 and are masked out of the loss)."""
    pred = model(noise_clip(x, sigma, noise), sigma, context).float()
    err = (pred - (noise - x).float()).pow(2).mean(dim=(1, 3, 4))  # [b, F]
    weight = (sigma > 0).float()
    return (err * weight).sum() / weight.sum().clamp(min=1.0)


def distillation_loss(
    student: VelocityModel,
    x_sigma: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    x_teacher: torch.Tensor,
    context: torch.Tensor,
) -> torch.Tensor:
    """The student's one step must land where the teacher's guided micro-steps landed:
    ``v_target = (x_teacher − x_σ) / (σ_next − σ)`` (frames that do not move are masked out); the mean runs over
    the moving frames' pixels."""
    delta = (sigma_next - sigma).float()[:, None, :, None, None]
    moving = (delta != 0).float()
    target = (x_teacher - x_sigma).float() / torch.where(delta == 0, torch.ones_like(delta), delta)
    pred = student(x_sigma, sigma, context).float()
    b, channels, frames, height, width = x_sigma.shape
    w = moving.expand(b, 1, frames, height, width)
    return ((pred - target).pow(2) * w).sum() / (w.sum() * channels).clamp(min=1.0)


def distill_levels(teacher: Partition, shift: float, warm_step: int | None = None) -> torch.Tensor:
    """σ of every buffer frame before each of the teacher's ``s`` micro-steps and after the last: float64
    ``[s + 1, B]``; row 0 is the student's input level and row ``s`` its target level (one student step).

    ``warm_step=None``: the streaming staircase at the student's rung (micro-steps ``0 … s−1``).
    ``warm_step=j`` (``0 ≤ j < N − 1``): step ``j`` of the student's warm start, the whole buffer at the uniform
    levels of ``N`` steps (:func:`~streamdit_core.schedule.uniform_sigmas`; the sampler runs ``j = 0 … N−2``),
    subdivided into the teacher's ``s`` uniform steps.
    """
    s, N = teacher.s, teacher.N
    if warm_step is None:
        rows = [inference_sigmas(teacher, m, shift) for m in range(s)]
        return torch.stack(rows + [next_inference_sigmas(teacher, s - 1, shift)])
    if teacher.K or not 0 <= warm_step < N - 1:
        raise ValueError(f"warm_step must be in [0, N − 1 = {N - 1}) without reference frames, got {warm_step}")
    levels = uniform_sigmas(N * s, shift)[warm_step * s : (warm_step + 1) * s + 1]  # [s + 1]
    return levels[:, None].expand(s + 1, teacher.B).clone()


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------


def _lr_at(step: int, cfg: TrainConfig, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak over ``max(step progress, time progress)``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = max((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), time_progress)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class Draws:
    """The generators of one micro-batch (global index ``index``, see :func:`~streamdit_core.distributed.seed_for`):
    ``small`` (CPU) for partitions and caption dropout, ``noise`` (on the training device) for bulk noise."""

    index: int
    small: torch.Generator
    noise: torch.Generator


class _TruthStream(torch.utils.data.IterableDataset):
    """Ground truth and captions of one rank's micro-batches in training order, made on CPU worker processes
    (the GPU renders them). Item ``k`` is micro-batch ``m = k mod A`` of step ``start + k // A`` (``A`` =
    grad_accum); its clips come from a generator seeded ``seed_for(seed, step, rank·A + m, 0)``. Worker ``w`` of
    ``n`` makes the items ``k ≡ w (mod n)`` and the loader takes workers' items round-robin, so neither the order
    nor the content depends on the number of workers, and a resumed run continues the uninterrupted stream."""

    def __init__(
        self, world_config: object, batch: int, frames: int, seed: int, start: int, rank: int, accum: int
    ) -> None:
        self.world_config, self.batch, self.frames, self.seed = world_config, batch, frames, seed
        self.start, self.rank, self.accum = start, rank, accum

    def __iter__(self):  # type: ignore[no-untyped-def]
        from .world import World, captions_from_truth

        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        world = World(self.world_config)  # type: ignore[arg-type]
        k = wid
        while True:
            step, m = self.start + k // self.accum, k % self.accum
            g = torch.Generator().manual_seed(seed_for(self.seed, step, self.rank * self.accum + m, _TRUTH))
            truth = world.sample_truth(self.batch, self.frames, g)
            yield truth, captions_from_truth(truth)
            k += n


def load_init(path: str, need_text: bool) -> tuple[StreamDiT, TextEncoder | None]:
    """The model (and bundled text encoder) to start from, full and on CPU: a StreamDiT checkpoint or a Wan 2.1
    T2V file (original key names, :func:`~streamdit_core.wan.load_wan`; no text encoder).

    Raises:
        ValueError: ``need_text`` (training on the procedural world) and the file has no text encoder.
    """
    from .wan import is_wan_checkpoint, load_wan

    if "streamdit.model_config" not in read_metadata(path) and is_wan_checkpoint(path):
        model, text = load_wan(path, device="cpu", dtype=torch.float32).model, None
    else:
        ckpt = load_checkpoint(path)
        model, text = ckpt.model, ckpt.text_encoder
    if need_text and text is None:
        raise ValueError(
            f"{path} has no text encoder: training on the procedural world needs the bundled one "
            "(Wan models train on captioned videos with --data, see docs/FINETUNE_WAN.md)"
        )
    return model.float(), text


def shared_context(emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Text context from embeddings ``emb [n, Lt, D]`` and per-frame caption indices ``ids [b, F]``:
    ``[b, Lt, D]`` when every clip has one caption for all its frames (the same result as per frame, without the
    per-frame copies and cross-attention calls), else ``[b, F, Lt, D]``."""
    if bool((ids == ids[:, :1]).all()):
        return emb[ids[:, 0]]
    return emb[ids]


def check_temporal_patch(cfg: TrainConfig, pt: int) -> None:
    """Chunk sizes, reference frames and buffer must be multiples of the model's temporal patch ``pt`` (frames
    inside one token share a noise level)."""
    chunks = (cfg.chunk,) if isinstance(cfg, DistillConfig) else cfg.chunk_sizes
    bad = [c for c in chunks if c % pt] + ([cfg.reference_frames] if cfg.reference_frames % pt else [])
    if bad or cfg.buffer % pt:
        raise ValueError(
            f"chunk sizes {list(chunks)}, reference_frames {cfg.reference_frames} and buffer "
            f"{cfg.buffer} must be multiples of the model's temporal patch {pt}"
        )


class Trainer:
    """Owns the models, the optimiser, EMA, the clip source, checkpoints and logs.

    Clips come from the procedural world (captions embedded by the bundled text encoder, trained along) unless a
    ``source`` is given (e.g. cached Wan VAE latents of captioned videos, with frozen umT5 embeddings; the model
    then trains without a text encoder).

    ``model``/``text`` (and ``ema_model``/``ema_text``) are FSDP2-sharded modules: their parameters are
    ``DTensor`` shards, a forward call is a collective (every rank must make it). :meth:`gather` returns full,
    unsharded copies on rank 0. Subclasses change what is trained through :meth:`build_modules` (the modules),
    :meth:`batch` and :meth:`sigmas` (the data of one micro-batch) and :meth:`loss`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out: str | os.PathLike[str],
        device: str | torch.device | None = None,
        init: str | None = None,
        dist_ctx: DistContext | None = None,
        source: ClipSource | None = None,
    ) -> None:
        from .world import World, WorldConfig

        self.cfg, self.out, self.source = cfg, Path(out), source
        self.dist = dist_ctx if dist_ctx is not None else init_distributed(device)
        self.device = self.dist.device
        self.out.mkdir(parents=True, exist_ok=True)
        self.compute_dtype = torch.bfloat16 if cfg.bf16 and self.device.type == "cuda" else torch.float32
        model, text = self.build_modules(init)  # full modules on CPU, identical on every rank
        check_temporal_patch(cfg, model.config.patch_size[0])
        ema_model, ema_text = copy.deepcopy(model), copy.deepcopy(text)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model.blocks)
        # compiled block groups and their eager forwards, to undo every compilation if one fails (the Distiller
        # adds its teacher's blocks)
        self._compiled: list[tuple[nn.ModuleList, list[Callable[..., Any]]]] = (
            [(model.blocks, compile_blocks(model.blocks))] if cfg.compile else []
        )
        shard_streamdit(model, self.dist.mesh, self.compute_dtype)
        shard_streamdit(ema_model, self.dist.mesh)
        if text is not None and ema_text is not None:
            shard_text_encoder(text, self.dist.mesh)
            shard_text_encoder(ema_text, self.dist.mesh)
            text.train()
        self.model, self.text = model.train(), text
        self.ema_model, self.ema_text = ema_model.eval().requires_grad_(False), ema_text
        if ema_text is not None:
            ema_text.eval().requires_grad_(False)
        # containers give the checkpoint keys: "model.<Wan key>", "text.<key>"
        self.live = nn.ModuleDict({"model": model} | ({"text": text} if text is not None else {}))
        self.ema = nn.ModuleDict({"model": ema_model} | ({"text": ema_text} if ema_text is not None else {}))
        self.params = [p for p in self.live.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.world = World(WorldConfig(**cfg.world))  # type: ignore[arg-type]
        self.step = 0
        self.forward: VelocityModel = InDtype(self.model, self.compute_dtype)
        self.log_file = self.out / "log.jsonl"
        self._data: object | None = None
        self._started = time.perf_counter()

    def build_modules(self, init: str | None) -> tuple[StreamDiT, TextEncoder | None]:
        """The trained backbone and text encoder before sharding (CPU, float32): from ``init`` (a StreamDiT
        checkpoint or a Wan 2.1 file) or freshly initialised from ``cfg.seed`` (so every rank builds the same
        weights). With a clip source there is no text encoder (the source brings frozen embeddings)."""
        from .world import VOCABULARY

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # parameter initialisation only
        if init:
            model, text = load_init(init, need_text=self.source is None)
            if cfg.window is not None:
                model.config = model.config.with_(window=cfg.window)
            return model, (text if self.source is None else None)
        mcfg: ModelConfig = preset(cfg.model)
        if cfg.window is not None:
            mcfg = mcfg.with_(window=cfg.window)
        if self.source is not None:
            return StreamDiT(mcfg), None
        text = TextEncoder(
            TextEncoderConfig(
                vocabulary=VOCABULARY,
                text_len=mcfg.text_len,
                dim=mcfg.text_dim,
                num_layers=cfg.text_layers,
                num_heads=cfg.text_heads,
            )
        )
        return StreamDiT(mcfg), text

    @property
    def micro_batches(self) -> int:
        """Micro-batches in one step's global batch (``world_size × grad_accum``)."""
        return self.dist.world_size * self.cfg.grad_accum

    @property
    def global_batch(self) -> int:
        return self.cfg.batch * self.micro_batches

    def draws(self, index: int) -> Draws:
        """Generators of micro-batch ``index`` (``0 … micro_batches − 1``) of the current step."""
        seed, step = self.cfg.seed, self.step
        return Draws(
            index=index,
            small=torch.Generator().manual_seed(seed_for(seed, step, index, _SMALL)),
            noise=torch.Generator(device=self.device).manual_seed(seed_for(seed, step, index, _NOISE)),
        )

    # -- data ---------------------------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings ``[n, Lt, D]`` on the device: the bundled encoder's (trained) or the source's (frozen)."""
        if self.text is not None:
            return self.text.encode(texts)
        if self.source is None:
            raise RuntimeError("no text encoder and no clip source with text embeddings")
        return self.source.embed(texts).to(self.device)

    def clips(self, draws: Draws) -> tuple[torch.Tensor, list[list[str]]]:
        """Clean clips ``[b, C, B, H, W]`` in the model's space (pixels in [−1, 1] or latents) on the device and
        per-frame captions of micro-batch ``draws.index``: from the source (windows drawn from a generator seeded
        ``seed_for(seed, step, index, 0)``, like the world's clips) or the world."""
        if self.source is not None:
            g = torch.Generator().manual_seed(seed_for(self.cfg.seed, self.step, draws.index, _TRUTH))
            x, captions = self.source.clips(self.cfg.batch, self.cfg.buffer, g)
            return x.to(self.device), captions
        video, captions = self._render()
        return video * 2.0 - 1.0, captions

    def _next_truth(self) -> tuple[object, list[list[str]]]:
        if self._data is None:
            cpus = os.cpu_count() or 1
            workers = min(8, max(0, (cpus - 2) // self.dist.world_size)) if self.device.type == "cuda" else 0
            cfg = self.cfg
            stream = _TruthStream(
                self.world.config, cfg.batch, cfg.buffer, cfg.seed, self.step, self.dist.rank, cfg.grad_accum
            )
            loader = torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=workers,
                prefetch_factor=4 if workers else None,
                persistent_workers=bool(workers),
            )
            self._data = iter(loader)
        return next(self._data)  # type: ignore[call-overload]

    def batch(self, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch: clips ``[b, C, B, H, W]`` (pixels in [−1, 1] or latents) and text embeddings,
        per frame ``[b, B, Lt, D]`` or ``[b, Lt, D]`` when every clip has one caption (:func:`shared_context`);
        captions are dropped with probability ``caption_dropout``, drawn from ``draws.small``."""
        cfg = self.cfg
        x, captions = self.clips(draws)
        drop = torch.rand(cfg.batch, generator=draws.small) < cfg.caption_dropout
        for b in range(cfg.batch):
            if drop[b]:
                captions[b] = [""] * cfg.buffer
        unique = sorted({c for row in captions for c in row})
        index = {c: i for i, c in enumerate(unique)}
        emb = self.embed(unique)  # [n, Lt, D]
        ids = torch.tensor([[index[c] for c in row] for row in captions], device=self.device)
        return x, shared_context(emb, ids)

    def _render(self) -> tuple[torch.Tensor, list[list[str]]]:
        """Frames ``[b, 3, B, H, W]`` in [0, 1] on the device, and per-frame captions."""
        from dataclasses import fields as dc_fields

        from .world import WorldTruth, render_frames

        truth, captions = self._next_truth()
        flat = WorldTruth(**{f.name: getattr(truth, f.name).flatten(0, 1) for f in dc_fields(WorldTruth)})
        video = render_frames(flat, self.world.config, self.device)  # [b·B, 3, H, W]
        b, frames, H, W = len(captions), self.cfg.buffer, self.world.config.height, self.world.config.width
        return video.view(b, frames, 3, H, W).permute(0, 2, 1, 3, 4), [list(row) for row in captions]

    def sigmas(self, draws: Draws) -> torch.Tensor:
        """Per-sample mixed partitions → σ ``[b, B]`` (drawn from ``draws.small``)."""
        cfg = self.cfg
        frames = cfg.buffer - cfg.reference_frames
        rows = []
        for _ in range(cfg.batch):
            c = sample_chunk_size(frames, cfg.chunk_sizes, cfg.t2v_share, draws.small)
            p = Partition(K=cfg.reference_frames, N=frames // c, c=c, s=1)
            shift = cfg.t2v_shift if c == frames and cfg.t2v_shift is not None else cfg.shift
            rows.append(training_sigmas(p, draws.small, shift))
        return torch.cat(rows).to(self.device)

    # -- steps --------------------------------------------------------------------------------------------

    def loss(self, draws: Draws) -> torch.Tensor:
        """Mean loss of one micro-batch (a scalar)."""
        x, ctx = self.batch(draws)
        sigma = self.sigmas(draws)
        noise = torch.randn(x.shape, generator=draws.noise, device=self.device)
        return flow_matching_loss(self.forward, x, sigma, noise, ctx)

    def _micro_loss(self, draws: Draws) -> torch.Tensor:
        try:
            return self.loss(draws)
        except Exception:  # torch.compile failures surface on the first call
            if not self._compiled:
                raise
            log.warning("torch.compile failed; training in eager mode", exc_info=True)
            for blocks, forwards in self._compiled:
                restore_forwards(blocks, forwards)
            self._compiled = []
            return self.loss(draws)

    def train_step(self, time_progress: float = 0.0) -> float:
        """One optimiser step over the global batch; returns this rank's mean micro-batch loss.

        Each rank accumulates ``grad_accum`` micro-batch losses divided by ``grad_accum``; FSDP averages the
        gradients over ranks (reduce-scatter, mean), so the step follows the mean loss of the global batch
        exactly as a single process accumulating all ``world_size × grad_accum`` micro-batches would.
        """
        cfg, accum = self.cfg, self.cfg.grad_accum
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(self.step, cfg, time_progress)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(accum):
            set_gradient_sync(self.live.values(), m == accum - 1)
            loss = self._micro_loss(self.draws(self.dist.rank * accum + m))
            (loss / accum).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self._update_ema()
        self.step += 1
        return total / accum

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))
        for pe, p in zip(self.ema.parameters(), self.live.parameters()):
            pe.lerp_(p.detach(), 1.0 - decay)  # local: both are shards with the same layout

    # -- weights ------------------------------------------------------------------------------------------

    def gather(self, which: Literal["live", "ema"] = "ema") -> tuple[StreamDiT, TextEncoder | None] | None:
        """Full, unsharded float32 copies of the live or EMA modules on rank 0 (CPU); ``None`` on other ranks.
        A collective: every rank must call it."""
        container = self.live if which == "live" else self.ema
        states = {name: full_state_dict(module, self.dist) for name, module in container.items()}
        if not self.dist.is_main:
            return None
        with torch.device("meta"):
            model = StreamDiT(self.model.config)
            text = TextEncoder(self.text.config) if self.text is not None else None
        model.load_state_dict(states["model"], assign=True)
        if text is not None:
            text.load_state_dict(states["text"], assign=True)
        return model.eval(), (text.eval() if text is not None else None)

    # -- checkpoints --------------------------------------------------------------------------------------

    def defaults(self) -> dict[str, object]:
        """Stream settings the trained model runs with (``streamdit.defaults``). With a source: chunks of 2
        (latent) frames over the training buffer, Wan's guidance 5, and the source's size and frame rate.
        Without (the procedural world): the teacher scheme, chunks of 2 with ``TEACHER_STEPS`` micro-steps and,
        when captions were dropped in training, guidance ``TEACHER_GUIDANCE`` (:class:`Distiller` overrides
        both for its one-step student)."""
        c = 2 if self.cfg.buffer % 2 == 0 else 1
        if self.source is not None:
            partition = [0, self.cfg.buffer // c, c, 1]
            d: dict[str, object] = {"partition": partition, "shift": self.cfg.shift}
            return d | {"guidance": 5.0} | self.source.defaults()
        return {
            "partition": [0, self.cfg.buffer // c, c, TEACHER_STEPS],
            "shift": self.cfg.shift,
            "guidance": TEACHER_GUIDANCE if self.cfg.caption_dropout > 0 else 1.0,
            "height": self.world.config.height,
            "width": self.world.config.width,
            "fps": self.world.config.fps,
        }

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def save(self) -> None:
        """Write ``ema.safetensors`` and ``live.safetensors`` (full weights, rank 0) and the sharded training
        state ``checkpoint/step-NNNNNNNN`` (DCP: live and EMA weights, optimizer; ``trainer.json``), then point
        ``checkpoint/latest`` at it and delete older steps. A collective."""
        meta = {
            "streamdit.codec": self.source.codec if self.source is not None else "pixel",
            "streamdit.defaults": json.dumps(self.defaults()),
            "streamdit.train_config": json.dumps(asdict(self.cfg)),
            "streamdit.step": str(self.step),
        }
        which: Literal["live", "ema"]
        for which in ("ema", "live"):
            full = self.gather(which)
            if full is not None:
                save_checkpoint(self.out / f"{which}.safetensors", full[0], full[1], meta)
        name = f"step-{self.step:08d}"
        partial = self.checkpoint_dir / f"{name}.partial"
        if self.dist.is_main and partial.exists():
            shutil.rmtree(partial)
        barrier()
        dcp.save(self._state(), checkpoint_id=str(partial))  # returns after every rank's shard is written
        if self.dist.is_main:
            info = {
                "step": self.step,
                "world_size": self.dist.world_size,
                "grad_accum": self.cfg.grad_accum,
                "batch": self.cfg.batch,
                "train_config": asdict(self.cfg),
            }
            (partial / "trainer.json").write_text(json.dumps(info, indent=1))
            final = self.checkpoint_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp = self.checkpoint_dir / "latest.tmp"
            tmp.write_text(name + "\n")
            os.replace(tmp, self.checkpoint_dir / "latest")
            for old in self.checkpoint_dir.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def _state(self) -> dict[str, Any]:
        """The sharded training state in DCP's layout (``DTensor`` shards reshard on load)."""
        live, optim = get_state_dict(self.live, self.opt)
        return {"live": live, "optim": optim, "ema": get_model_state_dict(self.ema)}

    def resume(self) -> bool:
        """Continue from ``checkpoint/latest`` (written by any number of ranks), or from the single-process
        files of earlier versions (``live``/``ema``/``optimizer.safetensors``). Returns False if there is none."""
        latest = self.checkpoint_dir / "latest"
        if latest.exists():
            path = self.checkpoint_dir / latest.read_text().strip()
            info = json.loads((path / "trainer.json").read_text())
            state = self._state()
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(self.live, self.opt, model_state_dict=state["live"], optim_state_dict=state["optim"])
            set_model_state_dict(self.ema, state["ema"])
            self.step = int(info["step"])
            saved = int(info["world_size"]) * int(info["grad_accum"])
            if saved != self.micro_batches or int(info["batch"]) != self.cfg.batch:
                log.warning(
                    "resuming a run of %d micro-batches of %d clips per step with %d of %d: training continues,"
                    " but not with the global batches the saved run would have drawn",
                    saved,
                    info["batch"],
                    self.micro_batches,
                    self.cfg.batch,
                )
        elif all((self.out / n).exists() for n in ("live.safetensors", "ema.safetensors", "optimizer.safetensors")):
            self._resume_single_file()
        else:
            return False
        self._data = None
        if self.dist.is_main:
            log.info("resumed %s at step %d on %d rank(s)", self.out, self.step, self.dist.world_size)
        return True

    def _resume_single_file(self) -> None:
        """Earlier versions' layout: full weights in ``live``/``ema.safetensors``; optimizer state keyed
        ``{index}.{name}`` over ``list(model.parameters()) + list(text.parameters())``, step in its metadata."""
        from safetensors import safe_open

        full = StateDictOptions(full_state_dict=True)
        for name, container in (("live", self.live), ("ema", self.ema)):
            ck = load_checkpoint(self.out / f"{name}.safetensors")
            state = {f"model.{k}": v for k, v in ck.model.state_dict().items()}
            if "text" in container:
                if ck.text_encoder is None:
                    raise ValueError(f"{self.out / name}.safetensors has no text encoder")
                state |= {f"text.{k}": v for k, v in ck.text_encoder.state_dict().items()}
            set_model_state_dict(container, state, options=full)
        names = [f"{prefix}.{n}" for prefix, module in self.live.items() for n, _ in module.named_parameters()]
        optim = get_optimizer_state_dict(self.live, self.opt, options=full)
        per_param: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(self.out / "optimizer.safetensors"), framework="pt") as f:
            meta = f.metadata()
            for key in f.keys():
                i, value = key.split(".", 1)
                per_param.setdefault(names[int(i)], {})[value] = f.get_tensor(key)
        optim["state"] = per_param  # type: ignore[assignment]
        set_optimizer_state_dict(self.live, self.opt, optim, options=full)
        self.step = int(meta["step"])

    def write_log(self, record: dict[str, Any]) -> None:
        with open(self.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def sample(self) -> None:
        """A short stream from the EMA model, saved as a contact sheet by rank 0 (training progress at a glance).
        A collective (the EMA weights are gathered)."""
        from .codec import PixelCodec
        from .pipeline import StreamPipeline
        from .prompts import parse_schedule
        from .sampler import StreamSampler
        from .video_io import write_contact_sheet

        if self.source is not None:
            if self.dist.is_main:
                log.info("no progress samples when training on a clip source (decoding needs its VAE)")
            return
        full = self.gather("ema")
        if full is None:
            return
        pipe = StreamPipeline(
            model=full[0].to(self.device),
            text_encoder=full[1].to(self.device) if full[1] is not None else None,
            codec=PixelCodec(),
            device=self.device,
            dtype=torch.float32,
            defaults=self.defaults(),
            trained=True,
        )
        sampler = StreamSampler(pipe, pipe.default_settings(partition=self.sample_partition()))
        schedule = parse_schedule(
            "0: a large red circle moving right on a black background\n"
            "32: a large blue square moving right on a grey background"
        )
        state = sampler.init_state(0, schedule)
        _, frames = sampler.advance(state, schedule, chunks=32 // sampler.settings.partition.c)
        write_contact_sheet(frames, self.out / f"sample_{self.step:06d}.png", layout="FCHW")

    def sample_partition(self) -> Partition:
        return Partition(K=0, N=8, c=2, s=4)

    def time_progress(self) -> float:
        """Share of the wall-clock budget used, as measured by rank 0 (all ranks must agree on when to stop)."""
        if not self.cfg.max_minutes:
            return 0.0
        value = torch.tensor([(time.perf_counter() - self._started) / (60.0 * self.cfg.max_minutes)])
        if self.dist.world_size > 1:
            dist.broadcast(value, src=0)  # CPU tensor: the gloo side of the group
        return float(value)

    def _mean_over_ranks(self, value: float) -> float:
        if self.dist.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.dist.world_size

    def run(self, until: int | None = None) -> None:
        """Train to ``cfg.steps`` (or to step ``until`` if it comes first, as if interrupted there) or until the
        time budget is used; log every ``log_every`` steps, checkpoint every ``ckpt_every`` and at the end."""
        cfg = self.cfg
        stop = min(cfg.steps, until) if until is not None else cfg.steps
        self._started = time.perf_counter()
        t0, losses = time.perf_counter(), []
        progress = self.time_progress()
        while self.step < stop and progress < 1.0:
            losses.append(self.train_step(progress))
            progress = self.time_progress()
            done = self.step == stop or progress >= 1.0
            if self.step % cfg.log_every == 0 or done:
                elapsed = time.perf_counter() - t0
                record = {
                    "step": self.step,
                    "loss": self._mean_over_ranks(sum(losses) / len(losses)),
                    "lr": _lr_at(self.step, cfg, progress),
                    "elapsed_s": round(elapsed, 1),
                    "samples_per_s": round(len(losses) * self.global_batch / max(elapsed, 1e-9), 1),
                }
                if self.dist.is_main:
                    self.write_log(record)
                    log.info("step %(step)d loss %(loss).4f lr %(lr).2e %(samples_per_s).0f samples/s", record)
                t0, losses = time.perf_counter(), []
            if self.step % cfg.ckpt_every == 0 or done:
                self.save()
            if cfg.sample_every and (self.step % cfg.sample_every == 0 or done):
                self.sample()


class Distiller(Trainer):
    """Per-segment multistep distillation of a guided ``s_teacher``-step teacher into a one-step student.
    The teacher is sharded like the student (bf16 on GPU) and runs without gradients."""

    def __init__(
        self,
        cfg: DistillConfig,
        out: str | os.PathLike[str],
        device: str | torch.device | None,
        teacher: str,
        dist_ctx: DistContext | None = None,
        source: ClipSource | None = None,
    ) -> None:
        super().__init__(cfg, out, device, init=teacher, dist_ctx=dist_ctx, source=source)
        model, text = load_init(teacher, need_text=source is None)
        self.teacher = model.requires_grad_(False).eval()
        # 2·s_teacher of the ~2·s_teacher + 3 forward-equivalents of a step are the teacher's: compile it too
        if cfg.compile:
            self._compiled.append((self.teacher.blocks, compile_blocks(self.teacher.blocks)))
        shard_streamdit(self.teacher, self.dist.mesh, self.compute_dtype)
        self.teacher_forward: VelocityModel = InDtype(self.teacher, self.compute_dtype)
        # the bundled teacher's own (frozen) text encoder, small: a copy on every rank; with a source, its embeddings
        self.teacher_text = text.requires_grad_(False).to(self.device) if source is None and text else None
        self.dcfg = cfg
        frames = cfg.buffer
        self.student_partition = Partition(K=0, N=frames // cfg.chunk, c=cfg.chunk, s=1)
        self.teacher_partition = Partition(K=0, N=frames // cfg.chunk, c=cfg.chunk, s=cfg.teacher_steps)

    def sample_partition(self) -> Partition:
        return self.student_partition

    @torch.no_grad()
    def _teacher_move(
        self, x: torch.Tensor, context_ids: torch.Tensor, unique: list[str], levels: torch.Tensor
    ) -> torch.Tensor:
        """``s_teacher`` guided Euler micro-steps of the teacher through ``levels`` ``[s + 1, b, B]`` (per sample,
        :func:`distill_levels`)."""
        cfg, tp = self.dcfg, self.teacher_partition
        levels = levels.float().to(self.device)
        texts = unique + [""]
        emb = self.teacher_text.encode(texts) if self.teacher_text is not None else self.embed(texts)
        cond = shared_context(emb, context_ids)
        uncond = emb[-1].expand(cond.shape)
        for m in range(tp.s):
            sig, nxt = levels[m], levels[m + 1]  # [b, B]
            v = self.teacher_forward(torch.cat([x, x]), torch.cat([sig, sig]), torch.cat([cond, uncond])).float()
            vc, vu = v.chunk(2)
            x = x + (nxt - sig)[:, None, :, None, None] * (vu + cfg.teacher_guidance * (vc - vu))
        return x

    def levels(self, draws: Draws) -> torch.Tensor:
        """Per-sample teacher levels ``[s + 1, b, B]``: the staircase, or with probability ``warm_share`` a warm-start
        step ``j ~ U{0 … N−2}`` (drawn from ``draws.small`` only when ``warm_share > 0``)."""
        cfg, tp = self.dcfg, self.teacher_partition
        stair = distill_levels(tp, cfg.shift)
        if cfg.warm_share <= 0 or tp.N < 2:
            return stair[:, None].expand(-1, cfg.batch, -1)
        warm = (torch.rand(cfg.batch, generator=draws.small) < cfg.warm_share).tolist()
        steps = torch.randint(tp.N - 1, (cfg.batch,), generator=draws.small).tolist()
        rows = [distill_levels(tp, cfg.shift, j) if w else stair for w, j in zip(warm, steps)]
        return torch.stack(rows, dim=1)

    def loss(self, draws: Draws) -> torch.Tensor:
        x, captions = self.clips(draws)
        unique = sorted({c for row in captions for c in row})
        index = {c: i for i, c in enumerate(unique)}
        ids = torch.tensor([[index[c] for c in row] for row in captions], device=self.device)
        levels = self.levels(draws).float().to(self.device)  # [s + 1, b, B]
        sigma, sigma_next = levels[0], levels[-1]
        noise = torch.randn(x.shape, generator=draws.noise, device=self.device)
        x_sigma = noise_clip(x, sigma, noise)
        x_teacher = self._teacher_move(x_sigma, ids, unique, levels)
        context = shared_context(self.embed(unique), ids)
        return distillation_loss(self.forward, x_sigma, sigma, sigma_next, x_teacher, context)

    def defaults(self) -> dict[str, object]:
        d = super().defaults()
        d["partition"] = [0, self.student_partition.N, self.student_partition.c, 1]
        d["guidance"] = 1.0  # the student learned the teacher's guided moves: it runs unguided
        return d


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _config_from_args(args: argparse.Namespace, cls: type[TrainConfig]) -> TrainConfig:
    """The config file with ``--steps``/``--minutes``/``--batch``/``--grad-accum`` applied."""
    cfg = load_config(args.config, cls)
    pairs = (
        ("steps", args.steps),
        ("max_minutes", args.minutes),
        ("batch", args.batch),
        ("grad_accum", args.grad_accum),
    )
    overrides = {k: v for k, v in pairs if v}
    return type(cfg)(**{**asdict(cfg), **overrides}) if overrides else cfg


def _launch(args: argparse.Namespace, make: Callable[[DistContext], Trainer]) -> int:
    """Join the process group (torchrun's, or a group of one), train, leave. Ranks other than 0 log only
    warnings and errors."""
    ctx = init_distributed(args.device)
    if not ctx.is_main:
        logging.getLogger(LOGGER_NAME).setLevel(logging.WARNING)
    try:
        trainer = make(ctx)
        if args.resume:
            trainer.resume()
        trainer.run()
    finally:
        shutdown_distributed()
    return 0


def _check_data_flags(args: argparse.Namespace) -> None:
    if not args.data:
        for flag in ("vae", "text_encoder", "tokenizer", "cache"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} is only used with --data (training on videos)")
    elif not args.vae or not args.text_encoder:
        raise ValueError("--data needs --vae (the Wan 2.1 VAE) and --text-encoder (umT5); see docs/FINETUNE_WAN.md")


def _source(args: argparse.Namespace, cfg: TrainConfig, init: str | None, ctx: DistContext) -> ClipSource | None:
    """The captioned-video source when ``--data`` is given. Rank 0 encodes what is not cached yet (on its device)
    while the other ranks wait (on a gloo group without the default collective timeout: encoding a large data
    set takes long); they then read the same cache, which has nothing left to encode."""
    _check_data_flags(args)
    if not args.data:
        return None
    from datetime import timedelta

    from .video_data import video_source

    if ctx.world_size == 1:
        return video_source(args, cfg, init, ctx.device)
    group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    ok: list[object] = [False]
    source = None
    if ctx.is_main:
        try:
            source = video_source(args, cfg, init, ctx.device)
            ok = [True]
        finally:
            dist.broadcast_object_list(ok, src=0, group=group)
    else:
        dist.broadcast_object_list(ok, src=0, group=group)
        if not ok[0]:
            raise RuntimeError("rank 0 could not prepare the video data (its log has the error)")
        source = video_source(args, cfg, init, ctx.device)
    dist.destroy_process_group(group)
    return source


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args, TrainConfig)
    _check_data_flags(args)

    def make(ctx: DistContext) -> Trainer:
        return Trainer(cfg, args.out, init=args.init, dist_ctx=ctx, source=_source(args, cfg, args.init, ctx))

    return _launch(args, make)


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args, DistillConfig)
    _check_data_flags(args)

    def make(ctx: DistContext) -> Trainer:
        source = _source(args, cfg, args.teacher, ctx)
        return Distiller(cfg, args.out, None, teacher=args.teacher, dist_ctx=ctx, source=source)  # type: ignore[arg-type]

    return _launch(args, make)


def _add_data_args(p: Any) -> None:
    g = p.add_argument_group("training on captioned videos (docs/FINETUNE_WAN.md)")
    g.add_argument("--data", default=None, help="folder of videos with a caption file each (clip.mp4 + clip.txt)")
    g.add_argument("--cache", default=None, help="folder for encoded latents and captions (DATA/.streamdit-cache)")
    g.add_argument("--vae", default=None, help="Wan 2.1 VAE: wan_2.1_vae.safetensors or a diffusers vae/ folder")
    g.add_argument("--text-encoder", default=None, help="umT5: a safetensors file or a transformers folder")
    g.add_argument("--tokenizer", default=None, help="umT5 tokenizer folder (if not in the text encoder's folder/file)")


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint in half precision, split into files under ``--shard-mib`` MiB, with a model-card note."""
    ck = load_checkpoint(args.ckpt)
    meta = {k: v for k, v in ck.metadata.items() if k.startswith("streamdit.") and k not in ("streamdit.format",)}
    if args.note:
        meta["streamdit.note"] = args.note
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    shard = int(args.shard_mib * 2**20) or None
    files = save_checkpoint(args.out, ck.model, ck.text_encoder, meta, dtype=dtype, max_shard_bytes=shard)
    for f in files:
        log.info("wrote %s (%.1f MiB)", f, f.stat().st_size / 2**20)
    return 0


def _add_scale_args(p: Any) -> None:
    p.add_argument("--batch", type=int, default=None, help="clips per micro-batch on each rank (overrides the config)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches accumulated per step (overrides)")


def _add_run_args(p: Any) -> None:
    """Arguments shared by ``train`` and ``distill``: config, output, device, length, resume, scale and data."""
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=None, help="override the config's steps")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (overrides the config)")
    _add_scale_args(p)
    _add_data_args(p)


@register_command("train")
def _add_train(sub: Any) -> None:
    t = sub.add_parser(
        "train",
        help="train a StreamDiT model on the procedural world (several GPUs: torchrun --nproc_per_node N -m …)",
    )
    t.add_argument("--init", default=None, help="start from this checkpoint (StreamDiT or Wan 2.1 T2V safetensors)")
    _add_run_args(t)
    t.set_defaults(func=cmd_train)
    d = sub.add_parser("distill", help="multistep-distil a teacher into a one-step-per-chunk student")
    d.add_argument("--teacher", required=True)
    _add_run_args(d)
    d.set_defaults(func=cmd_distill)
    e = sub.add_parser("export", help="write a checkpoint as fp16 shards under 16 MiB")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--note", default="")
    e.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    e.add_argument("--shard-mib", type=float, default=15, help="split into files of at most this size (0: one file)")
    e.set_defaults(func=cmd_export)
