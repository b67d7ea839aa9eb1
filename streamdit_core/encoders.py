"""Frozen encoders for fine-tuning Wan 2.1 into StreamDiT: the Wan VAE (a latent codec) and umT5 (a text embedder).

Neither needs ComfyUI. The implementations use library models, installed with the ``train`` extra
(``pip install 'comfyui-streamdit[train]'``): diffusers' ``AutoencoderKLWan`` and transformers'
``UMT5EncoderModel``. Nothing is downloaded: every file is a local path the user gives, and transformers is
always called with ``local_files_only=True``. Only safetensors are read (never a pickle).

Interfaces (tests use tiny random models through the same ones):

* :class:`LatentEncoder`: the :class:`~streamdit_core.codec.Codec` protocol plus a ``fingerprint``.
  ``encode(frames [F, 3, H, W] in [0, 1]) → [1, C, F', H/s, W/s]`` *normalised* latents (Wan's per-channel
  ``(z − mean) / std`` with :data:`~streamdit_core.codec.WAN21_MEAN` / ``WAN21_STD``, through
  :func:`~streamdit_core.codec.wan21_codec`: the space the Wan DiT sees and the one ComfyUI's StreamDiT Decode
  node denormalises from), ``F' = 1 + (F − 1) / temporal_factor``.
* :class:`TextEmbedder`: ``embed(texts) → [[L_i, dim]]``, one float32 tensor per text holding its real tokens
  (end token included, padding removed). The DiT's context is that, zero-padded to ``text_len`` rows: Wan pads
  umT5's output with zeros, and so does ComfyUI (``zero_out_masked``).
* ``fingerprint``: a short string that changes when the weights or settings change; caches are keyed by it. For
  files it is computed without loading them (:func:`file_fingerprint`), so a fully cached data set never loads
  the encoders at all.

Accepted files:

* Wan VAE: the original Wan 2.1 VAE key layout (ComfyUI's ``models/vae/wan_2.1_vae.safetensors``, Wan's
  ``Wan2.1_VAE`` converted to safetensors), converted with diffusers' own key mapping; or a diffusers folder
  (``config.json`` + weights, e.g. the ``vae/`` folder of a ``Wan2.1-T2V-1.3B-Diffusers`` snapshot).
* umT5: a transformers folder (``config.json`` + safetensors weights, e.g. that snapshot's ``text_encoder/``),
  with tokenizer files in the same folder or given separately (its ``tokenizer/``, or ``google/umt5-xxl``'s
  files); or a single safetensors file with transformers' key names (ComfyUI's
  ``models/text_encoders/umt5_xxl_fp16.safetensors``, bf16 or ``fp8_e4m3fn(_scaled)``), whose config is
  inferred from the tensor shapes and whose SentencePiece tokenizer is read from its ``spiece_model`` tensor
  (needs the ``sentencepiece`` package) unless a tokenizer folder is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from .codec import WAN21_MEAN, WAN21_STD, Codec, wan21_codec
from .log import get_logger

__all__ = [
    "LatentEncoder",
    "TextEmbedder",
    "Lazy",
    "file_fingerprint",
    "WanVAECodec",
    "UMT5Embedder",
    "load_wan_vae",
    "load_umt5",
    "wan_vae_fingerprint",
    "umt5_fingerprint",
    "clean_caption",
    "pad_embeddings",
]

log = get_logger("encoders")

_EXTRA_HINT = "install the training extra: pip install 'comfyui-streamdit[train]'"
_VAE_PREFIXES = ("first_stage_model.", "vae.", "model.")
_T = TypeVar("_T")


# ----------------------------------------------------------------------------------------------------------
# Interfaces
# ----------------------------------------------------------------------------------------------------------


class LatentEncoder(Codec, Protocol):
    """A frozen video codec whose latents the DiT is trained on (see the module docstring for shapes)."""

    fingerprint: str


class TextEmbedder(Protocol):
    """A frozen text encoder: ``embed(texts)`` → one ``[L_i, dim]`` float32 tensor per text (real tokens only)."""

    fingerprint: str
    dim: int
    text_len: int

    def embed(self, texts: list[str]) -> list[torch.Tensor]: ...


class Lazy(Generic[_T]):
    """An encoder that is loaded on first use: its ``fingerprint`` is known up front (for cache keys), the
    model is built by ``load()`` only if something actually has to be encoded."""

    def __init__(self, fingerprint: str, load: Callable[[], _T]) -> None:
        self.fingerprint = fingerprint
        self._load = load
        self._value: _T | None = None

    def get(self) -> _T:
        if self._value is None:
            self._value = self._load()
        return self._value

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def release(self) -> None:
        """Drop the model (frees its memory before training starts)."""
        self._value = None


def clean_caption(text: str) -> str:
    """Wan's caption clean-up (``whitespace_clean``): runs of white space become one space, ends are stripped."""
    return re.sub(r"\s+", " ", text).strip()


def pad_embeddings(embeddings: Iterable[torch.Tensor], text_len: int) -> torch.Tensor:
    """Stack ``[L_i, D]`` embeddings zero-padded to ``[n, text_len, D]`` (longer ones are an error)."""
    items = list(embeddings)
    dim = items[0].shape[-1]
    out = torch.zeros(len(items), text_len, dim, dtype=torch.float32, device=items[0].device)
    for i, e in enumerate(items):
        if e.shape[0] > text_len:
            raise ValueError(f"text embedding has {e.shape[0]} tokens, more than the model's text_len={text_len}")
        out[i, : e.shape[0]] = e.float()
    return out


# ----------------------------------------------------------------------------------------------------------
# Fingerprints (cheap: the header and the ends of each file, never the whole multi-GB file)
# ----------------------------------------------------------------------------------------------------------

_SAMPLE = 1 << 20


def file_fingerprint(path: str | os.PathLike[str], extra: dict[str, object] | None = None) -> str:
    """A 16-hex-digit fingerprint of a weights file or folder and the settings in ``extra``.

    Per file it hashes the name, the size, a safetensors header (tensor names, dtypes, shapes, offsets) and the
    first and last MiB of the data, so it costs milliseconds even for a 10 GB file. A folder hashes its
    ``*.json``, ``*.model``, ``*.txt`` and ``*.safetensors`` files. Weights edited in place without changing
    size or either end would go unnoticed: delete the cache folder after such an edit.
    """
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".json", ".model", ".txt", ".safetensors"))
    if not p.is_dir():
        files = [p]
    if not files:
        raise FileNotFoundError(f"no weights found at {p}")
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            head = fh.read(_SAMPLE)
            h.update(head)
            if f.suffix == ".safetensors" and len(head) >= 8:
                (n,) = struct.unpack("<Q", head[:8])
                fh.seek(8)
                h.update(fh.read(min(n, 64 << 20)))
            if size > 2 * _SAMPLE:
                fh.seek(size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def wan_vae_fingerprint(path: str | os.PathLike[str]) -> str:
    """The fingerprint :func:`load_wan_vae` gives the codec, without loading it."""
    return file_fingerprint(path, {"vae": "wan2.1"})


def umt5_fingerprint(
    path: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None, text_len: int = 512
) -> str:
    """The fingerprint :func:`load_umt5` gives the embedder, without loading it."""
    tok = "" if tokenizer is None else file_fingerprint(tokenizer)
    return file_fingerprint(path, {"text": "umt5", "text_len": text_len, "tokenizer": tok})


def _import(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs the '{module.split('.')[0]}' package: {_EXTRA_HINT}") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ----------------------------------------------------------------------------------------------------------
# Wan VAE (diffusers AutoencoderKLWan)
# ----------------------------------------------------------------------------------------------------------


class WanVAECodec:
    """The Wan 2.1 VAE as a :class:`LatentEncoder`: 8× spatial and 4× causal temporal compression, 16 channels.

    Latents are normalised as :func:`~streamdit_core.codec.wan21_codec` does (``WAN21_MEAN`` / ``WAN21_STD``,
    the space a ``streamdit.codec = "wan2.1"`` checkpoint works in and ComfyUI's StreamDiT Decode node
    denormalises from); a VAE whose config gives other ``latents_mean`` / ``latents_std`` is refused. Encoding
    takes the posterior mean (as Wan and ComfyUI do), so it is deterministic.
    """

    def __init__(self, vae: Any, fingerprint: str, device: str | torch.device = "cpu") -> None:
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.fingerprint = fingerprint
        cfg = vae.config
        self.latent_space = wan21_codec()
        self.latent_channels = int(cfg.z_dim)
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", None) or 8)
        self.temporal_factor = int(getattr(cfg, "scale_factor_temporal", None) or 4)
        if self.latent_channels != self.latent_space.latent_channels:
            raise ValueError(f"only the Wan 2.1 VAE (16 latent channels) is supported, z_dim is {self.latent_channels}")
        for name, ours in (("latents_mean", WAN21_MEAN), ("latents_std", WAN21_STD)):
            theirs = getattr(cfg, name, None)
            if theirs is not None and not torch.allclose(torch.tensor(theirs).float(), torch.tensor(ours), atol=1e-4):
                raise ValueError(
                    f"the VAE's {name} {list(theirs)[:3]}… differs from Wan 2.1's {list(ours)[:3]}…: not a Wan 2.1 "
                    "VAE (its latents would not match what the StreamDiT Decode node expects)"
                )

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``[F, 3, H, W]`` in [0, 1] (``F = 1 + 4k``; H, W multiples of 8) → ``[1, 16, 1 + k, H/8, W/8]`` float32."""
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [F, 3, H, W], got {list(frames.shape)}")
        F, _, H, W = frames.shape
        if (F - 1) % self.temporal_factor:
            raise ValueError(f"the Wan VAE encodes 1 + {self.temporal_factor}·k frames, got {F}")
        if H % self.spatial_factor or W % self.spatial_factor:
            raise ValueError(f"frame size {H}x{W} must be a multiple of {self.spatial_factor}")
        x = (frames.float() * 2.0 - 1.0).permute(1, 0, 2, 3).unsqueeze(0)  # [1, 3, F, H, W] in [−1, 1]
        z = self.vae.encode(x.to(self.device, self.dtype)).latent_dist.mode().float().cpu()  # [1, C, F', h, w]
        return self.latent_space.normalise(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[1, 16, F', h, w]`` normalised latents → ``[F, 3, H, W]`` in [0, 1] (one whole-clip decode)."""
        z = self.latent_space.denormalise(latents.float().cpu())
        x = self.vae.decode(z.to(self.device, self.dtype)).sample.float().cpu()  # [1, 3, F, H, W]
        return ((x[0].permute(1, 0, 2, 3) + 1.0) * 0.5).clamp(0.0, 1.0)


def _strip_vae_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _VAE_PREFIXES:
        if f"{prefix}encoder.conv1.weight" in state:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def wan_vae_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``AutoencoderKLWan`` keyword arguments from the shapes of an original-layout Wan 2.1 VAE state dict.

    Only the widths vary (``base_dim`` from ``encoder.conv1``, ``z_dim`` from ``conv2``); the block structure is
    Wan 2.1's (diffusers' key mapping assumes it). The latent normalisation is Wan 2.1's, so ``z_dim`` must be 16.
    """
    for key in ("encoder.conv1.weight", "conv2.weight", "decoder.conv1.weight"):
        if key not in state:
            raise ValueError(
                f"not a Wan 2.1 VAE in the original key layout: no {key!r} "
                f"(first keys: {sorted(state)[:5]})"
            )
    z_dim = int(state["conv2.weight"].shape[0])
    if z_dim != 16:
        raise ValueError(f"only the Wan 2.1 VAE (16 latent channels) is supported, this one has {z_dim}")
    return {"base_dim": int(state["encoder.conv1.weight"].shape[0]), "z_dim": z_dim}


def load_wan_vae(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WanVAECodec:
    """Load a Wan 2.1 VAE from an original-layout safetensors file or a diffusers folder (no downloads).

    Raises:
        FileNotFoundError: no such file. ValueError: not a Wan 2.1 VAE; unknown or missing keys are listed.
        ImportError: diffusers is not installed (the message says how to install it).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"VAE not found: {p} (give the Wan 2.1 VAE, e.g. models/vae/wan_2.1_vae.safetensors)")
    diffusers = _import("diffusers", "the Wan VAE")
    fingerprint = wan_vae_fingerprint(p)
    if p.is_dir():
        vae = diffusers.AutoencoderKLWan.from_pretrained(str(p), local_files_only=True)
        return WanVAECodec(vae.to(dtype), fingerprint, device)
    if p.suffix != ".safetensors":
        raise ValueError(f"{p}: only .safetensors VAE files are read (never pickles)")
    convert = _import("diffusers.loaders.single_file_utils", "the Wan VAE").convert_wan_vae_to_diffusers
    state, _ = _read_safetensors(p)
    state = _strip_vae_prefix(state)
    vae = diffusers.AutoencoderKLWan(**wan_vae_config(state))
    converted = convert(state)
    expected = vae.state_dict()
    missing, unexpected = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{p} is not a Wan 2.1 VAE of the expected layout: missing {missing[:10]} ({len(missing)}), "
            f"unexpected {unexpected[:10]} ({len(unexpected)}), wrong shapes {wrong[:10]}"
        )
    vae.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return WanVAECodec(vae.to(dtype), fingerprint, device)


# ----------------------------------------------------------------------------------------------------------
# umT5 (transformers UMT5EncoderModel)
# ----------------------------------------------------------------------------------------------------------

Tokenize = Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]
"""``(texts, text_len) → (ids [n, text_len] int64, mask [n, text_len] int64)``, end token appended, truncated."""


def hf_tokenize(tokenizer: Any) -> Tokenize:
    """A transformers tokenizer (T5's adds the end token ``</s>``) as a :data:`Tokenize` function."""

    def tokenize(texts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_ids"].long(), out["attention_mask"].long()

    return tokenize


def sentencepiece_tokenize(model_proto: bytes, eos_id: int = 1, pad_id: int = 0) -> Tokenize:
    """A SentencePiece model (e.g. the ``spiece_model`` tensor of ComfyUI's umT5 file) as a :data:`Tokenize`
    function with umT5's conventions: no start token, ``</s>`` (id 1) at the end, ``<pad>`` (id 0) after it."""
    spm = _import("sentencepiece", "reading the tokenizer stored in a umT5 file")
    processor = spm.SentencePieceProcessor(model_proto=model_proto)

    def tokenize(texts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), text_len), pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), text_len, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = list(processor.encode(text))[: text_len - 1] + [eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask

    return tokenize


class UMT5Embedder:
    """umT5 as a :class:`TextEmbedder`: Wan's text path (clean → tokenize to ``text_len`` with the end token →
    encoder → keep the real tokens)."""

    def __init__(
        self,
        model: Any,
        tokenize: Tokenize,
        fingerprint: str,
        text_len: int = 512,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
    ) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenize, self.fingerprint, self.text_len, self.batch_size = tokenize, fingerprint, text_len, batch_size
        self.dim = int(model.config.d_model)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> list[torch.Tensor]:
        """One ``[L_i, dim]`` float32 CPU tensor per text (``L_i``: its tokens with ``</s>``, at most ``text_len``)."""
        device = next(self.model.parameters()).device
        out: list[torch.Tensor] = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenize([clean_caption(t) for t in texts[i : i + self.batch_size]], self.text_len)
            hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            for h, n in zip(hidden.float().cpu(), mask.sum(dim=1).tolist()):
                out.append(h[:n].clone())
        return out


def umt5_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``UMT5Config`` keyword arguments from the tensor shapes of an encoder state dict (transformers key names)."""
    attn, ffn = "encoder.block.0.layer.0.SelfAttention.", "encoder.block.0.layer.1.DenseReluDense."
    missing = [k for k in ("shared.weight", attn + "q.weight", ffn + "wo.weight") if k not in state]
    if missing:
        raise ValueError(
            f"not a umT5 encoder with transformers key names: missing {missing} (first keys: {sorted(state)[:5]})"
        )
    vocab, d_model = state["shared.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
    rel = state[attn + "relative_attention_bias.weight"]  # [buckets, heads]
    inner = state[attn + "q.weight"].shape[0]
    gated = ffn + "wi_0.weight" in state
    ff = state[ffn + ("wi_0.weight" if gated else "wi.weight")]
    return {
        "vocab_size": int(vocab),
        "d_model": int(d_model),
        "d_kv": int(inner // rel.shape[1]),
        "d_ff": int(ff.shape[0]),
        "num_layers": int(layers),
        "num_heads": int(rel.shape[1]),
        "relative_attention_num_buckets": int(rel.shape[0]),
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "tie_word_embeddings": False,
    }


def _dequantize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo ComfyUI's "scaled fp8" storage (``W = W_fp8 · scale_weight``) and drop its marker tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("scaled_fp8", "spiece_model") or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = state.get(key[: -len(".weight")] + ".scale_weight") if key.endswith(".weight") else None
        value = value.to(torch.float32)
        out[key] = value * scale.to(torch.float32) if scale is not None else value
    return out


def _tokenizer_files(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))


def load_umt5(
    path: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    text_len: int = 512,
) -> UMT5Embedder:
    """Load umT5 from a transformers folder or a single safetensors file, and its tokenizer (see the module
    docstring). Nothing is downloaded.

    Raises:
        FileNotFoundError: no such path. ValueError: not a umT5 encoder, or no tokenizer can be found (the
        message says which files to point ``tokenizer`` at). ImportError: transformers is not installed.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"text encoder not found: {p}")
    transformers = _import("transformers", "the umT5 text encoder")
    tok_dir = Path(tokenizer) if tokenizer is not None else None
    fingerprint = umt5_fingerprint(p, tok_dir, text_len)
    tokenize: Tokenize | None = None
    if p.is_dir():
        model = transformers.UMT5EncoderModel.from_pretrained(str(p), local_files_only=True)
        if tok_dir is None and _tokenizer_files(p):
            tok_dir = p
    else:
        if p.suffix != ".safetensors":
            raise ValueError(f"{p}: only .safetensors text-encoder files are read (never pickles)")
        state, _ = _read_safetensors(p)
        for prefix in ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "transformer."):
            if f"{prefix}shared.weight" in state:
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) or k == "spiece_model"}
        spiece = state.get("spiece_model")
        model = transformers.UMT5EncoderModel(transformers.UMT5Config(**umt5_config(state)))
        weights = {k: v for k, v in _dequantize(state).items() if not k.startswith("decoder.")}
        weights.setdefault("encoder.embed_tokens.weight", weights["shared.weight"])
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{p} does not match the umT5 encoder layout: missing {missing[:10]} ({len(missing)}), "
                f"unexpected {unexpected[:10]} ({len(unexpected)})"
            )
        model.load_state_dict(weights, strict=True)
        if tok_dir is None and spiece is not None:
            tokenize = sentencepiece_tokenize(spiece.numpy().tobytes())
    if tokenize is None:
        if tok_dir is None:
            raise ValueError(
                f"no tokenizer for {p}: pass a tokenizer folder (the umT5 tokenizer files tokenizer.json / "
                "spiece.model + tokenizer_config.json, e.g. the 'tokenizer' folder of a Wan2.1 diffusers snapshot)"
            )
        tokenize = hf_tokenize(transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True))
    return UMT5Embedder(model.to(dtype), tokenize, fingerprint, text_len=text_len, device=device)

