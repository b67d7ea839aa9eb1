"""Tiny random Wan-layout stand-ins for tests without ComfyUI (and without real weights).

* :func:`write_tiny_wan` — a Wan 2.1 T2V checkpoint of the real key layout (head size 128, 16 latent channels,
  patch 1×2×2), saved with ComfyUI's ``model.diffusion_model.`` prefix in fp16.
* :class:`FakeWanVAE` — the parts of ComfyUI's ``VAE`` object the pack uses (``first_stage_model.conv2`` /
  ``.decoder``, ``encode``, ``decode``, ``device``, ``vae_dtype``, ``latent_channels``) over diffusers'
  ``AutoencoderKLWan`` (the same causal-cache design as ComfyUI's ``WanVAE``) with tiny random weights.
* :class:`FakeCLIP` and the stand-in nodes ``CLIPLoader``, ``CLIPTextEncode``, ``VAELoader`` for the executor:
  ``CONDITIONING`` like ComfyUI's umT5 (``[[tensor [1, L, D], {"pooled_output": None}]]``, zero rows past the
  prompt's tokens), deterministic per text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TEXT_DIM = 32
TEXT_LEN = 24


def tiny_wan_config() -> Any:
    from streamdit_core.config import ModelConfig

    return ModelConfig(in_dim=16, out_dim=16, dim=128, ffn_dim=256, num_heads=1, num_layers=2, patch_size=(1, 2, 2),
                       text_dim=TEXT_DIM, text_len=TEXT_LEN, freq_dim=64)


def write_tiny_wan(path: Path, seed: int = 0, prefix: str = "model.diffusion_model.") -> Path:
    from streamdit_core.model import StreamDiT

    torch.manual_seed(seed)  # parameter init only
    model = StreamDiT(tiny_wan_config())
    torch.nn.init.normal_(model.head.head.weight, std=0.05)  # a visible output (Wan's head starts at zero)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


class FakeWanVAE:
    """ComfyUI-``VAE``-like wrapper over diffusers' ``AutoencoderKLWan`` (tiny, random)."""

    def __init__(self, seed: int = 0) -> None:
        import diffusers

        torch.manual_seed(seed)  # parameter init only
        self.ae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1).eval()
        self.first_stage_model = torch.nn.Module()
        self.first_stage_model.conv2 = self.ae.post_quant_conv
        self.first_stage_model.decoder = self.ae.decoder
        self.device = torch.device("cpu")
        self.vae_dtype = torch.float32
        self.latent_channels = 16
        self.encoded = 0

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """IMAGE ``[F, H, W, 3]`` (one clip) → raw latents ``[1, 16, (F−1)//4+1, H/8, W/8]`` (the mean)."""
        self.encoded += 1
        x = image.permute(3, 0, 1, 2).unsqueeze(0) * 2 - 1
        with torch.no_grad():
            return self.ae.encode(x).latent_dist.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents → ``[1, T, H, W, 3]`` in 0..1, one decode of the whole video (the reference)."""
        with torch.no_grad():
            video = self.ae.decode(z).sample
        return ((video + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)


class FakeCLIP:
    def encode(self, text: str) -> list[list[Any]]:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        tokens = min(TEXT_LEN, 1 + len(text.split()))
        cond = torch.zeros(1, TEXT_LEN, TEXT_DIM)
        cond[0, :tokens] = torch.randn(tokens, TEXT_DIM, generator=g)
        return [[cond, {"pooled_output": None}]]


class CLIPLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"clip_name": ("STRING", {}), "type": ("STRING", {})},
                "optional": {"device": ("STRING", {})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    def load(self, clip_name: str, type: str, device: str = "default") -> tuple[FakeCLIP]:
        assert type == "wan", type
        return (FakeCLIP(),)


class CLIPTextEncode:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"text": ("STRING", {}), "clip": ("CLIP",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    def encode(self, text: str, clip: FakeCLIP) -> tuple[list[list[Any]]]:
        return (clip.encode(text),)


class VAELoader:
    vae = None

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"vae_name": ("STRING", {})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    def load(self, vae_name: str) -> tuple[FakeWanVAE]:
        if VAELoader.vae is None:
            VAELoader.vae = FakeWanVAE()
        return (VAELoader.vae,)


STOCK = {"CLIPLoader": CLIPLoader, "CLIPTextEncode": CLIPTextEncode, "VAELoader": VAELoader}
