"""Code that the distributed training tests run on each rank of a two-process gloo group (CPU).

Kept in its own module so that ``torch.multiprocessing.spawn`` can import it in the child processes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from streamdit_core.train import DistillConfig, Distiller, TrainConfig, Trainer

WORLD = {"height": 32, "width": 32}
COMMON = dict(
    model="test-tiny", text_heads=2, text_layers=1, buffer=4, batch=2, warmup=2, steps=4, log_every=1,
    sample_every=0, ckpt_every=100, world=WORLD,
)


def train_config(grad_accum: int) -> TrainConfig:
    return TrainConfig(lr=3e-3, caption_dropout=0.3, grad_accum=grad_accum, **COMMON)  # type: ignore[arg-type]


def distill_config(grad_accum: int) -> DistillConfig:
    return DistillConfig(lr=2e-3, chunk=2, teacher_steps=2, steps=2, grad_accum=grad_accum,
                         **{k: v for k, v in COMMON.items() if k != "steps"})  # type: ignore[arg-type]


def two_rank_worker(rank: int, root: str) -> None:
    """On 2 ranks with one micro-batch each: train 0 → 2 (keep a copy of that checkpoint) → 4; resume a
    single-process checkpoint written at step 2 and train it to 4; distil the single-process teacher."""
    torch.set_num_threads(1)
    base = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{base / 'store'}", rank=rank, world_size=2)
    try:
        tr = Trainer(train_config(1), base / "two", "cpu")
        tr.run(until=2)
        if rank == 0:
            shutil.copytree(base / "two", base / "two_at2")
        dist.barrier()
        tr.run()
        again = Trainer(train_config(1), base / "one_to_two", "cpu")
        assert again.resume() and again.step == 2
        again.run()
        Distiller(distill_config(1), base / "distill_two", "cpu", teacher=str(base / "one" / "ema.safetensors")).run()
    finally:
        dist.destroy_process_group()


def cli_worker(rank: int, root: str, argv: list[str]) -> None:
    """Run ``python -m streamdit_core`` with ``argv`` as rank ``rank`` of a two-process gloo group (the command
    joins the existing group and leaves it at the end)."""
    from streamdit_core.cli import main

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(root) / 'cli_store'}", rank=rank, world_size=2)
    try:
        assert main(argv) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
