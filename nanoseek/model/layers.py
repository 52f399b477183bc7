"""Small building blocks: RMSNorm, a dtype-following Linear, the SwiGLU MLP, a memory-lean cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / rms(x) * weight in x's dtype, 1/rms(x) [..., 1] in fp32), computed in fp32."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * r * weight.float()).to(x.dtype), r


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm that keeps only its input and the per-row 1/rms for backward and recomputes the normalised
    activations there, as DeepSeek-V3 recomputes every RMSNorm in backward instead of storing its output:
    autograd through the plain ops would also keep the fp32 normalised tensor (one more activation-sized
    buffer per norm)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, r = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        n = x.float() * r  # the normalised input, recomputed
        g = dy.float()
        dw = (g * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gw = g * weight.float()
        # d/dx of n = x r with r = (mean(x²) + eps)^-1/2:  dx = r (gw - n · mean(gw n))
        dx = (r * (gw - n * (gw * n).mean(-1, keepdim=True))).to(x.dtype) if ctx.needs_input_grad[0] else None
        return dx, dw, None


class _CrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy over rows of `logits` [N, V] computed in fp32, keeping the logits in their own dtype
    (bf16 under autocast) plus one fp32 log-sum-exp per row for backward, instead of the fp32 log-probabilities
    `F.cross_entropy(logits.float())` keeps: half the bytes of the largest activation of a small model. Rows are
    processed in chunks of ~4M elements, so no full fp32 copy of the logits is ever materialised and each fp32
    buffer stays small enough for the allocator to reuse. Targets of -100 are ignored, as in `F.cross_entropy`."""

    CHUNK_ELEMENTS = 1 << 22

    @staticmethod
    def _chunks(logits: torch.Tensor):
        rows = max(1, _CrossEntropyFunction.CHUNK_ELEMENTS // logits.shape[1])
        return [slice(i, i + rows) for i in range(0, logits.shape[0], rows)]

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != -100
        safe = targets.clamp_min(0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(lse)
        for sl in _CrossEntropyFunction._chunks(logits):
            z = logits[sl].float()
            lse[sl] = torch.logsumexp(z, -1)
            picked[sl] = z.gather(1, safe[sl, None]).squeeze(1)
        n = valid.sum()
        ctx.save_for_backward(logits, safe, valid, lse, n)
        return ((lse - picked) * valid).sum() / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, safe, valid, lse, n = ctx.saved_tensors
        dz = torch.empty_like(logits)
        scale = ((grad.float() / n) * valid)[:, None]  # [N, 1]
        for sl in _CrossEntropyFunction._chunks(logits):
            p = (logits[sl] - lse[sl, None]).exp_().mul_(scale[sl])  # fp32 (promoted) softmax, recomputed, scaled
            dz[sl] = p.scatter_add_(1, safe[sl, None], -scale[sl])
        return dz, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), targets)` (mean over rows, -100 ignored) with fp32 math but
    activation memory in the logits' dtype; see `_CrossEntropyFunction`."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropyFunction.apply(logits, targets)
    return F.cross_entropy(logits.float(), targets)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the activation dtype (norms stay high precision in the recipe)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return _rms_norm(x, self.weight, self.eps)[0]

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
