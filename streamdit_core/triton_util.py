"""Plumbing shared by the package's Triton-backed operators (``fp8_quant``, ``qk_rope``): the lazy import of a
kernel module, with the reason recorded where Triton cannot be used, and the launch configuration of the
one-program-per-row kernels. Importing this module never imports Triton."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "NORM_ROWS_MAX_VALUES",
    "TUNED_WARPS",
    "default_warps",
    "import_launchers",
    "norm_kind",
    "norm_rows",
    "norm_rows_launch_config",
    "not_loaded",
    "row_launch_config",
    "split_blocks",
    "split_launch_config",
]


def import_launchers(module: str, names: Sequence[str]) -> tuple[tuple[Callable[..., Any], ...] | None, str | None]:
    """Import the launchers ``names`` of the kernel module ``streamdit_core.<module>`` (which imports Triton).

    Returns:
        ``(launchers, None)``, or ``(None, why)`` when Triton is missing or unusable or this torch has no
        ``torch.library.triton_op`` (the operators then run their reference implementations).
    """
    try:
        kernels = importlib.import_module(f"{__package__}.{module}")
        if not hasattr(torch.library, "triton_op"):
            raise RuntimeError(f"torch {torch.__version__} has no torch.library.triton_op")
        return tuple(getattr(kernels, name) for name in names), None
    except (ImportError, OSError, RuntimeError) as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def not_loaded(*args: Any, **kwargs: Any) -> Any:
    """Stands in for a launcher until its kernel module is imported."""
    raise RuntimeError("the Triton kernels are not loaded")


# Measured warp counts of the row kernels where they beat the default rule by ≥ 2.5 % (``perf.PerfOptions.tuned_warps``,
# item ``warps``): {(kernel, row width): num_warps}, from the H100 sweep in docs/bench/h100_row_kernels/row_kernels.md
# (µs per launch at 16,384 × 3,072 rows, FFN 7,680, for paper-4b; 24,960 × 1,536, FFN 8,960, for Wan 1.3B; the
# default's in brackets). Only the measured widths: other widths keep the default.
# Kernels (``norm_kind`` names the LayerNorm kernel's configurations):
#   norm_modulate_quant        LayerNorm + modulation + fp8 (norm1): 3,072 → 4 (90 µs [8: 104]); 1,536 → 2 (69 [4: 75])
#   residual_gate_affine_quant residual + gate + affine LayerNorm + fp8 (norm3): 3,072 → 4 (126 [137]); 1,536 → 2
#                              (96 [102])
#   residual_modulate_quant    residual + LayerNorm + modulation + fp8 (norm2): 1,536 → 2 (104 [109]); at 3,072 the
#                              default 8 is the best
#   residual_modulate          the same in bf16 (normfuse): 1,536 → 8 (106 [113]); at 3,072 within 1 % of the default
#   gelu_quant                 bias + GELU + fp8 (FFN hidden, whole rows): 7,680 → 4 (152 [16: 156]); 8,960 → 8 (461
#                              [16: 475])
#   qkv_rope                   q/k RMS norm + RoPE + gather, v gather (qkrope): 3,072 → 4 (219 [8: 235]); 1,536 → 2
#                              (169 [4: 178])
#   residual_gate_modulate_quant  residual + gate + LayerNorm + modulation + fp8 (norm1 with crossres): 3,072 → 2 (158
#                              [8: 166]); 1,536 → 2 (115 [4: 119]); from the later sweep in
#                              docs/bench/h100_outquant_fuseadds/row_kernels.md
#   gelu_quant_split           the GELU row held as two pieces (``split_launch_config``, item ``splitrows``): 8,960 as
#                              8,192 + 1,024 → 4 (258 [16: 269]; whole row at 8 warps: 463); from the sweep in
#                              docs/bench/h100_splitrows/row_kernels.md (the whole row's entries do not apply here)
#   norm_modulate_quant_rows4  norm1 with 4 rows of one frame per program (``norm_rows_launch_config``, item
#                              ``normrows``): 3,072 → 4 (99 µs [16: 152]; 8: 99); 1,536 → 4 (67 [16: 99]); from the
#                              sweep in docs/bench/h100_splitrows/row_kernels.md (the one-row entries do not apply here)
#   residual_gate_modulate_quant_rows4  norm1 with crossres, 4 rows per program: 3,072 → 8 (142 [16: 191]); 1,536 → 4
#                              (102 [16: 134]); the same sweep
# Warps change how a row is spread over the threads, not the maths: the kernels' values are the same (the reductions'
# order may differ, a float32 rounding; see tests/test_fused_quant.py).
TUNED_WARPS: dict[tuple[str, int], int] = {
    ("norm_modulate_quant", 3072): 4,
    ("norm_modulate_quant", 1536): 2,
    ("residual_gate_affine_quant", 3072): 4,
    ("residual_gate_affine_quant", 1536): 2,
    ("residual_modulate_quant", 1536): 2,
    ("residual_modulate", 1536): 8,
    ("gelu_quant", 7680): 4,
    ("gelu_quant", 8960): 8,
    ("gelu_quant_split", 8960): 4,
    ("qkv_rope", 3072): 4,
    ("qkv_rope", 1536): 2,
    ("residual_gate_modulate_quant", 3072): 2,
    ("residual_gate_modulate_quant", 1536): 2,
    ("norm_modulate_quant_rows4", 3072): 4,
    ("norm_modulate_quant_rows4", 1536): 4,
    ("residual_gate_modulate_quant_rows4", 3072): 8,
    ("residual_gate_modulate_quant_rows4", 1536): 4,
}


def norm_kind(residual: bool, gate: bool, affine: bool, modulation: bool, quantize: bool) -> str:
    """The LayerNorm row kernel's configuration as ``TUNED_WARPS`` names it: ``[residual_][gate_][affine_]``
    ``[modulate_]quant`` (or without ``_quant``/``quant`` for the bf16 store), e.g. ``norm_modulate_quant`` (norm1),
    ``residual_gate_affine_quant`` (norm3), ``residual_modulate_quant`` (norm2)."""
    parts = ["residual"] if residual else ["norm"]
    parts += [name for name, on in (("gate", gate), ("affine", affine), ("modulate", modulation)) if on]
    return "_".join(parts + (["quant"] if quantize else []))


def default_warps(values: int) -> int:
    """The default warp count of a row kernel holding ``values`` lanes in registers (a block, or the two pieces of a
    split row together): ``values // 512`` rounded down to a power of two, within 4-16, so 16-32 float32 values
    per thread at the model's widths (for a power-of-two block, ``min(16, max(4, block // 512))``)."""
    per_512 = max(1, values // 512)
    return min(16, max(4, 1 << (per_512.bit_length() - 1)))


def row_launch_config(n_cols: int, kind: str | None = None, tuned: bool = False) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of a kernel that holds a row of ``n_cols`` values in registers: BLOCK the next power
    of two ≥ ``n_cols``, by default 16-32 float32 values per thread at the model's widths. With ``tuned`` the
    warp count measured for the kernel ``kind`` at this width (``TUNED_WARPS``) where there is one."""
    block = 1 << max(0, n_cols - 1).bit_length()
    warps = default_warps(block)
    if tuned and kind is not None:
        warps = TUNED_WARPS.get((kind, n_cols), warps)
    return block, warps


def split_blocks(n_cols: int) -> tuple[int, int]:
    """``(BLOCK, BLOCK2)`` of a row of ``n_cols`` values held in registers as two power-of-two pieces (item
    ``splitrows``): ``BLOCK`` the largest power of two ≤ ``n_cols`` (every lane in the row), ``BLOCK2`` the next
    power of two ≥ the rest ``n_cols - BLOCK`` (0 without a rest) — but only where the two pieces together are
    smaller than the whole row's block (the next power of two ≥ ``n_cols``); elsewhere ``(that block, 0)``, the
    whole row. E.g. Wan 1.3B's FFN 8,960 → (8,192, 1,024): 9,216 lanes, 97 % active, instead of 16,384, 55 %;
    the paper's 7,680 → (8,192, 0) (4,096 + 4,096 would gain nothing); 3,072 → (2,048, 1,024); powers of two
    whole."""
    whole = 1 << max(0, n_cols - 1).bit_length()
    block = 1 << (max(1, n_cols).bit_length() - 1)
    rest = n_cols - block
    block2 = 1 << (rest - 1).bit_length() if rest > 0 else 0
    return (block, block2) if block2 and block + block2 < whole else (whole, 0)


def split_launch_config(n_cols: int, kind: str | None = None, tuned: bool = False) -> tuple[int, int, int]:
    """``(BLOCK, BLOCK2, num_warps)`` of a row kernel that may hold its row as two pieces (``split_blocks``):
    where it splits, the warp count of :func:`default_warps` for ``BLOCK + BLOCK2`` lanes, or with ``tuned`` the
    one measured for ``f"{kind}_split"`` at this width where ``TUNED_WARPS`` has one (the whole row's entry is not
    used); where it does not, :func:`row_launch_config`'s ``(BLOCK, num_warps)`` with ``BLOCK2 = 0``."""
    block, block2 = split_blocks(n_cols)
    if not block2:
        block, warps = row_launch_config(n_cols, kind, tuned)
        return block, 0, warps
    warps = default_warps(block + block2)
    if tuned and kind is not None:
        warps = TUNED_WARPS.get((f"{kind}_split", n_cols), warps)
    return block, block2, warps


# The most values a multi-row LayerNorm program holds (``norm_rows``): ROWS·BLOCK ≤ 16,384, so at most 32 float32
# values per thread at 16 warps, like the one-row kernels at the model's widths.
NORM_ROWS_MAX_VALUES = 16384


def norm_rows(tokens_per_frame: int, n_rows: int, n_cols: int) -> int:
    """Rows per program of the LayerNorm kernel with per-frame rows (gate, modulation) under the item ``normrows``
    (``perf.PerfOptions.norm_rows``): 4 where 4 divides both ``tokens_per_frame`` (so a program's rows share one
    frame and its per-frame rows, loaded once) and ``n_rows``, else 2 where 2 does, else 1 (one row per program,
    the unchanged kernel) — each only while ``ROWS·BLOCK`` (BLOCK the next power of two ≥ ``n_cols``) stays within
    ``NORM_ROWS_MAX_VALUES``. E.g. the paper's 1,024 tokens per frame (16,384 rows × 3,072) → 4, Wan 1.3B's 1,560
    (24,960 × 1,536) → 4, 1,022 → 2, an odd number of tokens per frame → 1."""
    block = 1 << max(0, n_cols - 1).bit_length()
    for rows in (4, 2):
        if tokens_per_frame % rows == 0 and n_rows % rows == 0 and rows * block <= NORM_ROWS_MAX_VALUES:
            return rows
    return 1


def norm_rows_launch_config(n_cols: int, rows: int, kind: str | None = None, tuned: bool = False) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of the LayerNorm kernel holding ``rows`` rows of ``n_cols`` values (``norm_rows``):
    BLOCK as in :func:`row_launch_config`, the warps of :func:`default_warps` for the ``rows·BLOCK`` tile (at most
    16; e.g. 4 × 4,096 → 16, 4 × 2,048 → 16, 2 × 2,048 → 8), or with ``tuned`` the one measured for
    ``f"{kind}_rows{rows}"`` at this width where ``TUNED_WARPS`` has one (e.g. ``norm_modulate_quant_rows4`` at
    3,072 → 4; the one-row entries of ``kind`` are not used)."""
    block = 1 << max(0, n_cols - 1).bit_length()
    warps = default_warps(rows * block)
    if tuned and kind is not None:
        warps = TUNED_WARPS.get((f"{kind}_rows{rows}", n_cols), warps)
    return block, warps
