"""The bundled model's text encoder: a word-level tokenizer over a fixed vocabulary and a small transformer.

Captions of the bundled model's procedural world use a closed vocabulary; words outside it map to the
``<unk>`` token (logged once per word), never to an error. Output: ``[n_prompts, text_len, text_dim]``
embeddings, padded to ``text_len`` tokens (padding tokens are embedded like any other token, as Wan's
zero-padded umT5 context is; no mask is needed downstream).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .log import get_logger

__all__ = ["TextEncoderConfig", "WordTokenizer", "TextEncoder"]

log = get_logger("text")

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Attributes:
    vocabulary: the known words (``<pad>`` and ``<unk>`` are added in front).
    text_len: tokens per prompt (longer prompts are truncated with a warning).
    dim: embedding width (= the DiT's ``text_dim``).
    num_layers, num_heads: transformer size.
    """

    vocabulary: tuple[str, ...] = ()
    text_len: int = 24
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))
        if self.text_len < 1 or self.dim < 1 or self.num_layers < 0 or self.num_heads < 1:
            raise ValueError(f"invalid TextEncoderConfig sizes: {self}")
        if self.dim % self.num_heads:
            raise ValueError(f"TextEncoderConfig.dim={self.dim} must be divisible by num_heads={self.num_heads}")
        bad = [w for w in self.vocabulary if not _WORD.fullmatch(w)]
        if bad:
            raise ValueError(f"vocabulary words must be lower-case letters only, got {bad[:5]}")
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError("vocabulary has duplicate words")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TextEncoderConfig:
        return cls(**json.loads(text))


@dataclass
class WordTokenizer:
    """Lower-cases, splits on anything that is not a letter, maps words to ids; unknown words → ``<unk>``."""

    vocabulary: tuple[str, ...]
    text_len: int
    _ids: dict[str, int] = field(init=False, repr=False)
    _warned: set[str] = field(init=False, repr=False, default_factory=set)

    def __post_init__(self) -> None:
        self._ids = {word: i for i, word in enumerate((PAD, UNK) + tuple(self.vocabulary))}

    def words(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``[len(texts), text_len]`` (int64), padded with ``<pad>`` = 0."""
        out = torch.zeros(len(texts), self.text_len, dtype=torch.long)
        for row, text in enumerate(texts):
            words = self.words(text)
            unknown = sorted({w for w in words if w not in self._ids} - self._warned)
            if unknown:
                log.warning("words not in the bundled text encoder's vocabulary (read as <unk>): %s", unknown)
                self._warned.update(unknown)
            if len(words) > self.text_len:
                log.warning("prompt has %d words; only the first %d are used: %r", len(words), self.text_len, text)
            ids = [self._ids.get(w, 1) for w in words[: self.text_len]]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class TextEncoder(nn.Module):
    """Token embedding + learned positions + a small pre-norm transformer encoder.

    ``forward(ids [n, text_len]) -> [n, text_len, dim]``; :meth:`encode` takes strings.
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = WordTokenizer(config.vocabulary, config.text_len)
        self.token_embedding = nn.Embedding(len(config.vocabulary) + 2, config.dim)
        self.position_embedding = nn.Parameter(torch.zeros(config.text_len, config.dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.dim,
                config.num_heads,
                4 * config.dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding  # [n, Lt, dim]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Strings → embeddings ``[len(texts), text_len, dim]`` on the module's device."""
        ids = self.tokenizer(texts).to(self.token_embedding.weight.device)
        return self(ids)
