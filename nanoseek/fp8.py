"""FP8 (E4M3) block quantisation, DeepSeek-V3 style.

DeepSeek-V3 stores its released weights as float8_e4m3fn with one FP32 scale per 128x128 block
(`<name>_scale_inv`, which despite the name is the *multiplier* used to dequantise). Shapes that are not
a whole number of blocks (kv_a_proj_with_mqa is 576 x 7168, a 5 x 56 scale grid) have ragged edge blocks:
the scale of a partial block covers only the rows/columns that exist.
"""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
BLOCK = 128


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    pr, pc = (-rows) % block, (-cols) % block
    if pr or pc:
        w = torch.nn.functional.pad(w, (0, pc, 0, pr))
    return w


def block_dequant(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, dtype=torch.float32) -> torch.Tensor:
    """Dequantise a 2-D block-quantised weight: `w[i, j] * scale_inv[i // block, j // block]`.

    Ragged edge blocks are handled by padding to whole blocks and cropping back.
    """
    if w.dim() != 2:
        raise ValueError(f"block_dequant expects a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match the {block}x{block} block grid {grid} "
            f"of a weight of shape {(rows, cols)}"
        )
    wp = _pad_to_blocks(w.to(torch.float32), block)  # [R, C], multiples of block
    R, C = wp.shape
    wp = wp.view(R // block, block, C // block, block) * scale_inv.to(torch.float32)[:, None, :, None]
    return wp.view(R, C)[:rows, :cols].to(dtype)


def block_quant(
    w: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight to E4M3 with one scale per `block` x `block` tile (online amax).

    Returns `(w_fp8, scale_inv)` with `w ~= w_fp8.float() * scale_inv[block grid]`, the checkpoint layout.
    `pow2_scale` rounds each scale up to a power of two (DeepSeek's `ue8m0` format), which makes the
    scaling itself exact.
    """
    if w.dim() != 2:
        raise ValueError(f"block_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    wp = _pad_to_blocks(w.to(torch.float32), block)
    R, C = wp.shape
    tiles = wp.view(R // block, block, C // block, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-4)  # [R/b, C/b]; floor as in the reference kernel
    scale = amax / E4M3_MAX
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(R, C)[:rows, :cols].contiguous(), scale
