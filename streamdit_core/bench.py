"""``python -m streamdit_core bench``: speed of one model call over the full buffer, per preset and mode.

For each case (a preset at a latent size with a streaming scheme) it measures, in one process:

* the **baseline**: the same model in plain eager PyTorch, full attention through plain SDPA, no speed-ups;
* each **mode** (a :data:`~streamdit_core.perf.PERF_LEVELS` name or an option list, with the case's window and
  the ``auto`` attention backend; ``plain`` uses plain SDPA): milliseconds per model call (median, CUDA events
  after warm-up), frames per second, speed-up over the baseline, achieved TFLOP/s, peak GPU memory, the
  first call's time (compilation) and the relative error of the output against the plain path with the same
  window (``‖out − ref‖ / ‖ref‖`` in float32);
* the **floors** (:func:`floors`): FLOPs over the matmul rate plus attention FLOPs over the attention rate,
  and bytes over the memory bandwidth — with the rates measured on this GPU in the same run
  (:func:`measure_rates`) and with nominal H100 rates;
* **time to first frame** through the real sampler, warm start (the paper's uniform T2V fill) and cold start;
* the **decoder's** cost per emitted chunk for latent models (the Wan 2.1 VAE from diffusers with random
  weights), the chunk decoded on its own and through the pack's streaming decode with the causal cache;
  ``skipped`` with the reason when diffusers is missing.

With ``--rounds R`` (default 1) the modes are timed in ``R`` interleaved rounds, because one configuration timed
twice in one process can differ by up to ~2 % at paper scale (docs/BENCHMARKS.md): round 1 is the measurement
above; rounds 2..R set each mode again and time it again (warm-up included), in alternating order (round 2
reversed, round 3 forward, …, :func:`round_order`) so that drift over the run cancels. Each mode then records
``round_ms`` (one timing per round, ``None`` for a round that failed, with the error in ``round_errors``), and
``ms_per_call`` with the speeds derived from it is the median over the rounds (:func:`median_ms`); the other fields
(first call, relative error, memory, status) are round 1's. The baseline is timed once, in round 1 only.

With ``--gpu-clocks`` (CUDA only) ``nvidia-smi`` samples the SM and memory clocks, power and temperature every
100 ms while the baseline and each mode are timed (the timed calls only, after warm-up and compilation;
:class:`~streamdit_core.gpu_clocks.ClockSampler`), and the entry records their summary as ``gpu_clocks``
(with ``--rounds``: round 1's, and ``round_gpu_clocks`` aligned with ``round_ms``); a small table follows the
main one. Sustained fp8 matmuls may draw enough power to lower the SM clock, which would slow everything else.

Results go to ``<out>/bench.json`` (merged with what is there, so one folder can collect several runs) and
``<out>/bench.md``; the JSON is rewritten after every measurement, so a crash or time-out keeps what was done.
A failing mode is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .attention import effective_window
from .causal_decode import DecoderState, ModuleStepDecoder, decode_chunk
from .cli import register_command
from .config import ModelConfig, preset
from .gpu_clocks import ClockSampler
from .log import get_logger
from .model import StreamDiT
from .perf import PERF_LEVELS, PerfOptions, quantize_fp8
from .schedule import Partition

log = get_logger("bench")


@dataclass(frozen=True)
class BenchCase:
    """A preset at a latent size with a streaming scheme.

    Attributes:
        latent: (channels, frames, height, width) of the buffer.
        window: self-attention window in tokens (``None`` = full attention).
        temporal_factor: video frames per latent frame (the autoencoder's; 1 for the pixel-space model).
        spatial_factor: pixels per latent pixel.
        decoder: ``None`` (pixel space), ``"wan-vae"`` (Wan 2.1 VAE at this size) or ``"wan-vae-proxy"`` (the
            paper's TAE is not public: the Wan 2.1 VAE at the same pixel size stands in for it).
    """

    name: str
    model: str
    latent: tuple[int, int, int, int]
    partition: Partition
    window: tuple[int, int, int] | None
    temporal_factor: int = 1
    spatial_factor: int = 1
    decoder: str | None = None


_STREAM = Partition(K=0, N=8, c=2, s=1)
CASES: dict[str, BenchCase] = {
    "bundled": BenchCase("bundled", "bundled", (3, 16, 64, 64), _STREAM, (8, 8, 8)),
    "paper-4b": BenchCase("paper-4b", "paper-4b", (8, 16, 64, 64), _STREAM, (16, 16, 16), 4, 8, "wan-vae-proxy"),
    # Wan 2.1 1.3B at 832×480: token grid 16 × 30 × 52. Full attention, and windows of half the buffer (8
    # frames) or a quarter (4 frames) × the whole frame, the bundled model's kind of window.
    "wan2.1-1.3b": BenchCase("wan2.1-1.3b", "wan2.1-1.3b", (16, 16, 60, 104), _STREAM, None, 4, 8, "wan-vae"),
    "wan2.1-1.3b-w8": BenchCase(
        "wan2.1-1.3b-w8", "wan2.1-1.3b", (16, 16, 60, 104), _STREAM, (8, 30, 52), 4, 8, "wan-vae"
    ),
    "wan2.1-1.3b-w4": BenchCase(
        "wan2.1-1.3b-w4", "wan2.1-1.3b", (16, 16, 60, 104), _STREAM, (4, 30, 52), 4, 8, "wan-vae"
    ),
}


# ----------------------------------------------------------------------------------------------------------
# FLOPs, bytes and floors
# ----------------------------------------------------------------------------------------------------------


def flop_parts(
    cfg: ModelConfig, latent: tuple[int, int, int, int], window: tuple[int, int, int] | None
) -> dict[str, float]:
    """FLOPs (2 × multiply-adds) of one forward pass (batch 1, per-frame text context of ``text_len`` tokens).

    With ``L`` tokens, ``F'`` token frames, ``Lt`` text tokens, ``w`` tokens per window, width ``d``:

    * ``linear``: per block ``2·L·(6d² + 2·d·ffn)`` — self-attention q/k/v/o, cross-attention q/o, FFN;
    * ``text_kv``: per block ``2·F'·Lt·2d²`` — cross-attention keys/values of every frame's prompt (computed
      once per prompt when ``text_kv_cache`` is on);
    * ``self_attention``: per block ``4·L·w·d`` (QKᵀ and PV); ``cross_attention``: per block ``4·L·Lt·d``;
    * ``edges``: patch embedding and head, ``2·L·d·C·prod(patch)`` each.
    """
    c, f, h, w = latent
    pf, ph, pw = cfg.patch_size
    grid = (f // pf, h // ph, w // pw)
    L = grid[0] * grid[1] * grid[2]
    win = effective_window(grid, window)
    wt = win[0] * win[1] * win[2]
    d, lt, n = cfg.dim, cfg.text_len, cfg.num_layers
    return {
        "linear": float(n * 2 * L * (6 * d * d + 2 * d * cfg.ffn_dim)),
        "text_kv": float(n * 2 * grid[0] * lt * 2 * d * d),
        "self_attention": float(n * 4 * L * wt * d),
        "cross_attention": float(n * 4 * L * lt * d),
        "edges": float(2 * L * d * c * pf * ph * pw * 2),
    }


def model_flops(cfg: ModelConfig, latent: tuple[int, int, int, int], window: tuple[int, int, int] | None) -> float:
    """Total FLOPs of one plain forward pass: the sum of :func:`flop_parts`."""
    return sum(flop_parts(cfg, latent, window).values())


def model_bytes(cfg: ModelConfig, latent: tuple[int, int, int, int], element: int = 2) -> float:
    """Minimum memory traffic of one call when every matmul and attention is its own kernel (everything
    else fused into them): block weights read once, plus each linear's input and output and the attention
    inputs/outputs once. Per token per block ``(4·2d + 2·2d + 2·(d + ffn))`` linear and ``6d`` attention
    elements (self: q, k, v, o; cross: q, o)."""
    c, f, h, w = latent
    pf, ph, pw = cfg.patch_size
    L = (f // pf) * (h // ph) * (w // pw)
    d = cfg.dim
    per_token = 8 * d + 4 * d + 2 * (d + cfg.ffn_dim) + 6 * d
    return float(element * (cfg.num_parameters() + cfg.num_layers * L * per_token))


@dataclass(frozen=True)
class Rates:
    """Throughputs of this GPU: TFLOP/s of a large bf16 matmul, of an fp8 matmul and of the attention kernel,
    and the memory bandwidth in TB/s."""

    matmul_tflops: float
    fp8_tflops: float
    attention_tflops: float
    bandwidth_tbs: float
    source: str


# The numbers measured on one H100 80GB HBM3 before this work (docs/BENCHMARKS.md); fp8 assumed 2× bf16 and
# the bandwidth is the data-sheet figure. `bench` measures all four again on the GPU it runs on.
NOMINAL_H100 = Rates(
    790.0, 1580.0, 680.0, 3.35, "nominal H100 (bf16 and cuDNN attention measured earlier; fp8 = 2x bf16; HBM3 spec)"
)


def floors(
    cfg: ModelConfig,
    latent: tuple[int, int, int, int],
    window: tuple[int, int, int] | None,
    rates: Rates = NOMINAL_H100,
    text_kv_cached: bool = True,
) -> dict[str, float]:
    """Lower bounds of one model call in milliseconds: compute (matmul FLOPs over the matmul rate plus
    attention FLOPs over the attention rate; bf16 and fp8 linears) and memory (:func:`model_bytes` over the
    bandwidth). ``text_kv_cached``: the text keys/values are not recomputed every call (the streaming case)."""
    parts = flop_parts(cfg, latent, window)
    matmul = parts["linear"] + parts["edges"] + (0.0 if text_kv_cached else parts["text_kv"])
    attn = parts["self_attention"] + parts["cross_attention"]
    nbytes = model_bytes(cfg, latent)
    return {
        "matmul_tflop": matmul / 1e12,
        "attention_tflop": attn / 1e12,
        "bytes_gb": nbytes / 1e9,
        "matmul_ms_bf16": matmul / (rates.matmul_tflops * 1e12) * 1e3,
        "matmul_ms_fp8": matmul / (rates.fp8_tflops * 1e12) * 1e3,
        "attention_ms": attn / (rates.attention_tflops * 1e12) * 1e3,
        "compute_floor_ms_bf16": (matmul / rates.matmul_tflops + attn / rates.attention_tflops) / 1e9,
        "compute_floor_ms_fp8": (matmul / rates.fp8_tflops + attn / rates.attention_tflops) / 1e9,
        "memory_floor_ms": nbytes / (rates.bandwidth_tbs * 1e12) * 1e3,
    }


def _cuda_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def measure_rates(device: torch.device, head_dim: int = 128, heads: int = 24, seq: int = 4096) -> dict[str, Any]:
    """Measure this GPU: bf16 and fp8 (row-scaled ``torch._scaled_mm``) matmul at 8192³, attention through
    cuDNN and through SDPA's default choice (``[4, seq, heads, head_dim]``), and copy bandwidth (1 GiB).
    Each measurement is independent; a failure is recorded as ``"error: …"``."""
    out: dict[str, Any] = {}
    n = 8192

    def guarded(name: str, fn: Callable[[], float]) -> None:
        try:
            out[name] = round(fn(), 1)
        except Exception as exc:  # noqa: BLE001 - record and go on
            out[name] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

    def matmul() -> float:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        return 2 * n**3 / (_cuda_ms(lambda: a @ b, 20) / 1e3) / 1e12

    def fp8() -> float:
        a8, sa = quantize_fp8(torch.randn(n, n, device=device), True)
        b8, sb = quantize_fp8(torch.randn(n, n, device=device), True)
        sb = sb.reshape(1, -1)

        def mm() -> Any:
            return torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)

        return 2 * n**3 / (_cuda_ms(mm, 20) / 1e3) / 1e12

    def attention(backend: str) -> Callable[[], float]:
        from .attention import attention as attend

        def run() -> float:
            q, k, v = (torch.randn(4, seq, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
            return 4 * 4 * seq * seq * heads * head_dim / (_cuda_ms(lambda: attend(q, k, v, backend), 10) / 1e3) / 1e12

        return run

    def bandwidth() -> float:
        x = torch.empty(2**29, device=device, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        return 2 * x.numel() * 2 / (_cuda_ms(lambda: y.copy_(x), 20) / 1e3) / 1e12

    guarded("matmul_bf16_tflops", matmul)
    guarded("matmul_fp8_tflops", fp8)
    guarded("attention_cudnn_tflops", attention("cudnn"))
    guarded("attention_sdpa_tflops", attention("sdpa"))
    guarded("bandwidth_tbs", bandwidth)
    torch.cuda.empty_cache()
    return out


def rates_from(measured: dict[str, Any]) -> Rates | None:
    try:
        att = measured["attention_cudnn_tflops"]
        if not isinstance(att, float):
            att = measured["attention_sdpa_tflops"]
        fp8 = measured["matmul_fp8_tflops"]
        mm = measured["matmul_bf16_tflops"]
        return Rates(float(mm), float(fp8 if isinstance(fp8, float) else mm), float(att),
                     float(measured["bandwidth_tbs"]), "measured in this run")
    except (KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
    timed: AbstractContextManager[Any] | None = None,
) -> tuple[float, float]:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` calls; also the first call's
    wall time in seconds (compilation, graph capture). ``timed`` (a :class:`ClockSampler`) is entered around
    the timed runs only, after the warm-up."""
    t = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t
    for _ in range(max(0, warmup - 1)):
        fn()
    _sync(device)
    times = []
    with timed if timed is not None else nullcontext():
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2], first


def median_ms(values: Sequence[float]) -> float:
    """The median of ``values`` (for an even count, the mean of the two middle values)."""
    if not values:
        raise ValueError("median_ms needs at least one value")
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def round_order(n_modes: int, round_index: int) -> list[int]:
    """The order in which round ``round_index`` (0 = the first round) times ``n_modes`` modes: the given
    order in even rounds (the 1st, 3rd, …) and reversed in odd ones (the 2nd, 4th, …), so that a drift over
    the run (clocks, temperature, memory) affects every mode alike."""
    if n_modes < 0 or round_index < 0:
        raise ValueError(f"round_order needs n_modes >= 0 and round_index >= 0, got {n_modes}, {round_index}")
    order = list(range(n_modes))
    return order[::-1] if round_index % 2 else order


def _speeds(ms: float, p: Partition, video_per_call: float, base_ms: float | None, flops: float) -> dict[str, Any]:
    """The fields of a mode's entry derived from its milliseconds per call."""
    return {
        "latent_fps": 1000 * p.c / (p.s * ms),
        "video_fps": 1000 * video_per_call / ms,
        "speedup": (base_ms / ms) if base_ms else None,
        "achieved_tflops": flops / ms / 1e9,
    }


def _error_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StreamDiT:
    """Random weights (speed does not depend on their values) with a non-zero head, so outputs can be compared."""
    torch.manual_seed(seed)  # parameter init only
    with torch.device(device):
        model = StreamDiT(cfg)
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return model.to(dtype).eval()


def bench_inputs(
    cfg: ModelConfig, latent: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents ``[1, C, F, H, W]``, per-frame σ ``[1, F]`` (the stream's staircase) and a per-frame context
    ``[1, F, Lt, text_dim]`` holding one prompt in every frame (a steady stream)."""
    c, f, h, w = latent
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, c, f, h, w, generator=g, device=device, dtype=dtype)
    sigma = torch.linspace(0.05, 1.0, f, device=device)[None]
    prompt = torch.randn(1, 1, cfg.text_len, cfg.text_dim, generator=g, device=device, dtype=dtype)
    return x, sigma, prompt.expand(1, f, -1, -1).contiguous()


class _LatentShape:
    """The codec facts the sampler needs (no decoding: the decoder is timed separately)."""

    def __init__(self, channels: int, spatial: int, temporal: int) -> None:
        self.latent_channels, self.spatial_factor, self.temporal_factor = channels, spatial, temporal

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the benchmark codec does not encode")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def time_to_first_frame(
    model: StreamDiT, case: BenchCase, device: torch.device, dtype: torch.dtype, attention: str
) -> dict[str, Any]:
    """Seconds from a new stream to its first emitted chunk through the real sampler, warm start (uniform T2V
    fill) and cold start, each run twice with the same sampler (``first`` includes computing the prompt's
    keys/values and capturing graphs, ``again`` is a new stream in a warm process). Decoding is excluded."""
    from .pipeline import StreamPipeline
    from .prompts import PromptSchedule
    from .sampler import StreamSampler, StreamSettings

    cfg = model.config
    c, f, h, w = case.latent
    g = torch.Generator(device=device).manual_seed(1)
    emb = torch.randn(cfg.text_len, cfg.text_dim, generator=g, device=device)
    pipe = StreamPipeline(
        model=model, text_encoder=None, codec=_LatentShape(c, case.spatial_factor, case.temporal_factor),
        device=device, dtype=dtype, name=case.name, attention=attention, external_embeddings={"bench": emb},
    )
    schedule = PromptSchedule.single("bench")
    out: dict[str, Any] = {}
    for warm in (True, False):
        settings = StreamSettings(
            partition=case.partition, height=h * case.spatial_factor, width=w * case.spatial_factor,
            window=case.window, warm_start=warm,
        )
        sampler = StreamSampler(pipe, settings)
        name = "warm_start" if warm else "cold_start"
        for attempt in ("first", "again"):
            _sync(device)
            t = time.perf_counter()
            state = sampler.init_state(0, schedule)
            state, latents = sampler.advance_latents(state, schedule, chunks=1)
            _sync(device)
            out[f"{name}_{attempt}_s"] = time.perf_counter() - t
        out[f"{name}_calls"] = state.calls
    return out


def time_decoder(
    case: BenchCase,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 3,
    make_vae: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Milliseconds to decode one emitted chunk (``c`` latent frames) with the Wan 2.1 VAE (diffusers
    ``AutoencoderKLWan``, its default = the 2.1 configuration, random weights; ``make_vae`` builds another, for
    tests), two ways:

    * ``ms_per_chunk``: the chunk decoded on its own by ``vae.decode`` (``frames_out_standalone`` frames: a
      causal decoder's first latent frame gives 1 frame, every later one ``temporal_factor``);
    * ``stream_ms_per_chunk``: the pack's streaming decode (:func:`~streamdit_core.causal_decode.decode_chunk`,
      the path of the ComfyUI decode node and the Wan pipeline): a chunk in the middle of a stream, its feature
      cache carried over from the previous chunk, ``stream_frames_per_chunk`` = ``c · temporal_factor`` frames
      copied to the CPU as float32 — what a stream pays per emitted chunk.
    """
    if case.decoder is None:
        return {"decoder": "none (pixel space)"}
    try:
        from diffusers import AutoencoderKLWan
    except Exception as exc:  # noqa: BLE001
        return {"decoder": "skipped", "reason": f"diffusers' AutoencoderKLWan is not importable: {_error_text(exc)}"}
    _, _, h, w = case.latent
    chunk = case.partition.c
    try:
        torch.manual_seed(0)
        with torch.device(device):
            vae: Any = (make_vae or AutoencoderKLWan)()
            vae = vae.to(dtype).eval()
        z = torch.randn(1, vae.config.z_dim, 2 * chunk, h, w, device=device, dtype=dtype)  # two chunks
        first_chunk, next_chunk = z[:, :, :chunk], z[:, :, chunk:]
        with torch.inference_mode():
            ms, first = _time_calls(lambda: vae.decode(first_chunk).sample, device, repeats, warmup=1)
            frames = int(vae.decode(first_chunk).sample.shape[2])
            step = ModuleStepDecoder.from_diffusers(vae, device, dtype)
            mid, _ = decode_chunk(step, DecoderState.fresh(step.num_slots), first_chunk)  # the stream so far
            stream_ms, _ = _time_calls(lambda: decode_chunk(step, mid, next_chunk), device, repeats, warmup=1)
            stream_frames = int(decode_chunk(step, mid, next_chunk)[1].shape[0])
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        note = "Wan 2.1 VAE" if case.decoder == "wan-vae" else (
            "proxy: Wan 2.1 VAE at the same pixel size (the paper's 8-channel TAE is not public)")
        return {"decoder": note, "ms_per_chunk": ms, "latent_frames": chunk, "frames_out_standalone": frames,
                "stream_ms_per_chunk": stream_ms, "stream_frames_per_chunk": stream_frames,
                "first_call_s": first, "peak_gpu_memory_gib": peak}
    except Exception as exc:  # noqa: BLE001
        return {"decoder": "failed", "reason": _error_text(exc)}


# ----------------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Timed:
    """A mode timed in round 1: its entry in ``row["modes"]`` (updated by later rounds), its options and its
    model call."""

    entry: dict[str, Any]
    options: PerfOptions
    call: Callable[[], torch.Tensor]


def _later_round(
    r: int,
    rounds: int,
    timed: list[_Timed],
    model: StreamDiT,
    device: torch.device,
    repeats: int,
    speeds: Callable[[float], dict[str, Any]],
    emit: Callable[[], None],
    clocks: ClockSampler | None = None,
) -> None:
    """Round ``r`` (0-based, ≥ 1) of ``rounds``: set each mode timed in round 1 again and time it again (warm-up
    included), in :func:`round_order`; append the time to its ``round_ms`` (``None`` and an entry in
    ``round_errors`` when the round fails) and set ``ms_per_call`` and ``speeds(ms)`` from the median of its
    rounds. Modes whose round 1 failed (``error`` in the entry, as after a failed profile) are skipped. With
    ``clocks``, the summary of the round's clock samples is appended to ``round_gpu_clocks`` (``None`` for a
    failed round)."""
    for i in round_order(len(timed), r):
        t = timed[i]
        if "error" in t.entry:
            continue
        log.info("round %d/%d: %s", r + 1, rounds, t.entry["mode"])
        try:
            model.set_perf(t.options)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ms: float | None = _time_calls(t.call, device, repeats, warmup=3, timed=clocks)[0]
            summary = clocks.summary() if clocks is not None else None
        except Exception as exc:  # noqa: BLE001 - keep round 1's data and go on
            ms, summary = None, None
            t.entry.setdefault("round_errors", []).append({"round": r + 1, "error": _error_text(exc)})
            log.error("round %d of mode %s failed: %s", r + 1, t.entry["mode"], traceback.format_exc())
        t.entry["round_ms"].append(ms)
        if clocks is not None:
            t.entry["round_gpu_clocks"].append(summary)
        median = median_ms([v for v in t.entry["round_ms"] if v is not None])
        t.entry.update({"ms_per_call": median, **speeds(median)})
        emit()


def clock_sampler(enabled: bool, device: torch.device) -> ClockSampler | None:
    """The sampler of ``--gpu-clocks`` for ``device``'s GPU (index ``None``, as of ``torch.device("cuda")``,
    is GPU 0), or ``None`` when not enabled or not on CUDA."""
    if not enabled or device.type != "cuda":
        return None
    return ClockSampler(device.index if device.index is not None else 0)


def mode_options(mode: str, compile_mode: str) -> PerfOptions:
    """A mode name: a level (``plain``, ``safe``, ``fast``, ``fastest``) or option items joined by ``+``
    (``kv+layout+compile``); compiled modes use ``compile_mode``."""
    options = PerfOptions.level(mode.replace("+", ","))
    if options.compile != "off":
        options = replace(options, compile=compile_mode)
    return options


def run_case(
    case: BenchCase,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    modes: tuple[str, ...] = ("plain", "safe"),
    compile_mode: str = "default",
    ttff: bool = True,
    decoder: bool = True,
    rates: Rates | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    profile: tuple[str, ...] = (),
    profile_dir: Path | None = None,
    rounds: int = 1,
    gpu_clocks: bool = False,
) -> dict[str, Any]:
    """Measure one case (see the module docstring). ``report(row)`` is called after every measurement with
    the row so far (the command writes it to disk). Modes named in ``profile`` are also run twice under
    ``torch.profiler``; the kernel table goes to ``profile_dir/profile_<case>_<mode>.txt``. ``rounds`` > 1
    times the modes that worked again in rounds 2..``rounds`` (:func:`_later_round`); the baseline is timed
    once. ``gpu_clocks`` on a CUDA device records ``gpu_clocks`` (and ``round_gpu_clocks``) in the baseline
    and mode entries (:func:`clock_sampler`); elsewhere it does nothing."""
    if rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    cfg = preset(case.model)
    c, f, h, w = case.latent
    p = case.partition
    video_per_call = p.c * case.temporal_factor / p.s
    flops = model_flops(cfg, case.latent, case.window)
    row: dict[str, Any] = {
        "case": case.name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "parameters": cfg.num_parameters(),
        "layout": {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "heads": cfg.num_heads, "layers": cfg.num_layers,
                   "patch": list(cfg.patch_size), "text_len": cfg.text_len},
        "latent": list(case.latent),
        "tokens": (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2]),
        "partition": p.describe(),
        "window": list(case.window) if case.window else None,
        "video_frames_per_call": video_per_call,
        "tflop_per_call": flops / 1e12,
        "flop_parts_tflop": {k: v / 1e12 for k, v in flop_parts(cfg, case.latent, case.window).items()},
        "floors_nominal": floors(cfg, case.latent, case.window, NOMINAL_H100),
        "modes": [],
    }
    if rates is not None:
        row["floors_measured"] = floors(cfg, case.latent, case.window, rates)

    def emit() -> None:
        if report is not None:
            report(row)

    model = build_model(cfg, device, dtype)
    x, sigma, ctx = bench_inputs(cfg, case.latent, device, dtype)
    clocks = clock_sampler(gpu_clocks, device)
    full = (f, h, w)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model.set_perf(PerfOptions.plain())
        try:
            ms, _ = _time_calls(lambda: model(x, sigma, ctx, window=full, attention_backend="sdpa"), device, repeats,
                                timed=clocks)
            row["baseline"] = {"what": "eager, full attention, plain SDPA, no speed-ups", "ms_per_call": ms,
                               "video_fps": 1000 * video_per_call / ms,
                               "achieved_tflops": model_flops(cfg, case.latent, None) / ms / 1e9,
                               **({"gpu_clocks": clocks.summary()} if clocks is not None else {})}
        except Exception as exc:  # noqa: BLE001
            row["baseline"] = {"error": _error_text(exc)}
            log.error("baseline of %s failed: %s", case.name, traceback.format_exc())
        emit()
        ref = model(x, sigma, ctx, window=case.window or full, attention_backend="sdpa").float()
        base_ms = row["baseline"].get("ms_per_call")
        timed: list[_Timed] = []
        for mode in modes:
            entry: dict[str, Any] = {"mode": mode}
            try:
                options = mode_options(mode, compile_mode).for_device(device)
                attention = "sdpa" if mode == "plain" else "auto"
                entry["status"] = dict(model.set_perf(options))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                def call(attention: str = attention) -> torch.Tensor:
                    return model(x, sigma, ctx, window=case.window or full, attention_backend=attention)

                ms, first = _time_calls(call, device, repeats, warmup=3, timed=clocks)
                if clocks is not None:
                    entry["gpu_clocks"] = clocks.summary()
                    if rounds > 1:
                        entry["round_gpu_clocks"] = [entry["gpu_clocks"]]
                out = call()
                entry.update({
                    "attention": attention,
                    "ms_per_call": ms,
                    **({"round_ms": [ms]} if rounds > 1 else {}),
                    **_speeds(ms, p, video_per_call, base_ms, flops),
                    "first_call_s": first,
                    "relative_error": _relative_error(out, ref),
                    "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                    "status": dict(model.perf_status),
                    "graph_error": model._graphs.error,
                })
                timed.append(_Timed(entry, options, call))
                if mode in profile and profile_dir is not None:  # without CUDA graphs: kernels stay visible
                    graphed = model.perf
                    model.perf = replace(graphed, cuda_graphs=False)
                    try:
                        entry["profile"] = profile_calls(
                            call, device, profile_dir / f"profile_{case.name}_{mode}.txt")
                    finally:
                        model.perf = graphed
            except Exception as exc:  # noqa: BLE001 - record and go on with the next mode
                entry["error"] = _error_text(exc)
                log.error("mode %s of %s failed: %s", mode, case.name, traceback.format_exc())
            row["modes"].append(entry)
            emit()
        for r in range(1, rounds):
            _later_round(r, rounds, timed, model, device, repeats,
                         lambda ms: _speeds(ms, p, video_per_call, base_ms, flops), emit, clocks)
        ok = [t for t in timed if "ms_per_call" in t.entry]
        best = min(ok, key=lambda t: t.entry["ms_per_call"]) if ok else None  # the first of equals, as before
        if ttff and best is not None:
            try:
                model.set_perf(best.options)
                row["time_to_first_frame"] = {"mode": best.options.describe(), **time_to_first_frame(
                    model, case, device, dtype, best.entry["attention"])}
            except Exception as exc:  # noqa: BLE001
                row["time_to_first_frame"] = {"error": _error_text(exc)}
                log.error("time to first frame of %s failed: %s", case.name, traceback.format_exc())
            emit()
    model.set_perf(PerfOptions.plain())
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if decoder and case.decoder is not None:
        row["decoder"] = time_decoder(case, device, dtype)
        emit()
    return row


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def _f(value: Any, fmt: str = ".1f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _ms_cell(mode: dict[str, Any]) -> str:
    """The ms/call cell of a mode: the median, and with several rounds their range, ``162.8 (161.3–163.5)``."""
    times = [v for v in mode.get("round_ms", []) if isinstance(v, (int, float))]
    if len(times) < 2:
        return _f(mode["ms_per_call"])
    return f"{_f(mode['ms_per_call'])} ({_f(min(times))}–{_f(max(times))})"


def _clock_cells(clocks: dict[str, Any]) -> str:
    """The cells of a ``gpu_clocks`` summary: ``1755 (1700–1980) | 512 (690) | 63``, or the error."""
    if "error" in clocks:
        return f"failed: {str(clocks['error'])[:120]} | |"
    return (f"{_f(clocks.get('sm_mhz_median'), '.0f')} ({_f(clocks.get('sm_mhz_min'), '.0f')}–"
            f"{_f(clocks.get('sm_mhz_max'), '.0f')}) | {_f(clocks.get('power_w_median'), '.0f')} "
            f"({_f(clocks.get('power_w_max'), '.0f')}) | {_f(clocks.get('temp_c_max'), '.0f')}")


def clock_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the ``--gpu-clocks`` table (round 1's samples with ``--rounds``), or none when no
    baseline or mode recorded ``gpu_clocks``."""
    lines = []
    for r in rows:
        entries = [{"mode": "baseline", **r.get("baseline", {})}, *r.get("modes", [])]
        lines += [f"| {r['case']} | {e['mode']} | {_clock_cells(e['gpu_clocks'])} |" for e in entries
                  if isinstance(e.get("gpu_clocks"), dict)]
    if not lines:
        return []
    return ["", "| case | mode | SM MHz median (min–max) | power W median (max) | temp °C max |", "|" + "---|" * 5,
            *lines]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """Tables: one line per case and mode (with ``--rounds``, ms/call is the median and its range); with
    ``--gpu-clocks``, clocks, power and temperature (:func:`clock_table`); floors; time to first frame and
    decoder."""
    lines = [
        "| case | mode | ms/call | video FPS | latent FPS | speed-up vs eager full | TFLOP/s | rel. error | "
        "peak GiB | first call s |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        b = r.get("baseline", {})
        lines.append(
            f"| {r['case']} | baseline (eager, full attention) | {_f(b.get('ms_per_call'))} | "
            f"{_f(b.get('video_fps'))} | – | 1.00 | {_f(b.get('achieved_tflops'))} | – | – | – |"
            if "ms_per_call" in b else f"| {r['case']} | baseline | failed: {b.get('error', '?')} |||||||"
        )
        for m in r.get("modes", []):
            if "error" in m:
                lines.append(f"| {r['case']} | {m['mode']} | failed: {m['error'][:120]} | | | | | | | |")
                continue
            lines.append(
                f"| {r['case']} | {m['mode']} | {_ms_cell(m)} | {_f(m['video_fps'])} | {_f(m['latent_fps'])}"
                f" | {_f(m['speedup'], '.2f')} | {_f(m['achieved_tflops'])} | {_f(m['relative_error'], '.1e')}"
                f" | {_f(m['peak_gpu_memory_gib'])} | {_f(m['first_call_s'])} |"
            )
    lines += clock_table(rows)
    lines += ["", "| case | TFLOP/call (matmul + attention) | GB/call | floor bf16 ms | floor fp8 ms | memory floor ms "
              "| rates |", "|" + "---|" * 7]
    for r in rows:
        for key in ("floors_nominal", "floors_measured"):
            fl = r.get(key)
            if fl and r["device"].startswith("cuda"):  # the floors use GPU rates
                lines.append(
                    f"| {r['case']} | {fl['matmul_tflop']:.1f} + {fl['attention_tflop']:.1f} | {fl['bytes_gb']:.1f} | "
                    f"{fl['compute_floor_ms_bf16']:.1f} | {fl['compute_floor_ms_fp8']:.1f} | "
                    f"{fl['memory_floor_ms']:.1f} | {'nominal' if key == 'floors_nominal' else 'measured'} |"
                )
    lines += ["", "| case | first frame, warm start s (again) | cold start s (again) | calls | decoder ms/chunk | "
              "streaming decode ms/chunk (frames) | decoder |", "|" + "---|" * 7]
    for r in rows:
        t = r.get("time_to_first_frame", {})
        d = r.get("decoder", {})
        lines.append(
            f"| {r['case']} | {_f(t.get('warm_start_first_s'), '.2f')} ({_f(t.get('warm_start_again_s'), '.2f')})"
            f" | {_f(t.get('cold_start_first_s'), '.2f')} ({_f(t.get('cold_start_again_s'), '.2f')})"
            f" | {t.get('warm_start_calls', '–')}/{t.get('cold_start_calls', '–')} | {_f(d.get('ms_per_chunk'))}"
            f" | {_f(d.get('stream_ms_per_chunk'))} ({d.get('stream_frames_per_chunk', '–')})"
            f" | {d.get('decoder', '–')} {d.get('reason', '')} |"
        )
    return "\n".join(lines) + "\n"


def _best(row: dict[str, Any], modes: tuple[str, ...] | None = None) -> dict[str, Any] | None:
    ok = [m for m in row.get("modes", []) if "ms_per_call" in m and (modes is None or m["mode"] in modes)]
    return min(ok, key=lambda m: m["ms_per_call"]) if ok else None


def _bf16_mode(mode: str) -> bool:
    """Whether a mode keeps the linears in the model dtype (no fp8): ``fast``, ``kv+layout+compile``, …"""
    try:
        return mode_options(mode, "default").fp8 == "off"
    except ValueError:
        return False


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 6's targets, checked against the rows that exist (GPU rows only, except the CPU one)."""
    out: list[str] = []

    def line(ok: bool, text: str) -> None:
        out.append(f"- {'met' if ok else 'MISSED'}: {text}")

    for r in rows:
        best = _best(r)
        if best is None:
            continue
        gpu, case = r["device"].startswith("cuda"), r["case"]
        base = r.get("baseline", {}).get("ms_per_call")
        if gpu and case == "paper-4b":
            line(best["ms_per_call"] <= 160, f"paper-4b fastest mode ({best['mode']}) {best['ms_per_call']:.1f} "
                 f"ms/call ≤ 160 ms ({best['video_fps']:.1f} video FPS; the paper: 482 ms, 16 FPS)")
            bf16 = _best(r, tuple(m["mode"] for m in r.get("modes", []) if _bf16_mode(m["mode"])))
            floor = (r.get("floors_measured") or r["floors_nominal"])["compute_floor_ms_bf16"]
            if bf16 is not None:
                line(bf16["ms_per_call"] <= 1.1 * floor, f"paper-4b bf16 ({bf16['mode']}) {bf16['ms_per_call']:.1f} "
                     f"ms within 10 % of the compute floor {floor:.1f} ms ({bf16['ms_per_call'] / floor:.2f}x)")
        if gpu and case.startswith("wan2.1-1.3b"):
            line(best["video_fps"] >= 60, f"{case} ({best['mode']}) {best['video_fps']:.1f} video FPS ≥ 60 "
                 f"({best['ms_per_call']:.1f} ms/call; Self-Forcing 17 FPS, LongLive 20.7 FPS)")
        if gpu and base and (case == "paper-4b" or case.startswith("wan2.1-1.3b")):
            line(base / best["ms_per_call"] >= 2.5,
                 f"{case} speed-up over the eager baseline {base / best['ms_per_call']:.2f}x ≥ 2.5x")
        if not gpu and case == "bundled":
            line(best["video_fps"] >= 8, f"bundled on CPU ({r.get('threads', '?')} threads) "
                 f"{best['video_fps']:.1f} FPS ≥ 8")
    return out


def profile_calls(fn: Callable[[], Any], device: torch.device, path: Path, calls: int = 2) -> str:
    """Run ``fn`` ``calls`` times under ``torch.profiler`` and write the per-kernel table (sorted by device
    time) to ``path``. Returns the path, or the error text."""
    try:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            _sync(device)
        averages = prof.key_averages()
        keys = ("device_time_total", "cuda_time_total") if device.type == "cuda" else ()
        for key in (*keys, "self_cpu_time_total"):
            try:
                table = averages.table(sort_by=key, row_limit=40, max_name_column_width=90)
                break
            except (AttributeError, KeyError, ValueError):
                continue
        else:
            table = str(averages)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{calls} calls\n{table}\n")
        return str(path)
    except Exception as exc:  # noqa: BLE001
        return f"error: {_error_text(exc)}"


def _meta(device: torch.device) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
        "gpu": None,
    }
    if device.type == "cuda":
        meta.update({
            "gpu": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "capability": list(torch.cuda.get_device_capability(device)),
        })
        try:
            meta["triton"] = importlib.import_module("triton").__version__
        except Exception:  # noqa: BLE001
            meta["triton"] = None
    from .attention import flash_attn_available

    meta["flash_attn"] = flash_attn_available()
    return meta


def rounds_arg(text: str) -> int:
    """``--rounds R``: a positive integer."""
    try:
        rounds = int(text)
    except ValueError:
        rounds = 0
    if rounds < 1:
        raise argparse.ArgumentTypeError(f"--rounds must be a positive integer (1 = time each mode once), got {text!r}")
    return rounds


def cmd_bench(args: argparse.Namespace) -> int:
    from .pipeline import parse_dtype

    device = torch.device(args.device)
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown bench cases {unknown}; choose from {sorted(CASES)}")
    modes = tuple(m for m in (args.modes or ("plain,safe,fast,fastest" if device.type == "cuda" else "plain,safe"))
                  .split(",") if m)
    for m in modes:
        mode_options(m, args.compile_mode)  # raises for a bad name before anything runs
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    data: dict[str, Any] = {"runs": [], "rows": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            log.warning("%s is not readable JSON; starting a new one", path)
    meta = _meta(device)
    if args.rounds > 1:  # absent: one round
        meta["rounds"] = args.rounds
    if args.gpu_clocks and device.type != "cuda":
        log.info("--gpu-clocks needs a CUDA device; ignored on %s", device)
    if device.type == "cuda" and not args.no_rates:
        meta["measured_rates"] = measure_rates(device)
        log.info("measured rates: %s", meta["measured_rates"])
    rates = rates_from(meta.get("measured_rates", {}))
    data.setdefault("runs", []).append(meta)

    def save(row: dict[str, Any] | None = None) -> None:
        rows = [r for r in data.get("rows", []) if row is None or (r.get("case"), r.get("device")) !=
                (row["case"], row["device"])]
        if row is not None:
            rows.append(row)
        data["rows"] = rows
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(path)
        (out / "bench.md").write_text(
            "\n".join(f"<!-- {json.dumps(m)} -->" for m in data["runs"]) + "\n\n" + to_markdown(data["rows"])
            + "\n" + "\n".join(targets(data["rows"])) + "\n")

    for name in names:
        log.info("benchmarking %s on %s (%s), modes %s", name, device, dtype, ",".join(modes))
        run_case(CASES[name], device, dtype, args.repeats, modes, args.compile_mode, not args.no_ttff,
                 not args.no_decoder, rates, report=save,
                 profile=tuple(m for m in (args.profile or "").split(",") if m), profile_dir=out, rounds=args.rounds,
                 gpu_clocks=args.gpu_clocks)
    save()
    sys.stdout.write(to_markdown(data["rows"]) + "\n" + "\n".join(targets(data["rows"])) + "\n")
    return 0


@register_command("bench")
def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="time one model call over the full buffer per preset and speed-up mode")
    b.add_argument("--cases", default="bundled", help=f"comma-separated, from {sorted(CASES)}")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument(
        "--rounds", type=rounds_arg, default=1, metavar="R",
        help="time the modes in R interleaved rounds (round 2 in reverse order, round 3 forward, …) and report "
        "each mode's median ms/call with the range over the rounds: one configuration timed twice in one process "
        "can differ by ~2 %% (default 1: each mode timed once; the baseline is always timed once)",
    )
    b.add_argument(
        "--modes", default=None,
        help=f"comma-separated speed-up levels {sorted(PERF_LEVELS)} or option lists joined by '+', which may "
        "start from a level (plain+gather, safe+compile); kv+layout is safe with the roll window path "
        "(default: plain,safe,fast,fastest on CUDA, plain,safe on CPU)",
    )
    b.add_argument("--compile-mode", default="default", help="torch.compile mode for the compiled levels")
    b.add_argument("--no-ttff", action="store_true", help="skip the time-to-first-frame runs")
    b.add_argument("--no-decoder", action="store_true", help="skip the decoder timing")
    b.add_argument("--no-rates", action="store_true", help="skip measuring the GPU's matmul/attention/copy rates")
    b.add_argument(
        "--gpu-clocks", action="store_true",
        help="sample SM/memory clocks, power and temperature with nvidia-smi every 100 ms while the baseline and "
        "each mode are timed (after warm-up) and report them per mode (CUDA only; a missing nvidia-smi is "
        "recorded, not fatal)",
    )
    b.add_argument("--profile", default=None, help="comma-separated modes to also run under torch.profiler")
    b.add_argument("--out", default="outputs/bench")
    b.set_defaults(func=cmd_bench)


__all__ = [
    "BenchCase",
    "CASES",
    "NOMINAL_H100",
    "Rates",
    "clock_sampler",
    "clock_table",
    "floors",
    "flop_parts",
    "measure_rates",
    "median_ms",
    "model_bytes",
    "model_flops",
    "round_order",
    "run_case",
    "time_decoder",
    "time_to_first_frame",
    "to_markdown",
]
