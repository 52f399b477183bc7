"""Rotary position embedding with DeepSeek's YaRN extension.

Only the decoupled rope part of each head (qk_rope_head_dim) rotates in MLA. The V3 weights assume the
*interleaved* layout: adjacent pairs (x[2i], x[2i+1]) rotate together (DeepSeek's `view_as_complex`).
transformers computes the same rotation and returns the halves de-interleaved; since q and k receive the same
permutation, q·k, and so every attention score, is identical.

YaRN (factor s, original length L0, beta_fast/beta_slow) keeps high-frequency dims, divides low-frequency dims
by s, and blends linearly in between; the attention logits get an mscale² correction (see `softmax_scale`).
We follow transformers' semantics (YaRN applies whenever rope_type == "yarn"), which DeepSeek's reference
matches for sequences longer than L0.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_frequencies(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [dim/2] (fp32) and the cos/sin amplitude factor."""
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    if cfg.rope_type != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor = cfg.rope_factor

    def corr_dim(rot: float) -> float:
        return dim * math.log(cfg.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(corr_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (unchanged frequency), 0 = interpolate (divided by factor)
    inv = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    if cfg.mscale and cfg.mscale_all_dim:
        amp = yarn_get_mscale(factor, cfg.mscale) / yarn_get_mscale(factor, cfg.mscale_all_dim)
    else:
        amp = yarn_get_mscale(factor)
    return inv, amp


def softmax_scale(cfg: ModelConfig, head_dim: int) -> float:
    """1/sqrt(d) times YaRN's mscale² (V3: 0.0721688 -> 0.1352338)."""
    scale = head_dim**-0.5
    if cfg.rope_type == "yarn" and cfg.mscale_all_dim:
        m = yarn_get_mscale(cfg.rope_factor, cfg.mscale_all_dim)
        scale = scale * m * m
    return scale


class Rotary:
    """Computes (cos, sin) for given positions on the fly: no [max_len, dim] table, so any length works
    and meta-device construction allocates nothing."""

    def __init__(self, cfg: ModelConfig, dim: int):
        self.dim = dim
        self.interleave = cfg.rope_interleave
        self.inv_freq, self.amp = inv_frequencies(cfg, dim)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] or [T] -> cos, sin [B|1, T, 1, dim/2] in fp32 (the 1 broadcasts over heads)."""
        dev = positions.device
        if dev not in self._cache:
            self._cache[dev] = self.inv_freq.to(dev)
        if positions.dim() == 1:
            positions = positions[None]
        freqs = positions[..., None].float() * self._cache[dev]  # [B, T, dim/2]
        return (freqs.cos() * self.amp)[:, :, None], (freqs.sin() * self.amp)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate x [B, T, H, D] by per-position angles (cos/sin [B|1, T, 1, D/2]); math in fp32."""
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:  # half-split layout (rotate_half), for checkpoints saved with rope_interleave = false
        half = xf.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
