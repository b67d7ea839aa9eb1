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

Distillation (per segment, the paper's §4.2): the student's scheme is ``(K=0, N, c, s=1)``; the teacher's is
the same with ``s_teacher`` micro-steps and guidance. From a buffer at the student's staircase (real clips
noised to the levels ``σ_p``), the teacher runs ``s_teacher`` guided Euler micro-steps, which brings every
chunk exactly to the next rung ``σ_p − 1/N``; the student learns to make that move in one unguided step:
``v_target = (x_teacher − x) / (σ_next − σ)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .cli import register_command
from .config import ModelConfig, preset
from .log import get_logger
from .model import StreamDiT
from .schedule import (
    Partition,
    default_chunk_sizes,
    inference_sigmas,
    next_inference_sigmas,
    sample_chunk_size,
    training_sigmas,
)
from .text import TextEncoder, TextEncoderConfig

__all__ = ["TrainConfig", "DistillConfig", "Trainer", "flow_matching_loss", "distillation_loss"]

log = get_logger("train")


@dataclass(frozen=True)
class TrainConfig:
    """Attributes (all committed as JSON files under ``configs/``):
    model: preset name (``bundled`` …); text_layers/text_heads: the bundled text encoder's size.
    buffer: frames per training clip ``B``; reference_frames: ``K``.
    chunk_sizes: the partition mix (``[]`` = ``{1, 2, 4, …, B}``); t2v_share: probability of ``c = B``.
    shift: time shift of the training levels. caption_dropout: share of samples trained unconditionally.
    batch, lr, weight_decay, warmup, steps, grad_clip, ema: optimisation. bf16: autocast on CUDA.
    compile: ``torch.compile`` the model for training (falls back to eager, with a warning, if it fails).
    max_minutes: wall-clock budget; the run stops when it is used up (0 = none). The learning-rate schedule
    follows ``max(step/steps, elapsed/budget)`` so a time-limited run still anneals.
    log_every, sample_every, ckpt_every: in steps. seed: all randomness derives from it.
    world: keyword overrides for ``WorldConfig``.
    """

    model: str = "bundled"
    text_layers: int = 2
    text_heads: int = 4
    buffer: int = 16
    reference_frames: int = 0
    chunk_sizes: tuple[int, ...] = ()
    t2v_share: float = 0.3
    shift: float = 1.0
    caption_dropout: float = 0.1
    batch: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 500
    steps: int = 20000
    grad_clip: float = 1.0
    ema: float = 0.999
    bf16: bool = True
    compile: bool = False
    max_minutes: float = 0.0
    log_every: int = 50
    sample_every: int = 2000
    ckpt_every: int = 1000
    seed: int = 0
    world: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "chunk_sizes", tuple(self.chunk_sizes) or default_chunk_sizes(self.buffer - self.reference_frames)
        )
        frames = self.buffer - self.reference_frames
        bad = [c for c in self.chunk_sizes if c < 1 or frames % c]
        if bad:
            raise ValueError(f"chunk_sizes {bad} do not divide buffer − reference_frames = {frames}")
        if not 0 <= self.caption_dropout < 1 or not 0 <= self.t2v_share <= 1:
            raise ValueError("caption_dropout must be in [0, 1) and t2v_share in [0, 1]")
        if self.batch < 1 or self.steps < 1 or self.lr <= 0:
            raise ValueError(f"batch, steps and lr must be positive, got {self.batch}, {self.steps}, {self.lr}")


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Distillation: the student runs ``(K=0, N=buffer/chunk, c=chunk, s=1)`` without guidance; the teacher
    the same partition with ``teacher_steps`` micro-steps and ``teacher_guidance``."""

    chunk: int = 2
    teacher_steps: int = 8
    teacher_guidance: float = 3.0
    lr: float = 1e-4
    warmup: int = 100
    steps: int = 4000
    caption_dropout: float = 0.0


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
    model: StreamDiT, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """Buffered flow matching: MSE between ``v_θ(x_σ)`` and ``ε − x`` over non-reference frames
    (reference frames sit at σ = 0 and are masked out of the loss)."""
    pred = model(noise_clip(x, sigma, noise), sigma, context).float()
    err = (pred - (noise - x).float()).pow(2).mean(dim=(1, 3, 4))  # [b, F]
    weight = (sigma > 0).float()
    return (err * weight).sum() / weight.sum().clamp(min=1.0)


def distillation_loss(
    student: StreamDiT,
    x_sigma: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    x_teacher: torch.Tensor,
    context: torch.Tensor,
) -> torch.Tensor:
    """The student's one step must land where the teacher's guided micro-steps landed:
    ``v_target = (x_teacher − x_σ) / (σ_next − σ)`` (frames that do not move are masked out)."""
    delta = (sigma_next - sigma).float()[:, None, :, None, None]
    moving = (delta != 0).float()
    target = (x_teacher - x_sigma).float() / torch.where(delta == 0, torch.ones_like(delta), delta)
    pred = student(x_sigma, sigma, context).float()
    err = (pred - target).pow(2) * moving
    return err.sum() / (
        moving.sum()
        * x_sigma.shape[1]
        * x_sigma.shape[3]
        * x_sigma.shape[4]
        / moving.shape[1]
        / moving.shape[3]
        / moving.shape[4]
    ).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------


def _lr_at(step: int, cfg: TrainConfig, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak over ``max(step progress, time progress)``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = max((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), time_progress)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class _TruthStream(torch.utils.data.IterableDataset):
    """Ground truth and captions of random world clips, made on CPU worker processes (the GPU renders them).
    Worker ``w`` of ``n`` draws from a generator seeded ``seed·1000 + start·n + w`` (so a resumed run continues
    with fresh, reproducible draws)."""

    def __init__(self, world_config: object, batch: int, frames: int, seed: int, start: int) -> None:
        self.world_config, self.batch, self.frames, self.seed, self.start = world_config, batch, frames, seed, start

    def __iter__(self):  # type: ignore[no-untyped-def]
        from .world import World, captions_from_truth

        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        g = torch.Generator().manual_seed(self.seed * 1000 + self.start * n + wid)
        world = World(self.world_config)  # type: ignore[arg-type]
        while True:
            truth = world.sample_truth(self.batch, self.frames, g)
            yield truth, captions_from_truth(truth)


class Trainer:
    """Owns the models, the optimiser, EMA, the world sampler, checkpoints and logs."""

    def __init__(
        self, cfg: TrainConfig, out: str | os.PathLike[str], device: str | torch.device, init: str | None = None
    ) -> None:
        from .world import VOCABULARY, World, WorldConfig

        self.cfg, self.out, self.device = cfg, Path(out), torch.device(device)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)  # parameter initialisation only
        if init:
            ckpt = load_checkpoint(init)
            if ckpt.text_encoder is None:
                raise ValueError(f"{init} has no text encoder")
            self.model, self.text = ckpt.model, ckpt.text_encoder
        else:
            mcfg: ModelConfig = preset(cfg.model)
            self.model = StreamDiT(mcfg)
            self.text = TextEncoder(
                TextEncoderConfig(
                    vocabulary=VOCABULARY,
                    text_len=mcfg.text_len,
                    dim=mcfg.text_dim,
                    num_layers=cfg.text_layers,
                    num_heads=cfg.text_heads,
                )
            )
        pt = self.model.config.patch_size[0]
        chunks = (cfg.chunk,) if isinstance(cfg, DistillConfig) else cfg.chunk_sizes
        bad = [c for c in chunks if c % pt] + ([cfg.reference_frames] if cfg.reference_frames % pt else [])
        if bad or cfg.buffer % pt:
            raise ValueError(
                f"chunk sizes {list(chunks)}, reference_frames {cfg.reference_frames} and buffer "
                f"{cfg.buffer} must be multiples of the model's temporal patch {pt}"
            )
        self.model.to(self.device).train()
        self.text.to(self.device).train()
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text).eval().requires_grad_(False)
        params = list(self.model.parameters()) + list(self.text.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.world = World(WorldConfig(**cfg.world))  # type: ignore[arg-type]
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # small draws (partitions, dropout)
        # bulk noise is drawn on the device: a CPU draw of a [256, 3, 16, 64, 64] batch took half of every step
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.step = 0
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.log_file = self.out / "log.jsonl"
        self._data: object | None = None

    def _next_truth(self) -> tuple[object, list[list[str]]]:
        if self._data is None:
            workers = min(8, max(0, (os.cpu_count() or 1) - 2)) if self.device.type == "cuda" else 0
            stream = _TruthStream(self.world.config, self.cfg.batch, self.cfg.buffer, self.cfg.seed, self.step)
            loader = torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=workers,
                prefetch_factor=4 if workers else None,
                persistent_workers=bool(workers),
            )
            self._data = iter(loader)
        return next(self._data)  # type: ignore[call-overload]

    # -- data ---------------------------------------------------------------------------------------------

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips ``[b, 3, B, H, W]`` in [−1, 1] and per-frame text embeddings ``[b, B, Lt, D]``."""
        cfg = self.cfg
        video, captions = self._render()
        drop = torch.rand(cfg.batch, generator=self.gen) < cfg.caption_dropout
        for b in range(cfg.batch):
            if drop[b]:
                captions[b] = [""] * cfg.buffer
        unique = sorted({c for row in captions for c in row})
        index = {c: i for i, c in enumerate(unique)}
        emb = self.text.encode(unique)  # [n, Lt, D]
        ids = torch.tensor([[index[c] for c in row] for row in captions], device=self.device)
        return video * 2.0 - 1.0, emb[ids]

    def _render(self) -> tuple[torch.Tensor, list[list[str]]]:
        """Frames ``[b, 3, B, H, W]`` in [0, 1] on the device, and per-frame captions."""
        from dataclasses import fields as dc_fields

        from .world import WorldTruth, render_frames

        truth, captions = self._next_truth()
        flat = WorldTruth(**{f.name: getattr(truth, f.name).flatten(0, 1) for f in dc_fields(WorldTruth)})
        video = render_frames(flat, self.world.config, self.device)  # [b·B, 3, H, W]
        b, frames, H, W = len(captions), self.cfg.buffer, self.world.config.height, self.world.config.width
        return video.view(b, frames, 3, H, W).permute(0, 2, 1, 3, 4), [list(row) for row in captions]

    def sigmas(self) -> torch.Tensor:
        """Per-sample mixed partitions → σ ``[b, B]``."""
        cfg = self.cfg
        frames = cfg.buffer - cfg.reference_frames
        rows = []
        for _ in range(cfg.batch):
            c = sample_chunk_size(frames, cfg.chunk_sizes, cfg.t2v_share, self.gen)
            p = Partition(K=cfg.reference_frames, N=frames // c, c=c, s=1)
            rows.append(training_sigmas(p, self.gen, cfg.shift))
        return torch.cat(rows).to(self.device)

    # -- steps --------------------------------------------------------------------------------------------

    def loss(self) -> torch.Tensor:
        x, ctx = self.batch()
        sigma = self.sigmas()
        noise = torch.randn(x.shape, generator=self.noise_gen, device=self.device)
        return flow_matching_loss(self.forward, x, sigma, noise, ctx)  # type: ignore[arg-type]

    def train_step(self) -> float:
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(self.step, cfg, self.time_progress())
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and self.device.type == "cuda"):
            try:
                loss = self.loss()
            except Exception:  # torch.compile failures surface on the first call
                if self.forward is self.model:
                    raise
                log.warning("torch.compile failed; training in eager mode", exc_info=True)
                self.forward = self.model
                loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + list(self.text.parameters()), cfg.grad_clip)
        self.opt.step()
        self._update_ema()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))
        for ema, live in ((self.ema_model, self.model), (self.ema_text, self.text)):
            for pe, p in zip(ema.parameters(), live.parameters()):
                pe.lerp_(p.detach(), 1.0 - decay)

    # -- checkpoints --------------------------------------------------------------------------------------

    def defaults(self) -> dict[str, object]:
        return {
            "partition": [0, 8, 2, 1],
            "shift": self.cfg.shift,
            "guidance": 1.0,
            "height": self.world.config.height,
            "width": self.world.config.width,
            "fps": self.world.config.fps,
        }

    def save(self) -> None:
        meta = {
            "streamdit.defaults": json.dumps(self.defaults()),
            "streamdit.train_config": json.dumps(asdict(self.cfg)),
            "streamdit.step": str(self.step),
        }
        save_checkpoint(self.out / "ema.safetensors", self.ema_model, self.ema_text, meta)
        save_checkpoint(self.out / "live.safetensors", self.model, self.text, meta)
        opt = {f"{i}.{k}": v for i, s in self.opt.state_dict()["state"].items() for k, v in s.items()}
        from safetensors.torch import save_file

        tmp = self.out / "optimizer.safetensors.tmp"
        save_file(
            {k: v.contiguous().cpu() for k, v in opt.items()},
            str(tmp),
            metadata={
                "step": str(self.step),
                "generator": json.dumps(self.gen.get_state().tolist()),
                "noise_generator": json.dumps(self.noise_gen.get_state().tolist()),
            },
        )
        os.replace(tmp, self.out / "optimizer.safetensors")

    def resume(self) -> bool:
        from safetensors import safe_open

        live, ema, opt = (self.out / n for n in ("live.safetensors", "ema.safetensors", "optimizer.safetensors"))
        if not (live.exists() and ema.exists() and opt.exists()):
            return False
        for path, model, text in ((live, self.model, self.text), (ema, self.ema_model, self.ema_text)):
            ck = load_checkpoint(path)
            model.load_state_dict(ck.model.state_dict())
            text.load_state_dict(ck.text_encoder.state_dict())  # type: ignore[union-attr]
        state = self.opt.state_dict()
        with safe_open(str(opt), framework="pt") as f:
            meta = f.metadata()
            for key in f.keys():
                i, name = key.split(".", 1)
                state["state"].setdefault(int(i), {})[name] = f.get_tensor(key).to(self.device)
        self.opt.load_state_dict(state)
        self.step = int(meta["step"])
        self.gen.set_state(torch.tensor(json.loads(meta["generator"]), dtype=torch.uint8))
        if "noise_generator" in meta:
            self.noise_gen.set_state(torch.tensor(json.loads(meta["noise_generator"]), dtype=torch.uint8))
        log.info("resumed %s at step %d", self.out, self.step)
        return True

    def write_log(self, record: dict[str, Any]) -> None:
        with open(self.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def sample(self) -> None:
        """A short stream from the EMA model, saved as a contact sheet (training progress at a glance)."""
        from .codec import PixelCodec
        from .pipeline import StreamPipeline
        from .prompts import parse_schedule
        from .sampler import StreamSampler
        from .video_io import write_contact_sheet

        pipe = StreamPipeline(
            model=self.ema_model,
            text_encoder=self.ema_text,
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
        if not self.cfg.max_minutes:
            return 0.0
        return (time.perf_counter() - self._started) / (60.0 * self.cfg.max_minutes)

    def run(self) -> None:
        cfg = self.cfg
        self._started = time.perf_counter()
        t0, losses = time.perf_counter(), []
        while self.step < cfg.steps and self.time_progress() < 1.0:
            losses.append(self.train_step())
            done = self.step == cfg.steps or self.time_progress() >= 1.0
            if self.step % cfg.log_every == 0 or done:
                elapsed = time.perf_counter() - t0
                record = {
                    "step": self.step,
                    "loss": sum(losses) / len(losses),
                    "lr": _lr_at(self.step, cfg, self.time_progress()),
                    "elapsed_s": round(elapsed, 1),
                    "samples_per_s": round(len(losses) * cfg.batch / max(elapsed, 1e-9), 1),
                }
                self.write_log(record)
                log.info("step %(step)d loss %(loss).4f lr %(lr).2e %(samples_per_s).0f samples/s", record)
                t0, losses = time.perf_counter(), []
            if self.step % cfg.ckpt_every == 0 or done:
                self.save()
            if cfg.sample_every and (self.step % cfg.sample_every == 0 or done):
                self.sample()


class Distiller(Trainer):
    """Per-segment multistep distillation of a guided ``s_teacher``-step teacher into a one-step student."""

    def __init__(
        self, cfg: DistillConfig, out: str | os.PathLike[str], device: str | torch.device, teacher: str
    ) -> None:
        super().__init__(cfg, out, device, init=teacher)
        ck = load_checkpoint(teacher, device=self.device)
        if ck.text_encoder is None:
            raise ValueError(f"teacher {teacher} has no text encoder")
        self.teacher, self.teacher_text = ck.model.requires_grad_(False), ck.text_encoder.requires_grad_(False)
        self.dcfg = cfg
        frames = cfg.buffer
        self.student_partition = Partition(K=0, N=frames // cfg.chunk, c=cfg.chunk, s=1)
        self.teacher_partition = Partition(K=0, N=frames // cfg.chunk, c=cfg.chunk, s=cfg.teacher_steps)

    def sample_partition(self) -> Partition:
        return self.student_partition

    @torch.no_grad()
    def _teacher_move(self, x: torch.Tensor, context_ids: torch.Tensor, unique: list[str]) -> torch.Tensor:
        """``s_teacher`` guided Euler micro-steps of the teacher from the student's rung (m = 0)."""
        cfg, tp = self.dcfg, self.teacher_partition
        emb = self.teacher_text.encode(unique + [""])
        cond, uncond = emb[context_ids], emb[-1][None, None].expand(x.shape[0], x.shape[2], -1, -1)
        for m in range(tp.s):
            sig = inference_sigmas(tp, m, cfg.shift).float().to(self.device)
            nxt = next_inference_sigmas(tp, m, cfg.shift).float().to(self.device)
            s = sig[None].expand(x.shape[0], -1)
            v = self.teacher(torch.cat([x, x]), torch.cat([s, s]), torch.cat([cond, uncond])).float()
            vc, vu = v.chunk(2)
            x = x + (nxt - sig)[None, None, :, None, None] * (vu + cfg.teacher_guidance * (vc - vu))
        return x

    def loss(self) -> torch.Tensor:
        cfg, sp = self.dcfg, self.student_partition
        video, captions = self._render()
        x = video * 2.0 - 1.0
        unique = sorted({c for row in captions for c in row})
        index = {c: i for i, c in enumerate(unique)}
        ids = torch.tensor([[index[c] for c in row] for row in captions], device=self.device)
        sigma = inference_sigmas(sp, 0, cfg.shift).float().to(self.device)[None].expand(cfg.batch, -1)
        sigma_next = next_inference_sigmas(sp, 0, cfg.shift).float().to(self.device)[None].expand(cfg.batch, -1)
        noise = torch.randn(x.shape, generator=self.noise_gen, device=self.device)
        x_sigma = noise_clip(x, sigma, noise)
        x_teacher = self._teacher_move(x_sigma, ids, unique)
        context = self.text.encode(unique)[ids]
        return distillation_loss(self.forward, x_sigma, sigma, sigma_next, x_teacher, context)  # type: ignore[arg-type]

    def defaults(self) -> dict[str, object]:
        d = super().defaults()
        d["partition"] = [0, self.student_partition.N, self.student_partition.c, 1]
        return d


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _config_from_args(args: argparse.Namespace, cls: type[TrainConfig]) -> TrainConfig:
    """The config file with ``--steps``/``--minutes`` applied."""
    cfg = load_config(args.config, cls)
    overrides = {k: v for k, v in (("steps", args.steps), ("max_minutes", args.minutes)) if v}
    return type(cfg)(**{**asdict(cfg), **overrides}) if overrides else cfg


def _run(trainer: Trainer, resume: bool) -> int:
    if resume:
        trainer.resume()
    trainer.run()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args, TrainConfig)
    return _run(Trainer(cfg, args.out, _device(args.device), init=args.init), args.resume)


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args, DistillConfig)
    return _run(Distiller(cfg, args.out, _device(args.device), teacher=args.teacher), args.resume)  # type: ignore[arg-type]


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint in half precision, split into files under 16 MiB, with a model-card note."""
    ck = load_checkpoint(args.ckpt)
    meta = {k: v for k, v in ck.metadata.items() if k.startswith("streamdit.") and k not in ("streamdit.format",)}
    if args.note:
        meta["streamdit.note"] = args.note
    files = save_checkpoint(args.out, ck.model, ck.text_encoder, meta, dtype=torch.float16, max_shard_bytes=15 * 2**20)
    for f in files:
        log.info("wrote %s (%.1f MiB)", f, f.stat().st_size / 2**20)
    return 0


@register_command("train")
def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train a StreamDiT model on the procedural world")
    t.add_argument("--config", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--device", default=None)
    t.add_argument("--init", default=None, help="start from this checkpoint")
    t.add_argument("--steps", type=int, default=None, help="override the config's steps")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget (overrides the config)")
    t.set_defaults(func=cmd_train)
    d = sub.add_parser("distill", help="multistep-distil a teacher into a one-step-per-chunk student")
    d.add_argument("--config", required=True)
    d.add_argument("--teacher", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--device", default=None)
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--resume", action="store_true")
    d.add_argument("--minutes", type=float, default=None, help="wall-clock budget (overrides the config)")
    d.set_defaults(func=cmd_distill)
    e = sub.add_parser("export", help="write a checkpoint as fp16 shards under 16 MiB")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--note", default="")
    e.set_defaults(func=cmd_export)
