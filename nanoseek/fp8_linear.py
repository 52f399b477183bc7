"""FP8 GEMMs with DeepSeek-V3's tiling: the Linear, the routed experts, and the model conversion.

Every GEMM of a Linear consumes E4M3 operands with fine-grained scales and accumulates in fp32:

    Fprop  y  = x · Wᵀ     x: 1x128 tiles (per token)        W: 128x128 blocks
    Dgrad  dx = dy · W     dy: 1x128 tiles (per token)       W: 128x128 blocks
    Wgrad  dW = dyᵀ · x    dy, x: 128x1 tiles (per 128 tokens, per channel), along the contracted tokens

Outputs come back in the activation dtype (bf16/fp32); dW in fp32 (master weights and their grads stay fp32).
The activation saved for backward is the FP8 copy plus its scales, not the bf16/fp32 tensor, and Wgrad
re-tiles it 1x128 -> 128x1 (dequantise, requantise), as the recipe does. The o_proj input may instead be
cached in E5M6 with power-of-two scales (`Fp8Config(cache_format="e5m6")`).

Backends, chosen per call:
- CUDA: `torch.nn.functional.scaled_mm` with BlockWise1x128 / BlockWise128x128 scales (SM90 in torch
  2.13), else per-128-K-block FP8 GEMMs with unit scales and fp32 output, rescaled and summed in fp32 (the
  recipe's N_C = 128 promotion, done by hand), else the emulation. Each candidate is checked once against
  the emulation on a small problem before it is trusted.
- Otherwise (CPU), exact emulation: dequantise both operands to fp32 (value * scale, exact up to the fp32
  rounding of the product) and run one fp32-accurate GEMM (as bf16 passes via oneDNN when `fp32_gemm_mode`
  finds that accurate). With power-of-two scales every dequantised E4M3 value is a bf16 number, so Fprop/Dgrad
  with bf16 outputs use a plain bf16 GEMM, which accumulates in fp32 and rounds once, i.e. is exact too.
  docs/fp8.md has the measurements behind this choice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import Tile, TILE_1x128, TILE_128x1, TILE_128x128, dequantize, fake_quant, fp32_gemm_mode, quantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fp8Config:
    """granularity: "block" (1x128 / 128x1 activation tiles, 128x128 weight blocks) or "tensor" (one scale
    per GEMM operand: the per-tensor baseline). pow2_scale: round scales up to powers of two.
    cache_format: format of the Linear input saved for Wgrad, "e4m3" or "e5m6" (the recipe's o_proj)."""

    granularity: str = "block"
    pow2_scale: bool = False
    cache_format: str = "e4m3"

    def __post_init__(self):
        if self.granularity not in ("block", "tensor"):
            raise ValueError(f"granularity must be 'block' or 'tensor', got {self.granularity!r}")
        if self.cache_format not in ("e4m3", "e5m6"):
            raise ValueError(f"cache_format must be 'e4m3' or 'e5m6', got {self.cache_format!r}")

    @property
    def act(self) -> Tile | None:
        return TILE_1x128 if self.granularity == "block" else None

    @property
    def act_t(self) -> Tile | None:
        return TILE_128x1 if self.granularity == "block" else None

    def weight(self, w: torch.Tensor) -> Tile:  # per-tensor = one tile covering each matrix (each expert)
        return TILE_128x128 if self.granularity == "block" else tuple(w.shape[-2:])


def _operand_dtype(cfg: Fp8Config, out_dtype: torch.dtype) -> torch.dtype:
    """bf16 operands are exact only when every scale is a power of two; the output must be bf16 as well."""
    return torch.bfloat16 if cfg.pow2_scale and out_dtype == torch.bfloat16 else torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    with fp32_gemm_mode(a.device):
        return torch.matmul(a, b).to(out_dtype)


# ---------------------------------------------------------------------------------------- CUDA backends
_CUDA_BACKENDS: dict[tuple, str] = {}


def _pad_fp8(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if not rows and not cols:
        return q
    return F.pad(q.view(torch.uint8), (0, cols, 0, rows)).view(q.dtype)


def _cuda_run(backend: str, qa, sa, qb, sb, b_tile: Tile | None, out_dtype) -> torch.Tensor:
    """(qa*sa) @ (qb*sb)ᵀ on CUDA. qa [M, K] has 1x128 scales sa [M, ceil(K/128)] (or one scale), qb [N, K]
    has b_tile scales: 128x128 -> [ceil(N/128), ceil(K/128)], 1x128 -> [N, ceil(K/128)], None -> one."""
    M, K = qa.shape
    N = qb.shape[0]
    if backend == "emulate":
        a = dequantize(qa, sa, TILE_1x128 if b_tile else None, nan_codes=False)
        return _mm(a, dequantize(qb, sb, b_tile, nan_codes=False).t(), out_dtype)
    if backend == "tensorwise":
        pm, pk, pn = -M % 16, -K % 16, -N % 16
        y = torch._scaled_mm(
            _pad_fp8(qa, pm, pk),
            _pad_fp8(qb, pn, pk).t(),
            scale_a=sa.reshape(()).float(),
            scale_b=sb.reshape(()).float(),
            out_dtype=out_dtype,
        )
        return y[:M, :N]
    blocked = b_tile == TILE_128x128
    pm, pk, pn = -M % 16, -K % 128, -N % (128 if blocked else 16)
    qa, qb = _pad_fp8(qa, pm, pk), _pad_fp8(qb, pn, pk)
    sa = F.pad(sa.float(), (0, 0, 0, pm), value=1.0)
    if not blocked:
        sb = F.pad(sb.float(), (0, 0, 0, pn), value=1.0)
    KB = qa.shape[1] // 128
    if backend == "blockwise":
        recipe = F.ScalingType
        if blocked:  # [L4, N/128] with stride [1, L4]: K blocks padded to a multiple of 4, "outer-dim major"
            sb_l = F.pad(sb.float(), (0, -KB % 4), value=1.0).contiguous().t()
        else:
            sb_l = sb.t().contiguous().t()
        y = F.scaled_mm(
            qa,
            qb.t(),
            sa.t().contiguous().t(),
            recipe.BlockWise1x128,
            sb_l,
            recipe.BlockWise128x128 if blocked else recipe.BlockWise1x128,
            output_dtype=out_dtype,
        )
        return y[:M, :N]
    if backend == "kblock":  # unit-scale FP8 GEMM per 128-wide K block, promoted to fp32 and rescaled
        sb_rows = sb.float().repeat_interleave(128, 0)[: qb.shape[0]] if blocked else sb.float()
        one = torch.ones((), device=qa.device)
        y = torch.zeros(qa.shape[0], qb.shape[0], device=qa.device)
        for k in range(KB):
            ks = slice(128 * k, 128 * (k + 1))
            p = torch._scaled_mm(qa[:, ks], qb[:, ks].t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            y.addcmul_(p, sa[:, k, None] * sb_rows[None, :, k])
        return y[:M, :N].to(out_dtype)
    raise ValueError(f"unknown backend {backend!r}")


def _cuda_backend(device: torch.device, b_tile: Tile | None, out_dtype: torch.dtype) -> tuple[tuple, str]:
    """Pick (once per device / tiling / output dtype) the first backend that matches the emulation."""
    kind = "tensor" if b_tile is None else ("128x128" if b_tile == TILE_128x128 else "1x128")
    key = (device.index, kind, out_dtype)
    if key in _CUDA_BACKENDS:
        return key, _CUDA_BACKENDS[key]
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(200, 320, device=device, generator=g) * torch.rand(200, 1, device=device, generator=g) * 8
    b = torch.randn(260, 320, device=device, generator=g) * torch.rand(1, 320, device=device, generator=g)
    qa, sa = quantize(a, TILE_1x128 if b_tile else None)
    qb, sb = quantize(b, b_tile)
    ref = _cuda_run("emulate", qa, sa, qb, sb, b_tile, torch.float32)
    chosen = "emulate"
    for cand in ("tensorwise",) if b_tile is None else ("blockwise", "kblock"):
        try:
            y = _cuda_run(cand, qa, sa, qb, sb, b_tile, out_dtype).float()
            if bool(((y - ref).norm() / ref.norm()) < 1e-2):
                chosen = cand
                break
            log.warning("fp8: CUDA backend %s disagrees with the emulation for %s; skipped", cand, key)
        except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as e:
            log.info("fp8: CUDA backend %s unavailable for %s: %s", cand, key, str(e).splitlines()[0])
    _CUDA_BACKENDS[key] = chosen
    return key, chosen


def _qmm_nt(qa, sa, qb, sb, b_tile: Tile | None, out_dtype) -> torch.Tensor:
    """CUDA GEMM on quantised operands in canonical layout (see `_cuda_run`); falls back if a kernel fails."""
    key, backend = _cuda_backend(qa.device, b_tile, out_dtype)
    try:
        return _cuda_run(backend, qa, sa, qb, sb, b_tile, out_dtype)
    except RuntimeError as e:  # a shape the probe did not cover: remember, and emulate from now on
        log.warning("fp8: CUDA backend %s failed (%s); using the emulation", backend, str(e).splitlines()[0])
        _CUDA_BACKENDS[key] = "emulate"
        return _cuda_run("emulate", qa, sa, qb, sb, b_tile, out_dtype)


# -------------------------------------------------------------------------------------- the three GEMMs
def _use_kernels(t: torch.Tensor) -> bool:
    """Real FP8 GEMMs (CUDA); everything else runs the emulation. Tests patch this to exercise the layouts."""
    return t.is_cuda


def _fprop(qx, sx, qw, sw, cfg: Fp8Config, out_dtype) -> torch.Tensor:
    if _use_kernels(qx):
        return _qmm_nt(qx, sx, qw, sw, TILE_128x128 if cfg.granularity == "block" else None, out_dtype)
    dt = _operand_dtype(cfg, out_dtype)
    return _mm(
        dequantize(qx, sx, cfg.act, dt, nan_codes=False),
        dequantize(qw, sw, cfg.weight(qw), dt, nan_codes=False).t(),
        out_dtype,
    )


def _dgrad(qdy, sdy, qw, sw, cfg: Fp8Config, out_dtype) -> torch.Tensor:
    if _use_kernels(qdy):
        b_tile = TILE_128x128 if cfg.granularity == "block" else None
        return _qmm_nt(qdy, sdy, qw.t().contiguous(), sw.t().contiguous(), b_tile, out_dtype)
    dt = _operand_dtype(cfg, out_dtype)
    return _mm(
        dequantize(qdy, sdy, cfg.act, dt, nan_codes=False),
        dequantize(qw, sw, cfg.weight(qw), dt, nan_codes=False),
        out_dtype,
    )


def _wgrad(dy: torch.Tensor, x: torch.Tensor, cfg: Fp8Config) -> torch.Tensor:
    """dW = Q(dy)ᵀ Q(x) in fp32, both operands tiled 128x1 (along the contracted tokens). An input cached in
    E5M6 (o_proj) is re-tiled with power-of-two scales, as the recipe has it."""
    qdy, sdy = quantize(dy, cfg.act_t, pow2_scale=cfg.pow2_scale)
    qx, sx = quantize(x, cfg.act_t, pow2_scale=cfg.pow2_scale or cfg.cache_format == "e5m6")
    if _use_kernels(dy):  # canonical layout: tokens last, so the 128x1 tiles become 1x128 tiles
        b_tile = TILE_1x128 if cfg.granularity == "block" else None
        return _qmm_nt(qdy.t().contiguous(), sdy.t(), qx.t().contiguous(), sx.t(), b_tile, torch.float32)
    return _mm(
        dequantize(qdy, sdy, cfg.act_t, nan_codes=False).t(),
        dequantize(qx, sx, cfg.act_t, nan_codes=False),
        torch.float32,
    )


# ------------------------------------------------------------------------------------------ FP8 Linear
class Fp8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ with all three GEMMs on FP8 operands; saves the FP8 input and its scales, not x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, cfg: Fp8Config) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        qx, sx = quantize(x2, cfg.act, pow2_scale=cfg.pow2_scale)
        qw, sw = quantize(weight, cfg.weight(weight), pow2_scale=cfg.pow2_scale)
        y = _fprop(qx, sx, qw, sw, cfg, x.dtype)
        if cfg.cache_format == "e5m6":
            qx, sx = quantize(x2, cfg.act, fmt="e5m6")
        ctx.save_for_backward(qx, sx, weight)  # the weight is the parameter itself: no extra memory
        ctx.cfg, ctx.x_shape, ctx.x_dtype = cfg, x.shape, x.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qx, sx, weight = ctx.saved_tensors
        cfg = ctx.cfg
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            qw, sw = quantize(weight, cfg.weight(weight), pow2_scale=cfg.pow2_scale)  # recomputed, not saved
            qdy, sdy = quantize(dy2, cfg.act, pow2_scale=cfg.pow2_scale)
            dx = _dgrad(qdy, sdy, qw, sw, cfg, ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            x_hat = dequantize(qx, sx, cfg.act, nan_codes=False)  # the cached copy, re-tiled 128x1 inside _wgrad
            dw = _wgrad(dy2, x_hat, cfg).to(weight.dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, config: Fp8Config | None = None) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) with FP8 operands in all three GEMMs; see `Fp8LinearFunction`.

    Under autocast the input is first cast to the autocast dtype, as autocast does for `F.linear`: autocast
    does not reach inside a custom Function, and an fp32 output would make the ops after it (SwiGLU, residual
    adds) save fp32 activations, undoing much of FP8's memory saving."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(dev))
    return Fp8LinearFunction.apply(x, weight, config or Fp8Config())


class Fp8Linear(nn.Linear):
    """Bias-free Linear running `fp8_linear`; the weight stays a high-precision (fp32 master) Parameter."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        config: Fp8Config | None = None,
    ):
        if bias:
            raise ValueError("Fp8Linear has no bias (none of DeepSeek-V3's projections has one)")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.fp8 = config or Fp8Config()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8Config | None = None) -> Fp8Linear:
        """Wrap `linear`'s weight Parameter itself (same object: optimizer state and sharing are kept)."""
        if linear.bias is not None:
            raise ValueError("Fp8Linear.from_linear: the Linear has a bias, which Fp8Linear does not support")
        m = cls(linear.in_features, linear.out_features, device="meta", config=config)
        m.weight = linear.weight
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.fp8)

    def extra_repr(self) -> str:
        c = self.fp8
        return f"{super().extra_repr()}, fp8={c.granularity}{', pow2' if c.pow2_scale else ''}, cache={c.cache_format}"


# ----------------------------------------------------------------------------------- FP8 routed experts
class _Groups:
    """Rows sorted by expert: either equal-capacity buckets [E, C, .] for one bmm (in bf16 faster than grouped
    GEMMs on the CPUs we measured; cheap when loads are balanced) or, for skewed loads, a loop over expert
    slices. Both tile the token dimension per expert from its first row, so they give the same numbers."""

    def __init__(self, counts: torch.Tensor, rows: int, impl: str = "auto"):
        self.E = counts.numel()
        self.counts = [int(c) for c in counts.tolist()]
        self.cap = max(self.counts, default=0)
        if impl not in ("auto", "bmm", "loop"):
            raise ValueError(f"impl must be auto|bmm|loop, got {impl!r}")
        if impl == "auto":
            impl = "bmm" if self.E * self.cap <= 2 * max(rows, 1) else "loop"
        self.impl = impl
        if impl == "bmm":
            dev = counts.device
            starts = counts.cumsum(0) - counts
            expert = torch.repeat_interleave(torch.arange(self.E, device=dev), counts, output_size=rows)
            self.expert, self.pos = expert, torch.arange(rows, device=dev) - starts[expert]
            self.slot = self.expert * self.cap + self.pos

    def pad(self, t: torch.Tensor, cap: int = 0) -> torch.Tensor:  # [rows, K] -> [E, cap, K]
        cap = cap or self.cap
        slot = self.slot if cap == self.cap else self.expert * cap + self.pos
        return t.new_zeros(self.E * cap, t.shape[1]).index_copy_(0, slot, t).view(self.E, cap, -1)

    def mm(self, a: torch.Tensor, w: torch.Tensor, out_dtype) -> torch.Tensor:
        """a [rows, K] (dequantised) times w[e] [K, N] for each row's expert -> [rows, N]."""
        with fp32_gemm_mode(a.device):
            if self.impl == "bmm":
                y = torch.bmm(self.pad(a), w).view(self.E * self.cap, -1)[self.slot]
            else:
                y = torch.cat([a_e @ w[e] for e, a_e in enumerate(a.split(self.counts))])
        return y.to(out_dtype)

    def wgrad(self, a: torch.Tensor, b: torch.Tensor, cfg: Fp8Config) -> torch.Tensor:
        """dW[e] = Q(a_e)ᵀ Q(b_e) in fp32, a [rows, K1], b [rows, K2], 128x1 tiles per expert's tokens."""
        if cfg.granularity == "tensor":  # one scale per operand, over all experts' rows
            a, b = (fake_quant(t, None, pow2_scale=cfg.pow2_scale, dtype=torch.float32) for t in (a, b))

            def fq(t):
                return t.float()
        else:

            def fq(t):
                return fake_quant(t, TILE_128x1, pow2_scale=cfg.pow2_scale, dtype=torch.float32)

        with fp32_gemm_mode(a.device):
            if self.impl == "bmm":  # buckets of whole 128-token tiles: no second padding inside fq
                cap = -(-self.cap // 128) * 128
                return torch.bmm(fq(self.pad(a, cap)).transpose(1, 2), fq(self.pad(b, cap)))
            out = a.new_zeros(self.E, a.shape[1], b.shape[1], dtype=torch.float32)
            for e, (a_e, b_e) in enumerate(zip(a.split(self.counts), b.split(self.counts))):
                if a_e.shape[0]:
                    out[e] = fq(a_e).t() @ fq(b_e)
            return out


def _fq_expert_weight(w: torch.Tensor, cfg: Fp8Config, dtype, halves: bool = False) -> torch.Tensor:
    """Per-expert 128x128 blocks; gate and up of w13 are quantised separately, like the checkpoint's w1/w3."""
    if halves:
        I = w.shape[-1] // 2
        return torch.cat([_fq_expert_weight(w[..., :I], cfg, dtype), _fq_expert_weight(w[..., I:], cfg, dtype)], -1)
    return fake_quant(w, cfg.weight(w), pow2_scale=cfg.pow2_scale, dtype=dtype)


def _experts_forward(xs, w13, w2, counts, cfg: Fp8Config, impl: str):
    """The six-GEMM SwiGLU experts' forward: (out, FP8-cached (qx, sx, qh, sh), the impl chosen)."""
    T = xs.shape[0]
    I = w13.shape[-1] // 2
    groups = _Groups(counts, T, impl)
    dt = _operand_dtype(cfg, xs.dtype)
    qx, sx = quantize(xs, cfg.act, pow2_scale=cfg.pow2_scale)
    h = groups.mm(
        dequantize(qx, sx, cfg.act, dt, nan_codes=False), _fq_expert_weight(w13, cfg, dt, halves=True), xs.dtype
    )
    qh, sh = quantize(h.view(T, 2, I), cfg.act, pow2_scale=cfg.pow2_scale)  # tiles stay inside gate/up
    hf = h.float()
    a = (F.silu(hf[:, :I]) * hf[:, I:]).to(xs.dtype)
    a = fake_quant(a, cfg.act, pow2_scale=cfg.pow2_scale, dtype=dt)
    out = groups.mm(a, _fq_expert_weight(w2, cfg, dt), xs.dtype)
    return out, (qx, sx, qh, sh), groups.impl


def _experts_backward(ctx, dout, qx, sx, qh, sh, w13, w2, counts, need: tuple[bool, bool, bool]):
    """(dx, dw13, dw2) of `_experts_forward` (None where `need` is False), the SwiGLU recomputed from qh."""
    cfg, xdt = ctx.cfg, ctx.x_dtype
    T, I = qh.shape[0], qh.shape[-1]
    groups = _Groups(counts, T, ctx.impl)
    dt = _operand_dtype(cfg, xdt)
    dout = dout.contiguous()
    h = dequantize(qh, sh, cfg.act, nan_codes=False).view(T, 2 * I)  # recompute the SwiGLU from its FP8 input
    gate, up = h[:, :I], h[:, I:]
    sig = torch.sigmoid(gate)
    silu = gate * sig
    # down projection: Dgrad (dout 1x128) and Wgrad (a, dout 128x1 per expert)
    da = groups.mm(
        fake_quant(dout, cfg.act, pow2_scale=cfg.pow2_scale, dtype=dt),
        _fq_expert_weight(w2, cfg, dt).transpose(1, 2),
        xdt,
    ).float()
    dw2 = groups.wgrad((silu * up).to(xdt), dout, cfg) if need[2] else None
    dh = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * silu], dim=-1).to(xdt)
    # up projection (gate and up fused): Dgrad (dh 1x128) and Wgrad (x, dh 128x1 per expert)
    dx = None
    if need[0]:
        dh_q = fake_quant(dh.view(T, 2, I), cfg.act, pow2_scale=cfg.pow2_scale, dtype=dt).view(T, 2 * I)
        dx = groups.mm(dh_q, _fq_expert_weight(w13, cfg, dt, halves=True).transpose(1, 2), xdt)
    dw13 = groups.wgrad(dequantize(qx, sx, cfg.act, nan_codes=False), dh, cfg) if need[1] else None
    return dx, dw13, dw2


class Fp8ExpertMLPFunction(torch.autograd.Function):
    """out = (silu(x W13[:, :I]) * (x W13[:, I:])) W2 per expert, over rows sorted by expert, with FP8
    operands in all six GEMMs. Saves x and the SwiGLU input h in FP8; the SwiGLU output is recomputed."""

    @staticmethod
    def forward(ctx, xs, w13, w2, counts, cfg: Fp8Config, impl: str):
        out, cached, ctx.impl = _experts_forward(xs, w13, w2, counts, cfg, impl)
        ctx.save_for_backward(*cached, w13, w2, counts)  # w13, w2: the Parameters themselves
        ctx.cfg, ctx.x_dtype = cfg, xs.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        dx, dw13, dw2 = _experts_backward(ctx, dout, *ctx.saved_tensors, need=ctx.needs_input_grad[:3])
        return dx, dw13, dw2, None, None, None


def _dense_operands(wg, wu, wd) -> tuple[torch.Tensor, torch.Tensor]:
    """A SwiGLU MLP's Linear weights as one expert: w13 [1, d, 2I] (a copy), w2 [1, I, d] (a view)."""
    return torch.cat([wg, wu]).t().unsqueeze(0), wd.t().unsqueeze(0)


class Fp8SwiGLUFunction(torch.autograd.Function):
    """A dense SwiGLU MLP as one FP8 expert (E = 1), taking the three Linears' weights. The fused gate|up
    operand is a concatenated copy, so it is rebuilt in backward rather than saved: saving it kept an fp32
    [d, 2I] per layer and micro-batch (1 GB per dense layer at V3 size), more than the FP8 cache saves at
    small token counts."""

    @staticmethod
    def forward(ctx, x2, wg, wu, wd, cfg: Fp8Config):
        counts = torch.full((1,), x2.shape[0], dtype=torch.long, device=x2.device)
        out, cached, ctx.impl = _experts_forward(x2, *_dense_operands(wg, wu, wd), counts, cfg, "auto")
        ctx.save_for_backward(*cached, wg, wu, wd, counts)
        ctx.cfg, ctx.x_dtype = cfg, x2.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        qx, sx, qh, sh, wg, wu, wd, counts = ctx.saved_tensors
        g = ctx.needs_input_grad
        need = (g[0], g[1] or g[2], g[3])
        dx, dw13, dw2 = _experts_backward(ctx, dout, qx, sx, qh, sh, *_dense_operands(wg, wu, wd), counts, need)
        I = wg.shape[0]
        dwg, dwu = (dw13[0, :, :I].t(), dw13[0, :, I:].t()) if dw13 is not None else (None, None)
        return dx, dwg, dwu, (dw2[0].t() if dw2 is not None else None), None


def fp8_expert_mlp(
    x_sorted: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    counts: torch.Tensor,
    config: Fp8Config | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """FP8 routed experts over rows sorted by expert: x_sorted [M, d], w13 [E, d, 2I] (gate | up),
    w2 [E, I, d], counts [E] rows per expert -> [M, d] in x's dtype. impl: auto | bmm | loop."""
    if x_sorted.shape[0] == 0:
        return x_sorted.new_zeros(0, w2.shape[-1]) + 0 * (w13.sum() + w2.sum())  # keep the graph connected
    return Fp8ExpertMLPFunction.apply(x_sorted, w13, w2, counts, config or Fp8Config(), impl)


# ---------------------------------------------------------------------------------- precision policy
FP8_LINEARS = frozenset(
    {"q_a_proj", "q_b_proj", "q_proj", "k_proj", "v_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
     "gate_proj", "up_proj", "down_proj"}
)  # fmt: skip
"""Leaf names of the Linears the recipe runs in FP8: attention projections, dense MLPs, shared experts.
Everything else stays high precision: embedding, lm_head / MTP heads, the MoE gate, eh_proj, norms and the
attention core (scores, softmax), none of which is a Linear with one of these names."""


class _Fp8MlpSorted:
    """Replaces `Experts.mlp_sorted` on one instance (a plain callable, so the module still deep-copies and
    pickles; a bound method would unpickle as the class's own high-precision method)."""

    def __init__(self, experts: nn.Module):
        self.experts = experts

    def __call__(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        e = self.experts
        impl = getattr(e, "impl", "auto")
        return fp8_expert_mlp(xs, e.w13, e.w2, counts, e.fp8, impl if impl in ("bmm", "loop") else "auto")


class _Fp8SwiGLU:
    """Replaces `MLP.forward` (dense layers, shared experts) on one instance: the SwiGLU MLP runs as one FP8
    expert (E = 1) of `fp8_expert_mlp`, so that, as in the routed experts, its input and the SwiGLU input are
    cached in FP8 and the SwiGLU output is recomputed in backward; through three `Fp8Linear`s autograd would
    keep the bf16 gate and up outputs and the SwiGLU output. Same Parameters, same 128x128 weight blocks (gate
    and up quantised separately)."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # what autocast would do for the Linears this replaces
            x = x.to(torch.get_autocast_dtype(dev))
        x2 = x.reshape(-1, x.shape[-1])
        wg, wu, wd = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], wd.shape[0]) + 0 * (wg.sum() + wu.sum() + wd.sum())
        return Fp8SwiGLUFunction.apply(x2, wg, wu, wd, m.gate_proj.fp8).view(*x.shape[:-1], wd.shape[0])


def convert_to_fp8(
    model: nn.Module,
    granularity: str = "block",
    pow2_scale: bool = False,
    *,
    o_proj_e5m6: bool = True,
    experts: bool = True,
    swiglu: bool = True,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Swap `model`'s Linears named in `FP8_LINEARS` for `Fp8Linear` (same Parameters) and route the routed
    experts (modules with w13/w2 and `mlp_sorted(xs, counts)`, i.e. `nanoseek.model.moe.Experts`) through
    `fp8_expert_mlp`. In place; returns the model. `filter_fn(qualified_name, linear)` replaces the name
    rule. o_proj caches its input in E5M6 (`o_proj_e5m6`), as in the recipe. With `swiglu`, a SwiGLU MLP whose
    three projections are all FP8 (dense layers, shared experts) runs as one fused FP8 expert (`_Fp8SwiGLU`).
    Calling again re-configures."""
    from .errors import NanoseekError
    from .model.attention import ABSORB_FP8

    for fqn, m in model.named_modules():  # checked before anything is swapped
        kv_b = getattr(m, "kv_b_proj", None)
        absorbed = getattr(m, "impl", None) == "absorb" and isinstance(kv_b, nn.Linear)
        if absorbed and (filter_fn(f"{fqn}.kv_b_proj" if fqn else "kv_b_proj", kv_b) if filter_fn else True):
            raise NanoseekError(ABSORB_FP8)
    for parent_name, parent in model.named_modules():  # also before: a model left half-converted is no use
        for name, child in parent.named_children():
            fqn = f"{parent_name}.{name}" if parent_name else name
            if not (isinstance(child, nn.Linear) and child.bias is not None):
                continue
            if filter_fn(fqn, child) if filter_fn else name in FP8_LINEARS:
                raise ValueError(
                    f"convert_to_fp8: {fqn!r} has a bias, which Fp8Linear does not support (nothing converted)"
                )
    base = Fp8Config(granularity, pow2_scale)
    e5m6 = Fp8Config(granularity, pow2_scale, "e5m6" if o_proj_e5m6 else "e4m3")
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            fqn = f"{parent_name}.{name}" if parent_name else name
            cfg = e5m6 if name == "o_proj" else base
            if isinstance(child, nn.Linear):
                if not (filter_fn(fqn, child) if filter_fn else name in FP8_LINEARS):
                    continue
                if isinstance(child, Fp8Linear):
                    child.fp8 = cfg
                else:
                    setattr(parent, name, Fp8Linear.from_linear(child, cfg))
            elif experts and hasattr(child, "mlp_sorted") and isinstance(getattr(child, "w13", None), nn.Parameter):
                child.fp8 = base
                child.mlp_sorted = _Fp8MlpSorted(child)
                child.gather_ok = False  # the few-rows gather path would run the experts without FP8
    for module in model.modules():
        projs = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if swiglu and all(isinstance(p, Fp8Linear) for p in projs) and len({p.fp8 for p in projs}) == 1:
            module.forward = _Fp8SwiGLU(module)
        elif isinstance(module.__dict__.get("forward"), _Fp8SwiGLU):
            del module.forward  # re-configured without it: back to the class's forward
    return model
