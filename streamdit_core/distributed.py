"""Distributed training plumbing: process group, FSDP2 sharding, activation checkpointing, seeds, full states.

One code path for every world size. Under ``torchrun`` the ranks come from the environment
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK``); a plain ``python -m streamdit_core train`` runs as a process group
of one rank on an in-process store (no ports, no environment). Either way every trainable module is sharded
with FSDP2 (``torch.distributed.fsdp.fully_shard``): each transformer block is its own unit, the root holds
the embeddings and the head.

Mixed precision (GPU, ``bf16``): parameters are all-gathered in bfloat16 and gradients reduced in float32
(``MixedPrecisionPolicy``). FSDP does not cast the forward inputs (``cast_forward_inputs=False``): σ, the
float32 time modulation and the RoPE angles must stay float32 (a bf16 σ is off by up to 4 timesteps); the
caller casts the latents (:class:`InDtype`). The time embedding and projection are separate units kept in
float32 (DESIGN: time embedding and modulation in float32).

Seeds: every random draw of a training step comes from a generator seeded by :func:`seed_for` of
``(seed, step, micro-batch index, stream)``, so a run is reproducible, a resumed run continues exactly where
an uninterrupted one would, and the global batch does not depend on how it is split over ranks.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .log import get_logger

__all__ = [
    "DistContext",
    "InDtype",
    "init_distributed",
    "shutdown_distributed",
    "shard_streamdit",
    "shard_text_encoder",
    "enable_activation_checkpointing",
    "compile_blocks",
    "full_state_dict",
    "seed_for",
    "set_gradient_sync",
]

log = get_logger("distributed")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run. ``mesh`` is the 1-D device mesh over all ranks (FSDP shards over it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs, writes logs and full-weight files, and renders samples."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """Join (or create) the process group and return this rank's context.

    Args:
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available). Under ``torchrun`` a CUDA rank uses
            ``cuda:LOCAL_RANK``; a single process honours an explicit index (``"cuda:1"``).
    Backends: ``gloo`` on CPU; ``cpu:gloo,cuda:nccl`` on CUDA (NCCL for FSDP, gloo for checkpoint planning).
    An existing process group (a test harness, a caller's own ``init_process_group``) is reused.
    """
    requested = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() if requested is None else requested.type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for CUDA, but torch.cuda.is_available() is False")
    if requested is not None and requested.type not in ("cpu", "cuda"):
        raise ValueError(f"training runs on 'cpu' or 'cuda', got device {device!r}")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    else:
        rank, world, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if use_cuda:
        index = requested.index if requested is not None and requested.index is not None and world == 1 else None
        dev = torch.device("cuda", index if index is not None else local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        if world > 1 or "MASTER_ADDR" in os.environ:  # torchrun (env:// rendezvous)
            dist.init_process_group(backend, device_id=dev if use_cuda else None)
        else:  # a plain single process: a group of one on an in-process store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(dev.type, (world,))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, mesh=mesh)


def shutdown_distributed() -> None:
    """Destroy the default process group (the CLI commands call this when they finish)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_for(seed: int, step: int, index: int, stream: int) -> int:
    """A 63-bit generator seed for one kind of draw (``stream``) of micro-batch ``index`` at ``step``.

    Pure and collision-resistant (SHA-256 of the four integers); independent of the world size, so micro-batch
    ``j`` of a step is the same whether it is drawn by rank ``j`` of a wide run or as the ``j``-th accumulated
    micro-batch of a narrow one.
    """
    digest = hashlib.sha256(f"streamdit/{seed}/{step}/{index}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------------------


def _policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    if param_dtype is None or param_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_streamdit(
    model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True
) -> None:
    """FSDP2 over a :class:`~streamdit_core.model.StreamDiT` in place: one unit per block, the time embedding and
    projection as float32 units, the rest (patch/text embedding, head) in the root unit.

    Parameters become ``DTensor`` shards (dim 0) on ``mesh``'s device; names and ``state_dict`` keys do not
    change. ``param_dtype``: the compute dtype of the blocks and the root (``None``/float32: no casting).
    """
    from .perf import PerfOptions

    # inference caches (text keys/values, layout tables) call block submodules outside the block's forward,
    # where FSDP has not gathered their parameters: a sharded model always runs the plain path
    model.set_perf(PerfOptions.level("plain"))  # type: ignore[operator]
    policy = _policy(param_dtype)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True)
    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for name in ("time_embedding", "time_projection"):
        fully_shard(getattr(model, name), mesh=mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def shard_text_encoder(text: nn.Module, mesh: DeviceMesh) -> None:
    """FSDP2 over the bundled :class:`~streamdit_core.text.TextEncoder`: one unit per layer plus the root.
    It stays float32 (it is small, and its embeddings feed every frame's cross-attention)."""
    for layer in text.layers:  # type: ignore[union-attr]
        fully_shard(layer, mesh=mesh)
    fully_shard(text, mesh=mesh)


def set_gradient_sync(modules: Iterable[nn.Module | None], sync: bool) -> None:
    """Turn the gradient reduce-scatter of FSDP modules on or off (off for all but the last accumulated
    micro-batch: gradients then accumulate unsharded, in float32, without communication)."""
    for module in modules:
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(sync)


def enable_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in backward instead of storing them (non-reentrant
    ``torch.utils.checkpoint``). Wraps the instance's ``forward``: parameter names and hooks are unchanged,
    so FSDP gathers a block's parameters again for the recomputation. Apply before :func:`compile_blocks`."""
    for block in blocks:
        forward = block.forward

        @functools.wraps(forward)
        def checkpointed(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def compile_blocks(blocks: Iterable[nn.Module]) -> list[Callable[..., Any]]:
    """``torch.compile`` each block's ``forward`` (the FSDP hooks around it stay eager; names unchanged).
    Returns the previous forwards so that a failed compilation can be undone with :func:`restore_forwards`."""
    previous = []
    for block in blocks:
        previous.append(block.forward)
        block.forward = torch.compile(block.forward)
    return previous


def restore_forwards(blocks: Iterable[nn.Module], forwards: list[Callable[..., Any]]) -> None:
    for block, forward in zip(blocks, forwards):
        block.forward = forward


class InDtype:
    """Call a velocity model with the latents cast to the compute dtype; σ and the context are passed as they
    are (the model casts the context to the latents' dtype and computes its time embedding in float32)."""

    def __init__(self, model: Callable[..., torch.Tensor], dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x ``[b, C, F, H, W]``, σ ``[b, F]``, context ``[b, (F,) Lt, text_dim]`` → velocity in compute dtype."""
        return self.model(x.to(self.dtype), sigma, context)


def full_state_dict(module: nn.Module, dist_ctx: DistContext) -> dict[str, torch.Tensor]:
    """The module's complete ``state_dict`` as CPU tensors on rank 0 (an empty dict on the other ranks).
    A collective: every rank must call it. Gathers one tensor at a time (``cpu_offload``)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if dist_ctx.is_main else {}


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
