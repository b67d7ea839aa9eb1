"""Small models and inputs shared by the fused-kernel tests (``test_fused_quant.py``, ``test_fused_norm.py``,
``test_fused_rope.py``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from streamdit_core.config import ModelConfig, preset
from streamdit_core.model import LayerNorm, StreamDiT
from streamdit_core.perf import PerfOptions


def tiny_model(dtype: torch.dtype = torch.float32, **config: Any) -> StreamDiT:
    """``test-tiny`` with 2×2×2-token windows, a random head (the zero head would make every output 0), and the
    parameters the fused kernels apply away from 1 and 0: the cross-attention norm's affine parameters, the
    self-attention's q/k norm weights and projection biases."""
    torch.manual_seed(0)
    model = StreamDiT(preset("test-tiny").with_(window=(2, 2, 2), **config)).eval()
    nn.init.normal_(model.head.head.weight, std=0.1)
    block: Any
    for block in model.blocks:
        if isinstance(block.norm3, LayerNorm):
            nn.init.normal_(block.norm3.weight, 1.0, 0.2)
            nn.init.normal_(block.norm3.bias, 0.0, 0.2)
        for name, p in block.self_attn.named_parameters():
            if name.startswith("norm_"):
                nn.init.normal_(p, 1.0, 0.3)
            elif name.endswith("bias"):
                nn.init.normal_(p, 0.0, 0.3)
    return model.to(dtype)


def tiny_inputs(cfg: ModelConfig, dtype: torch.dtype = torch.float32, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """Latents ``[batch, C, 4, 8, 8]`` (a 4×4×4 token grid), per-frame σ ``[batch, 4]`` and a context."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_dim, 4, 8, 8, generator=g).to(dtype)
    sigma = torch.rand(batch, 4, generator=g)
    return x, sigma, torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)


def run(model: StreamDiT, options: PerfOptions, *args: Any) -> torch.Tensor:
    """``model(*args)`` under ``options``, without autograd."""
    model.set_perf(options)
    with torch.inference_mode():
        return model(*args)


def assert_compiled_and_graphed_equal(model: StreamDiT, options: PerfOptions, args: tuple[Any, ...],
                                      eager: torch.Tensor) -> None:
    """``model(*args)`` under ``options`` (``compile="default"`` with CUDA graphs) three times: compiled, then the
    call that captures the CUDA graph, then a replay. Asserts no graph break but the intended one around the cached
    cross-attention (``attend_runs``), one capture, and each output within 3 % (relative norm) of ``eager``, the
    float32 output of the same items without compile and graphs."""
    from torch._dynamo.utils import counters

    counters.clear()
    outs = [run(model, options, *args).float()]
    with torch.inference_mode():
        outs += [model(*args).float() for _ in range(2)]  # the second call captures, the third replays
    assert model.perf_status["compile"] == "default"
    assert all("attend_runs" in reason for reason in counters["graph_break"]), list(counters["graph_break"])
    assert model._graphs.error is None and model._graphs.captures == 1
    for out in outs:
        assert ((out - eager).norm() / eager.norm()).item() < 0.03


def wan_like_cuda() -> tuple[StreamDiT, tuple[torch.Tensor, ...]]:
    """A 2-block bf16 model of Wan's layout (head size 128, Wan's cross-attention norm) on CUDA and its inputs: a
    4×8×8 token grid in 2×4×4 windows."""
    cfg = preset("wan2.1-1.3b").with_(dim=256, ffn_dim=768, num_heads=2, num_layers=2, text_dim=32, text_len=8,
                                      freq_dim=32, window=(2, 4, 4))
    torch.manual_seed(0)
    model = StreamDiT(cfg).eval()
    nn.init.normal_(model.head.head.weight, std=0.1)
    model = model.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 4, 16, 16, generator=g).to("cuda", torch.bfloat16)
    sigma = torch.rand(1, 4, generator=g).cuda()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to("cuda", torch.bfloat16)
    return model, (x, sigma, ctx)
