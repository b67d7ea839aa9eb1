"""Wan 2.1 text-to-video checkpoints in the StreamDiT backbone.

Wan's parameter names are the backbone's own (see :mod:`streamdit_core.model`), so loading is a key-for-key
copy after stripping an optional ``model.diffusion_model.`` prefix (ComfyUI's repackaged files). The
config is inferred from tensor shapes (the head count from Wan's head size of 128). Tensors stored in
float32, float16, bfloat16 or float8 (e4m3fn / e5m2) are upcast to the requested dtype. Unknown or missing
keys are an error that lists them (e.g. an image-to-video file's ``img_emb``). Safetensors only: never
unpickles.

Layouts (checked in tests): 1.3B — 825 tensors, 1.42 B parameters; 14B — 1,095 tensors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .checkpoint import CheckpointError, shard_paths
from .config import ModelConfig
from .model import StreamDiT

__all__ = ["WAN_PREFIXES", "WAN_HEAD_DIM", "strip_prefix", "infer_wan_config", "load_wan", "is_wan_checkpoint"]

WAN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
WAN_HEAD_DIM = 128
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def strip_prefix(keys: list[str]) -> tuple[str, dict[str, str]]:
    """Find the prefix shared by Wan keys (``patch_embedding.weight`` marks the root); returns
    ``(prefix, {stripped: original})``."""
    prefix = ""
    for candidate in WAN_PREFIXES:
        if f"{candidate}patch_embedding.weight" in keys:
            prefix = candidate
            break
    return prefix, {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}


def _shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shard_paths(path):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def infer_wan_config(shapes: dict[str, tuple[int, ...]], text_len: int = 512) -> ModelConfig:
    """A :class:`ModelConfig` from the (prefix-stripped) tensor shapes of a Wan 2.1 T2V checkpoint.

    Raises:
        CheckpointError: a key needed for the inference is missing, or the shapes are inconsistent.
    """
    needed = (
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
        "head.head.weight",
        "blocks.0.ffn.0.weight",
    )
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise CheckpointError(f"not a Wan 2.1 text-to-video checkpoint: missing {missing}")
    dim, in_dim, pf, ph, pw = shapes["patch_embedding.weight"]
    patch = pf * ph * pw
    out_total = shapes["head.head.weight"][0]
    if out_total % patch or dim % WAN_HEAD_DIM:
        raise CheckpointError(f"inconsistent Wan shapes: head {out_total} vs patch {patch}, dim {dim}")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK.match(k)))
    return ModelConfig(
        in_dim=in_dim,
        out_dim=out_total // patch,
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_heads=dim // WAN_HEAD_DIM,
        num_layers=layers,
        patch_size=(pf, ph, pw),
        text_dim=shapes["text_embedding.0.weight"][1],
        text_len=text_len,
        freq_dim=shapes["time_embedding.0.weight"][1],
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
    )


def is_wan_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a safetensors file whose keys look like Wan's (with or without a prefix)."""
    try:
        prefix, keys = strip_prefix(list(_shapes(path)))
    except (FileNotFoundError, OSError, ValueError):
        return False
    return "patch_embedding.weight" in keys and "head.head.weight" in keys


@dataclass
class LoadedWan:
    model: StreamDiT
    prefix: str
    stored_dtypes: tuple[str, ...]


def load_wan(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: ModelConfig | None = None,
) -> LoadedWan:
    """Load a Wan 2.1 T2V checkpoint into a :class:`StreamDiT` (config inferred unless given).

    Raises:
        CheckpointError: keys that do not belong to the inferred layout, or missing ones (both listed).
    """
    shapes = _shapes(path)
    prefix, keys = strip_prefix(list(shapes))
    stripped = {k: shapes[v] for k, v in keys.items()}
    cfg = config or infer_wan_config(stripped)
    with torch.device("meta"):
        skeleton = StreamDiT(cfg)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    unexpected = sorted(set(stripped) - set(expected)) + sorted(k for k in shapes if not k.startswith(prefix))
    missing = sorted(set(expected) - set(stripped))
    wrong = sorted(k for k in set(expected) & set(stripped) if expected[k] != stripped[k])
    if unexpected or missing or wrong:
        parts = []
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:20]} ({len(unexpected)} in all; image-to-video and other "
                "variants are not supported)"
            )
        if missing:
            parts.append(f"missing keys {missing[:20]} ({len(missing)} in all)")
        if wrong:
            parts.append("wrong shapes " + ", ".join(f"{k}: {stripped[k]} vs {expected[k]}" for k in wrong[:10]))
        raise CheckpointError(
            f"{path} is not a Wan 2.1 text-to-video checkpoint of the inferred layout: " + "; ".join(parts)
        )
    model = StreamDiT(cfg).to(dtype)
    state: dict[str, torch.Tensor] = {}
    stored: set[str] = set()
    for shard in shard_paths(path):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if not key.startswith(prefix):
                    continue
                tensor = f.get_tensor(key)
                stored.add(str(tensor.dtype).removeprefix("torch."))
                state[key[len(prefix) :]] = tensor.to(torch.float32).to(dtype)  # fp8 has no direct casts to all
    model.load_state_dict(state, strict=True)
    return LoadedWan(model=model.to(device).eval(), prefix=prefix, stored_dtypes=tuple(sorted(stored)))
