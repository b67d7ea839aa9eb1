"""Equivalence with a reference Wan 2.1 implementation (diffusers' WanTransformer3DModel): with every frame at
the same σ and one window covering the whole buffer, the StreamDiT backbone computes the same function on
the same random weights. Skipped when diffusers is not installed (it is in the `test` extra)."""

import re

import pytest
import torch

from streamdit_core.config import ModelConfig
from streamdit_core.model import StreamDiT

diffusers = pytest.importorskip("diffusers")

_RENAMES = [
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_", r"blocks.\1.self_attn.norm_"),
    (r"^blocks\.(\d+)\.attn2\.norm_", r"blocks.\1.cross_attn.norm_"),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # diffusers' norm2 is Wan's cross-attention norm3
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]


def _to_wan_names(key: str) -> str:
    for pattern, repl in _RENAMES:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    return key


@pytest.mark.parametrize("frames,height,width", [(4, 8, 8), (3, 6, 10)])
def test_backbone_equals_diffusers_wan(frames, height, width):
    torch.manual_seed(0)
    heads, head_dim, dim = 2, 128, 256
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=256,
        ffn_dim=512,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    cfg = ModelConfig(
        in_dim=16,
        out_dim=16,
        dim=dim,
        ffn_dim=512,
        num_heads=heads,
        num_layers=2,
        patch_size=(1, 2, 2),
        text_dim=64,
        text_len=12,
        freq_dim=256,
    )
    ours = StreamDiT(cfg).eval()
    state = {_to_wan_names(k): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, frames, height, width, generator=g)
    context = torch.randn(1, 12, 64, generator=g)
    sigma = torch.tensor([0.37])
    with torch.no_grad():
        expected = ref(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=context, return_dict=False)[0]
        got = ours(x, sigma, context, window=None, attention_backend="math")
        got_windowed_whole = ours(x, sigma.expand(1, frames), context, window=(frames, height // 2, width // 2))
    assert expected.shape == got.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert torch.allclose(got_windowed_whole, expected, atol=1e-4, rtol=1e-4)
