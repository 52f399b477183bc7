"""Small building blocks: RMSNorm, a dtype-following Linear, and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the activation dtype (norms stay high precision in the recipe)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Linear(nn.Linear):
    """A bias-free Linear whose weight follows the activation dtype.

    Master weights stay fp32; under bf16 compute the weight is cast once per call (each weight is used once
    per forward, so this is once per step). The FP8 recipe swaps these modules for `Fp8Linear`.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class MLP(nn.Module):
    """SwiGLU feed-forward `down(silu(gate(x)) * up(x))`: the dense layers and the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter)
        self.up_proj = Linear(dim, inter)
        self.down_proj = Linear(inter, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
