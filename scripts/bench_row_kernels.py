"""Time the fused row kernels (``fp8_triton``, ``rope_triton``) at the benchmark cases' shapes for several
``num_warps``, against the copy bandwidth: which launch configuration ``triton_util.row_launch_config`` should pick.

Usage (on a CUDA machine with Triton): ``python scripts/bench_row_kernels.py --out OUTDIR`` →
``OUTDIR/row_kernels.json`` and ``row_kernels.md``. Each kernel runs on random inputs of one model call's shape
(paper-4b: 16,384 tokens × 3,072, FFN 7,680, 24 heads; Wan 1.3B with 4-frame windows: 24,960 × 1,536, FFN 8,960,
12 heads; 16 token frames), timed with CUDA events (20 launches in one CUDA graph, median of 10 replays).
Bytes = what the kernel must read and write once. The ``outquant`` rows replace the compiler's window gather +
quantisation of the self-attention output and its quantisation of the cross-attention output (``PerfOptions.
fp8_out_fused``). The ``(splitrows)`` rows hold the GELU row as two power-of-two pieces (``PerfOptions.
fp8_split_rows``, ``triton_util.split_blocks``: Wan's 8,960 as 8,192 + 1,024); at the paper's 7,680, where the item
keeps the whole row (4,096 + 4,096 is no smaller than 8,192), the split is forced, as a control of what two pieces
cost at the same share of active lanes. The ``(normrows)`` rows run the LayerNorm kernels that read per-frame rows
(fp8: norm1, norm1 with ``crossres``, norm2, norm3; bf16 store, ``normfuse``: norm2, norm3, norm1 with ``crossres``)
with several rows of one frame per program (``PerfOptions.norm_rows``, ``triton_util.norm_rows``: the per-frame rows
loaded once per program; the warps sweep the ``[ROWS, BLOCK]`` tile's).
The column "warps item" is the warp count the item ``warps``
(``PerfOptions.tuned_warps``, ``triton_util.TUNED_WARPS``) launches the kernel with (for the ``(normrows)`` rows
the multi-row kernel's own entry, ``triton_util.norm_rows_launch_config``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from streamdit_core import fp8_triton, rope_triton
from streamdit_core.attention import window_index
from streamdit_core.triton_util import (
    default_warps,
    norm_rows,
    norm_rows_launch_config,
    row_launch_config,
    split_blocks,
    split_launch_config,
)

log = logging.getLogger("StreamDiT.bench_row_kernels")

# name: (tokens, width, ffn width, heads, token grid, window)
CASES = {
    "paper-4b": (16384, 3072, 7680, 24, (16, 32, 32), (16, 16, 16)),
    "wan2.1-1.3b-w4": (24960, 1536, 8960, 12, (16, 30, 52), (4, 30, 52)),
}
WARPS = (1, 2, 4, 8, 16)
SPLIT = "(splitrows)"  # the label of the split-row kernels' rows
NROWS = "(normrows)"  # the label of the multi-row LayerNorm kernels' rows


def _split_pieces(n_cols: int) -> tuple[int, int]:
    """The split row's two pieces (``triton_util.split_blocks``), forced where the item would keep the row whole:
    the largest power of two ≤ ``n_cols`` and the next one ≥ the rest."""
    block = 1 << (n_cols.bit_length() - 1)
    rest = n_cols - block
    return split_blocks(n_cols) if split_blocks(n_cols)[1] else (block, 1 << (rest - 1).bit_length() if rest else 0)


def _forced_configs(warps: int) -> tuple[Callable[..., tuple[int, int]], Callable[..., tuple[int, int, int]],
                                          Callable[..., tuple[int, int]]]:
    """Stand-ins for ``row_launch_config``, ``split_launch_config`` and ``norm_rows_launch_config`` (same
    signatures) that keep each one's blocks (the split's pieces forced, :func:`_split_pieces`) and launch with
    ``warps``."""
    def config(n_cols: int, kind: str | None = None, tuned: bool = False) -> tuple[int, int]:
        return row_launch_config(n_cols)[0], warps

    def split_config(n_cols: int, kind: str | None = None, tuned: bool = False) -> tuple[int, int, int]:
        return (*_split_pieces(n_cols), warps)

    def rows_config(n_cols: int, rows: int, kind: str | None = None, tuned: bool = False) -> tuple[int, int]:
        return norm_rows_launch_config(n_cols, rows)[0], warps

    return config, split_config, rows_config


def _warps_columns(case: str, name: str, cols: int, kind: str | None) -> tuple[int, int]:
    """``(default warps, warps with the item warps)`` of the kernel ``name`` (its row width ``cols``, its
    ``TUNED_WARPS`` name ``kind``) in ``case``: for a ``(normrows)`` row the ``[ROWS, BLOCK]`` tile's
    (``norm_rows_launch_config``), for a ``(splitrows)`` row the split layout's (a forced split: the default rule
    for its lanes), else the one-row kernel's."""
    if name.endswith(NROWS):
        tokens, grid = CASES[case][0], CASES[case][4]
        per = norm_rows(tokens // grid[0], tokens, cols)
        return norm_rows_launch_config(cols, per)[1], norm_rows_launch_config(cols, per, kind, True)[1]
    if name.endswith(SPLIT):
        if split_blocks(cols)[1]:
            return split_launch_config(cols)[2], split_launch_config(cols, kind, True)[2]
        warps = default_warps(sum(_split_pieces(cols)))
        return warps, warps
    return row_launch_config(cols)[1], row_launch_config(cols, kind, True)[1]


def _time_ms(fn: Callable[[], object], repeats: int = 10, launches: int = 20) -> float:
    """Milliseconds per call of ``fn``: ``launches`` calls captured in one CUDA graph (so no Python launch cost is
    timed), the median over ``repeats`` CUDA-event timings of its replay, after 3 warm-ups (Triton compiles)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / launches)
    del graph
    return statistics.median(times)


def _kernels(case: str) -> dict[str, tuple[Callable[[], object], int, int, str | None]]:
    """``{kernel: (launch, bytes moved, the row width its launch configuration is chosen for, its name in
    triton_util.TUNED_WARPS)}`` of one case."""
    tokens, d, ffn, heads, grid, window = CASES[case]
    frames = grid[0]
    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int, dtype: torch.dtype = bf16) -> torch.Tensor:
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    x, y, h, h_bias, y_bias = rnd(tokens, d), rnd(tokens, d), rnd(tokens, ffn), rnd(ffn), rnd(d)
    mod = [rnd(1, frames, d, dtype=torch.float32) * 0.1 for _ in range(3)]
    w, b = rnd(d), rnd(d)
    q, k, v = (rnd(1, tokens, d) for _ in range(3))
    dh = d // heads
    cos, sin = (rnd(tokens, dh // 2, dtype=torch.float32) for _ in range(2))
    index, inverse = window_index(grid, window, True, dev) if window != grid else (None, None)
    # the attention output [b·n_windows, window_tokens, heads, dh] (cuDNN's, contiguous) of q's values
    attn = q.view(-1, tokens if window == grid else window[0] * window[1] * window[2], heads, d // heads)
    row, row8 = tokens * d * 2, tokens * d  # bytes of a bf16 / fp8 activation
    nq = fp8_triton.norm_quant_triton
    per = norm_rows(tokens // frames, tokens, d)  # rows per program with the item normrows
    return {
        "LayerNorm + modulation + fp8 (norm1)": (
            lambda: nq(x, 1e-6, tokens, frames, shift=mod[0], scale=mod[1]), row + row8, d, "norm_modulate_quant"),
        "residual + gate + LayerNorm affine + fp8 (norm3)": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, gate=mod[2], weight=w, bias=b), 3 * row + row8, d,
            "residual_gate_affine_quant"),
        "residual + bias + gate + LayerNorm affine + fp8 (norm3, fuseadds)": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, gate=mod[2], weight=w, bias=b, residual_bias=y_bias),
            3 * row + row8, d, "residual_gate_affine_quant"),
        "residual + LayerNorm + modulation + fp8 (norm2)": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, shift=mod[0], scale=mod[1]), 3 * row + row8, d,
            "residual_modulate_quant"),
        "residual + bias + LayerNorm + modulation + fp8 (norm2, fuseadds)": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, shift=mod[0], scale=mod[1], residual_bias=y_bias),
            3 * row + row8, d, "residual_modulate_quant"),
        "residual + gate + LayerNorm + modulation + fp8 (norm1, crossres)": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, gate=mod[2], shift=mod[0], scale=mod[1]),
            3 * row + row8, d, "residual_gate_modulate_quant"),
        f"LayerNorm + modulation + fp8 (norm1, {per} rows per program) {NROWS}": (
            lambda: nq(x, 1e-6, tokens, frames, shift=mod[0], scale=mod[1], rows=True), row + row8, d,
            "norm_modulate_quant"),
        f"residual + gate + LayerNorm + modulation + fp8 (norm1, crossres, {per} rows per program) {NROWS}": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, gate=mod[2], shift=mod[0], scale=mod[1], rows=True),
            3 * row + row8, d, "residual_gate_modulate_quant"),
        f"residual + gate + LayerNorm affine + fp8 (norm3, {per} rows per program) {NROWS}": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, gate=mod[2], weight=w, bias=b, rows=True),
            3 * row + row8, d, "residual_gate_affine_quant"),
        f"residual + LayerNorm + modulation + fp8 (norm2, {per} rows per program) {NROWS}": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, shift=mod[0], scale=mod[1], rows=True), 3 * row + row8,
            d, "residual_modulate_quant"),
        "residual + LayerNorm + modulation, bf16 (normfuse)": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, shift=mod[0], scale=mod[1], quantize=False), 4 * row, d,
            "residual_modulate"),
        f"residual + LayerNorm + modulation, bf16 (normfuse, {per} rows per program) {NROWS}": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, shift=mod[0], scale=mod[1], quantize=False, rows=True),
            4 * row, d, "residual_modulate"),
        "residual + gate + LayerNorm affine, bf16 (normfuse norm3)": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, gate=mod[2], weight=w, bias=b, quantize=False), 4 * row,
            d, "residual_gate_affine"),
        f"residual + gate + LayerNorm affine, bf16 (normfuse norm3, {per} rows per program) {NROWS}": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, gate=mod[2], weight=w, bias=b, quantize=False,
                       rows=True), 4 * row, d, "residual_gate_affine"),
        "residual + gate + LayerNorm + modulation, bf16 (normfuse norm1, crossres)": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, gate=mod[2], shift=mod[0], scale=mod[1], quantize=False),
            4 * row, d, "residual_gate_modulate"),
        f"residual + gate + LayerNorm + modulation, bf16 (normfuse norm1, crossres, {per} rows per program) {NROWS}": (
            lambda: nq(x, 1e-6, tokens, frames, residual=y, gate=mod[2], shift=mod[0], scale=mod[1], quantize=False,
                       rows=True), 4 * row, d, "residual_gate_modulate"),
        "bias + GELU + fp8 (FFN hidden)": (
            lambda: fp8_triton.quantize_rows_triton(h, 1, bias=h_bias), tokens * ffn * 3, ffn, "gelu_quant"),
        f"bias + GELU + fp8, row as {' + '.join(f'{b:,}' for b in _split_pieces(ffn))}"
        f"{'' if split_blocks(ffn)[1] else ' (forced)'} {SPLIT}": (
            lambda: fp8_triton.quantize_rows_triton(h, 1, bias=h_bias, split=True), tokens * ffn * 3, ffn,
            "gelu_quant"),
        "q/k RMS norm + RoPE + gather, v gather (qkrope)": (
            lambda: rope_triton.qkv_rows_triton(q, k, v, cos, sin, 1e-6, weights=(w, w), index=index), 6 * row, d,
            "qkv_rope"),
        "attention output window gather + fp8 (outquant: self-attention o input)": (
            lambda: fp8_triton.window_rows_quant_triton(attn, inverse), row + row8, d, None),
        "fp8 rows (outquant: cross-attention o input)": (
            lambda: fp8_triton.quantize_rows_triton(x, 0), row + row8, d, None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    default, default_split = fp8_triton.row_launch_config, fp8_triton.split_launch_config
    default_rows = fp8_triton.norm_rows_launch_config
    copy = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    bandwidth = 2 * copy.numel() / _time_ms(lambda: copy.clone()) / 1e9  # TB/s (bytes per ms / 1e9)
    results: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "copy_tbs": round(bandwidth, 2), "rows": []}
    lines = [f"GPU {results['gpu']}, copy bandwidth {bandwidth:.2f} TB/s; µs per launch (share of copy bandwidth)",
             "", "| case | kernel | default warps | warps item | " + " | ".join(f"{n} warps" for n in WARPS) + " |",
             "|---|---|---|---|" + "---|" * len(WARPS)]
    for case in args.cases.split(","):
        for name, (launch, nbytes, cols, kind) in _kernels(case).items():
            cells, row = [], {"case": case, "kernel": name, "bytes": nbytes, "us": {}}
            for warps in WARPS:
                config, split_config, rows_config = _forced_configs(warps)
                fp8_triton.row_launch_config = rope_triton.row_launch_config = config
                fp8_triton.split_launch_config = split_config
                fp8_triton.norm_rows_launch_config = rows_config
                try:
                    us = _time_ms(launch) * 1e3
                except Exception as exc:  # a configuration the kernel cannot run with: record it, go on
                    log.warning("%s %s %d warps: %s", case, name, warps, exc)
                    cells.append("failed")
                    continue
                row["us"][warps] = round(us, 1)
                cells.append(f"{us:.0f} ({nbytes / us / 1e6 / bandwidth:.0%})")  # bytes per µs / 1e6 = TB/s
            fp8_triton.row_launch_config = rope_triton.row_launch_config = default
            fp8_triton.split_launch_config = default_split
            fp8_triton.norm_rows_launch_config = default_rows
            warps, tuned = _warps_columns(case, name, cols, kind)
            row["default_warps"], row["tuned_warps"] = warps, tuned
            results["rows"].append(row)  # type: ignore[attr-defined]
            lines.append(f"| {case} | {name} | {warps} | {tuned} | " + " | ".join(cells) + " |")
            log.info(lines[-1])
    (args.out / "row_kernels.json").write_text(json.dumps(results, indent=1))
    (args.out / "row_kernels.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out / "row_kernels.md")


if __name__ == "__main__":
    main()
