"""Checkpoints: safetensors files with the configs in the file's metadata. Loading never unpickles.

A StreamDiT file holds the backbone's tensors under Wan 2.1's key names (no prefix) and, for the bundled
model, the text encoder's tensors under ``text_encoder.``. Metadata keys: ``streamdit.format`` (version),
``streamdit.model_config`` (JSON), ``streamdit.text_encoder_config`` (JSON, optional),
``streamdit.codec`` (``pixel`` or the name of an external codec), ``streamdit.defaults`` (JSON stream
settings the model was trained/distilled for), plus free-form ``streamdit.*`` entries (e.g. the model card).
Large models may be split into shards ``name-00001-of-00003.safetensors``; pass any shard or the stem.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import StreamDiT
from .text import TextEncoder, TextEncoderConfig

__all__ = ["CheckpointError", "LoadedCheckpoint", "save_checkpoint", "load_checkpoint", "read_metadata", "shard_paths"]

FORMAT_VERSION = "1"
TEXT_PREFIX = "text_encoder."
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint file that does not match what it claims to be."""


@dataclass
class LoadedCheckpoint:
    model: StreamDiT
    text_encoder: TextEncoder | None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def codec(self) -> str:
        return self.metadata.get("streamdit.codec", "pixel")

    @property
    def defaults(self) -> dict[str, object]:
        return dict(json.loads(self.metadata.get("streamdit.defaults", "{}")))


def shard_paths(path: str | os.PathLike[str]) -> list[Path]:
    """All files of a (possibly sharded) checkpoint, in order."""
    p = Path(path)
    match = _SHARD.match(p.name)
    if match:
        stem, n = match["stem"], int(match["n"])
        return [p.with_name(f"{stem}-{i:05d}-of-{n:05d}.safetensors") for i in range(1, n + 1)]
    if p.exists():
        return [p]
    base = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    shards = sorted(p.parent.glob(f"{base}-*-of-*.safetensors"))
    if shards:
        return shard_paths(shards[0])
    raise FileNotFoundError(f"checkpoint not found: {p}")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: StreamDiT,
    text_encoder: TextEncoder | None = None,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Write the model (and text encoder) with configs in metadata; returns the files written.

    ``dtype`` casts floating tensors (e.g. ``torch.float16`` to ship small files); ``max_shard_bytes`` splits
    the tensors over several files (each written atomically).
    """
    meta = {"streamdit.format": FORMAT_VERSION, "streamdit.model_config": model.config.to_json()}
    meta.setdefault("streamdit.codec", "pixel")
    if text_encoder is not None:
        meta["streamdit.text_encoder_config"] = text_encoder.config.to_json()
    meta.update(metadata or {})
    tensors = {k: v for k, v in model.state_dict().items()}
    if text_encoder is not None:
        tensors.update({TEXT_PREFIX + k: v for k, v in text_encoder.state_dict().items()})
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in tensors.items()
    }
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = tensors[key]
        size += nbytes
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    names = (
        [p]
        if len(groups) == 1
        else [p.with_name(f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors") for i in range(len(groups))]
    )
    for name, group in zip(names, groups):
        tmp = name.with_name(name.name + ".tmp")
        save_file(group, str(tmp), metadata=meta)
        os.replace(tmp, name)
    return names


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    with safe_open(str(shard_paths(path)[0]), framework="pt") as f:
        return dict(f.metadata() or {})


def _read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in shard_paths(path):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, path: object) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:20]}{' …' if len(missing) > 20 else ''} ({len(missing)} in all)")
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:20]}{' …' if len(unexpected) > 20 else ''} ({len(unexpected)} in all)"
            )
        if wrong:
            parts.append(
                "wrong shapes "
                + ", ".join(
                    f"{k}: file {list(tensors[k].shape)} vs model {list(expected[k].shape)}" for k in wrong[:10]
                )
            )
        raise CheckpointError(f"{what} in {path} does not match its config: " + "; ".join(parts))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a StreamDiT safetensors checkpoint written by :func:`save_checkpoint` (weights kept in float32).

    Raises:
        CheckpointError: no StreamDiT metadata, or keys/shapes that do not match the stored config (listed).
    """
    meta = read_metadata(path)
    if "streamdit.model_config" not in meta:
        raise CheckpointError(
            f"{path} has no 'streamdit.model_config' metadata: it is not a StreamDiT checkpoint "
            "(Wan 2.1 files load with streamdit_core.wan.load_wan)"
        )
    tensors = _read_tensors(path)
    model = StreamDiT(ModelConfig.from_json(meta["streamdit.model_config"]))
    text_encoder = None
    text_tensors = {k[len(TEXT_PREFIX) :]: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
    if "streamdit.text_encoder_config" in meta:
        text_encoder = TextEncoder(TextEncoderConfig.from_json(meta["streamdit.text_encoder_config"]))
        _load_strict(text_encoder, text_tensors, "text encoder", path)
    elif text_tensors:
        raise CheckpointError(f"{path} has text_encoder.* tensors but no 'streamdit.text_encoder_config' metadata")
    _load_strict(model, {k: v for k, v in tensors.items() if not k.startswith(TEXT_PREFIX)}, "model", path)
    model.to(device).eval()
    if text_encoder is not None:
        text_encoder.to(device).eval()
    return LoadedCheckpoint(model=model, text_encoder=text_encoder, metadata=meta)
