"""DeepSeekMoE: shared experts + fine-grained routed experts, sigmoid gate, auxiliary-loss-free routing bias.

Routing (V3 §2.1.2, eqs. 12-16): s = sigmoid(x W_gᵀ) in fp32. Expert *selection* uses s + b, where
b = `e_score_correction_bias` is a buffer outside autograd (the loss-free balancer moves it between steps);
the combine *weights* use the unbiased s, normalised over the chosen k and scaled by routed_scaling_factor.
Group-limited routing restricts each token to `topk_group` of `n_group` expert groups, ranked by the sum of
each group's two highest biased scores (with groups = nodes this is V3's node-limited routing).
V2-style softmax gates are supported too (group score = max, no bias). No token is ever dropped.

The routed experts are computed without a Python loop over experts: token copies are sorted by expert and
fed to a grouped GEMM (`torch._grouped_mm`), or to batched GEMMs over per-expert buckets padded to a common
size, whichever a one-off measurement finds faster on this CPU (bmm is 3x faster in bf16 where AMX exists).
Padding is cheap when loads are balanced — which is what loss-free balancing buys — and a second, smaller
bucket level absorbs the overflow of hot experts when they are not (see `two_level_cap`). `_grouped_mm` needs
16-byte aligned rows (d and I multiples of 8 in bf16, of 4 in fp32); other sizes always take the batched GEMMs.
A per-expert loop is kept only as the test reference.

Legend: N tokens, K experts per token, E routed experts, d hidden, I expert width, M = N*K routed rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import NanoseekError
from .layers import MLP

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        # The routing bias stays fp32 whatever dtype the model is cast to: its updates (±1e-3) and
        # differences between experts would be lost in bf16. It still follows device moves.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None:
            moved = self.e_score_correction_bias
            self.e_score_correction_bias = moved.float() if bias.is_meta else bias.to(moved.device, torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> combine weights [N, K] (fp32), expert ids [N, K], unbiased scores [N, E] (fp32)."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # the gate stays fp32 in every precision recipe
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach()
        if self.e_score_correction_bias is not None:
            choice = choice + self.e_score_correction_bias
        G = cfg.n_group
        if G > 1 and cfg.topk_group < G and cfg.topk_method != "greedy":
            N = choice.shape[0]
            grouped = choice.view(N, G, -1)
            if cfg.topk_method == "noaux_tc":
                group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
            else:  # V2 group_limited_greedy
                group_score = grouped.amax(dim=-1)
            keep = group_score.topk(cfg.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        # V3 (sigmoid) normalises for any k, as its reference and transformers do; V2 (softmax) only for k > 1
        if cfg.norm_topk_prob and (self.top_k > 1 or cfg.scoring_func == "sigmoid"):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, idx, scores


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s CPU backward rejects
    stride-0 (expanded) gradients such as the one produced by `out.sum().backward()`."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def two_level_cap(counts: list[int]) -> int:
    """Rows per expert in the first padded bmm; experts with more rows get a second, smaller bmm.

    Picks c minimising the rows computed, E·c + (experts above c)·(max − c): c = max (one level) when loads
    are even, a much smaller c when a few experts are hot (as at initialisation, before the loss-free bias
    has balanced them), so skew costs a fraction of what one max-sized bucket per expert would."""
    E, top = len(counts), max(counts)
    best_c, best = top, 0.85 * E * top  # a second level must save >15% of the rows to pay for its extra calls
    for c in sorted(set(counts)):
        cost = E * c + sum(n > c for n in counts) * (top - c)
        if cost < best:
            best_c, best = c, cost
    return best_c


_TUNED: dict[tuple, str] = {}


def _autotune_cpu(E: int, d: int, I: int, M: int, dtype: torch.dtype) -> str:
    """Which CPU kernel is faster for this shape, measured once per process on synthetic loads.

    It depends on the machine: with AMX (Intel) one padded bmm runs ~3x faster than `_grouped_mm` in bf16;
    without it (e.g. AVX-512 AMD parts) they are even on balanced loads and `_grouped_mm` is 2x faster on
    skewed ones (the bmm pads every expert to the hot ones). Both load shapes are timed — a balanced one and a
    skewed one (the hottest expert ~4x the mean, as early in training) — and the kernel with the lower sum
    wins; row counts are multiples of ROW_ALIGN, as `Experts.forward` feeds them.
    """
    import time

    key = (E, d, I, dtype)
    if key not in _TUNED:
        rows = max(16 * E, min(M, 4096))  # ~4k rows: long enough to rank the kernels, short enough to be cheap
        skew = (1 - 4 / E) ** torch.arange(E, dtype=torch.float64) if E > 4 else torch.ones(E, dtype=torch.float64)
        loads = []
        for share in (torch.ones(E, dtype=torch.float64), skew):
            c = (share / share.sum() * rows / ROW_ALIGN).ceil().long() * ROW_ALIGN
            loads.append(c)
        w13 = torch.randn(E, d, 2 * I, dtype=dtype, requires_grad=True)
        w2 = torch.randn(E, I, d, dtype=dtype, requires_grad=True)
        xs = [torch.randn(int(c.sum()), d, dtype=dtype, requires_grad=True) for c in loads]
        best = {"bmm": float("inf"), "grouped_mm": float("inf")}
        for rnd in range(3):  # the first round only warms up (allocations, kernel selection)
            for impl in best:
                t = time.perf_counter()
                for x, c in zip(xs, loads):
                    sorted_swiglu(x, w13, w2, c, impl).sum().backward()
                if rnd:
                    best[impl] = min(best[impl], time.perf_counter() - t)
        _TUNED[key] = min(best, key=best.get)
    return _TUNED[key]


def choose_impl(impl: str, xs: torch.Tensor, w13: torch.Tensor) -> str:
    if impl in ("auto", "grouped_mm") and torch.compiler.is_compiling() and xs.dtype != torch.bfloat16:
        return "bmm"  # torch 2.13's meta kernel of _grouped_mm (what compile traces) accepts only bf16
    E, d, I2 = w13.shape
    size = xs.dtype.itemsize
    # _grouped_mm needs 16-byte aligned row strides: of xs [M, d], w13 [E, d, 2I], the SwiGLU [M, I], w2 [E, I, d]
    if impl in ("auto", "grouped_mm") and HAS_GROUPED_MM and (d * size % 16 or I2 // 2 * size % 16):
        if impl == "auto":
            return "bmm"
        raise NanoseekError(
            f"moe_impl=grouped_mm needs hidden_size ({d}) and moe_intermediate_size ({I2 // 2}) to be multiples of "
            f"{16 // size} in {str(xs.dtype).removeprefix('torch.')}; use moe_impl=auto (bmm for these sizes) or bmm"
        )
    if impl != "auto":
        return impl if (impl != "grouped_mm" or HAS_GROUPED_MM) else "bmm"
    if not HAS_GROUPED_MM:
        return "bmm"
    if xs.device.type != "cpu" or xs.shape[0] < 2048:  # small problems: not worth timing
        return "grouped_mm"
    # the timing runs backward too: it needs autograd even when called from a no-grad or inference-mode
    # forward (the engine's prefill of a long prompt is often the first large MoE call of a process)
    with torch.inference_mode(False), torch.enable_grad():
        return _autotune_cpu(E, d, I2 // 2, xs.shape[0], xs.dtype)


def _padded_bmm(xs, rows, slots, n_buckets, cap, w13, w2, act) -> torch.Tensor:
    """Copy rows `rows` of xs to bucket positions `slots` ([n_buckets, cap] buffer), run the SwiGLU experts
    with two bmms, and return the outputs of those rows (in `rows` order)."""
    d = xs.shape[1]
    buf = xs.new_zeros(n_buckets * cap, d).index_copy(0, slots, xs[rows]).view(n_buckets, cap, d)
    return torch.bmm(act(torch.bmm(buf, w13)), w2).view(n_buckets * cap, d)[slots]


def rank_in_expert(expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert (expert [M], counts [E]) -> each row's position within its expert's rows [M]."""
    return torch.arange(expert.numel(), device=expert.device) - (counts.cumsum(0) - counts)[expert]


def sorted_swiglu(
    xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """SwiGLU experts over rows sorted by expert: xs [M, d], w13 [E, d, 2I], w2 [E, I, d], counts [E]."""
    E, _, I2 = w13.shape
    I = I2 // 2
    M = xs.shape[0]
    impl = choose_impl(impl, xs, w13)

    def act(h: torch.Tensor) -> torch.Tensor:
        return F.silu(h[..., :I]) * h[..., I:]

    if M == 0:
        return xs.new_zeros(0, w2.shape[-1]) + 0 * w2.sum() + 0 * w13.sum()  # keep the graph connected
    if impl == "grouped_mm":
        offs = counts.cumsum(0).to(torch.int32)
        h = _ContiguousGrad.apply(torch._grouped_mm(xs, w13, offs=offs))
        return _ContiguousGrad.apply(torch._grouped_mm(act(h), w2, offs=offs))
    if impl == "bmm":
        # Padded buckets: one bmm over [E, c, d] for every expert's first c rows, and, when some experts have
        # more, a second bmm over just those experts' remaining rows (their weights gathered). No token dropped.
        host = counts.tolist()
        c = two_level_cap(host)
        dev = xs.device
        expert = torch.repeat_interleave(torch.arange(E, device=dev), counts, output_size=M)
        pos = rank_in_expert(expert, counts)
        if c == max(host):
            return _padded_bmm(xs, slice(None), expert * c + pos, E, c, w13, w2, act)
        first = pos < c
        rows0, rows1 = first.nonzero().squeeze(1), (~first).nonzero().squeeze(1)
        hot = torch.tensor([e for e, n in enumerate(host) if n > c], device=dev)
        rank = torch.full((E,), -1, dtype=torch.long, device=dev).index_copy(0, hot, torch.arange(len(hot), device=dev))
        c1 = max(host) - c
        y0 = _padded_bmm(xs, rows0, expert[rows0] * c + pos[rows0], E, c, w13, w2, act)
        slots1 = rank[expert[rows1]] * c1 + pos[rows1] - c
        y1 = _padded_bmm(xs, rows1, slots1, len(hot), c1, w13[hot], w2[hot], act)
        out = xs.new_zeros(M, w2.shape[-1], dtype=y0.dtype)
        return out.index_copy(0, rows0, y0).index_copy(0, rows1, y1)
    # loop: the per-expert reference
    outs = [act(x_e @ w13[e]) @ w2[e] for e, x_e in enumerate(xs.split(counts.tolist()))]
    return torch.cat(outs)


ROW_ALIGN = 32
"""On CPU each expert's rows are padded (with zero rows) to a multiple of this. The CPU GEMM library (oneDNN)
builds, and caches, a kernel per matrix shape: with the routed load changing every step, unpadded per-expert
row counts make nearly every GEMM a new shape (~0.2 ms to build, thrashing the cache); padded, each expert GEMM
comes from a few dozen shapes. Costs at most ALIGN-1 zero rows per expert; small batches use a smaller alignment
(`Experts.pad_rows_to`). Measured in BENCHMARKS.md (train)."""


def padded_slots(expert: torch.Tensor, counts: torch.Tensor, align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert (expert [M], counts [E]) -> (rows per expert rounded up to a multiple of `align`
    [E], each row's position in that padded layout [M]): expert e's rows start where the padded rows of the
    experts before it end."""
    padded = (counts + align - 1) // align * align if align > 1 else counts
    return padded, (padded.cumsum(0) - padded)[expert] + rank_in_expert(expert, counts)


class Routing:
    """Where each of the N*K token copies goes in the expert-sorted, padded row layout (host-side sizes).

    Copy c = n*K + k of token n is routed to expert idx[n, k]. Expert e's rows are slots
    [start_e, start_e + padded_e) of the sorted layout; its first counts_e slots hold its copies in token order
    and the rest (padding) are zero rows whose outputs nobody reads."""

    def __init__(self, idx: torch.Tensor, n_experts: int, align: int = 1):
        N, K = idx.shape
        flat = idx.reshape(-1)  # [M] expert of each copy
        M, dev = flat.numel(), flat.device
        counts = torch.bincount(flat, minlength=n_experts)  # [E]
        order = flat.argsort(stable=True)  # copies grouped by expert
        padded, slot = padded_slots(flat[order], counts, align)
        self.N, self.K, self.M = N, K, M
        self.Mp = int(padded.sum()) if align > 1 else M
        self.counts = padded  # rows per expert in the layout (what the expert GEMMs see)
        self.slot_of_copy = torch.empty_like(order).index_copy_(0, order, slot)  # [M]
        copy_of_slot = torch.full((self.Mp,), M, dtype=torch.long, device=dev).index_copy_(0, slot, order)
        self.pad = (copy_of_slot == M).nonzero().squeeze(1) if self.Mp > M else None  # [Mp - M] padding slots
        self.copy_of_slot = copy_of_slot.clamp_(max=M - 1)  # [Mp] (padding slots point anywhere; zeroed)
        self.token_of_slot = self.copy_of_slot // K


def _rows(src: torch.Tensor, index: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    out = src.index_select(0, index)
    return out.index_fill_(0, pad, 0) if pad is not None else out  # zero only the padding rows


class _Dispatch(torch.autograd.Function):
    """x [N, d] -> the sorted layout [Mp, d]. Both directions are gathers (no scatter-add: its CPU kernel is
    serial and ~5x slower); the backward sums each token's K copies."""

    @staticmethod
    def forward(ctx, x, route):
        ctx.route = route
        return _rows(x, route.token_of_slot, route.pad)

    @staticmethod
    def backward(ctx, g):
        r = ctx.route
        return g.index_select(0, r.slot_of_copy).view(r.N, r.K, -1).sum(dim=1), None


class _Combine(torch.autograd.Function):
    """Sorted layout [Mp, d] -> one row per token copy [N*K, d] (copy order); padding rows get zero grad."""

    @staticmethod
    def forward(ctx, ys, route):
        ctx.route = route
        return ys.index_select(0, route.slot_of_copy)

    @staticmethod
    def backward(ctx, g):
        r = ctx.route
        return _rows(g.contiguous(), r.copy_of_slot, r.pad), None


class Experts(nn.Module):
    """E routed SwiGLU experts stored as stacked weights (gate and up fused: w13[e] = [W_gateᵀ | W_upᵀ])."""

    def __init__(self, n_experts: int, dim: int, inter: int, impl: str = "auto"):
        super().__init__()
        self.n_experts, self.inter, self.impl = n_experts, inter, impl
        # the gather path applies w13/w2 itself: a recipe that swaps `mlp_sorted` (FP8) turns it off
        self.gather_ok = True
        self.row_align = ROW_ALIGN
        self.w13 = nn.Parameter(torch.empty(n_experts, dim, 2 * inter))  # [E, d, 2I]
        self.w2 = nn.Parameter(torch.empty(n_experts, inter, dim))  # [E, I, d]

    def pad_rows_to(self, rows: int, device: torch.device) -> int:
        """Row alignment for `rows` routed copies on CPU: the largest power of two up to ROW_ALIGN that the
        experts average at least 4x (padding then adds ~1/8 of the rows or less), down to 1 for decoding and
        small batches, where padding would multiply the rows and the few small row counts do not churn the GEMM
        library's kernel cache. 1 on GPU (real grouped GEMMs, no per-shape kernels)."""
        if device.type != "cpu":
            return 1
        a = self.row_align
        while a > 1 and rows < 4 * a * self.n_experts:
            a //= 2
        return a

    def mlp_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The expert GEMMs on rows already sorted by expert (swapped by the FP8 recipe and used by EP)."""
        return sorted_swiglu(xs, self.w13.to(xs.dtype), self.w2.to(xs.dtype), counts, self.impl)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d], idx/weights [N, K] -> sum_k weights[:, k] * Expert_idx[:, k](x)  [N, d]."""
        N, K = idx.shape
        if torch.is_autocast_enabled(x.device.type):  # grouped GEMMs are not on autocast's op list
            x = x.to(torch.get_autocast_dtype(x.device.type))
        few_rows = self.impl == "gather" or (self.impl == "auto" and self.n_experts >= N * K)  # decoding
        if few_rows and self.gather_ok:
            return self.gathered(x, idx, weights)
        route = Routing(idx, self.n_experts, self.pad_rows_to(N * K, x.device))
        ys = self.mlp_sorted(_Dispatch.apply(x, route), route.counts)  # [Mp, d], slots in expert order
        yc = _Combine.apply(ys, route).view(N, K, -1)  # [N, K, d], each token's K expert outputs
        return (yc * weights[..., None].to(yc.dtype)).sum(dim=1)

    def gathered(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Few tokens (decoding): gather each token's K experts' weights and apply them with one bmm. No sort,
        no host sync and static shapes (so `torch.compile` can trace it); reads at most every expert once
        when N*K <= E, which is when "auto" picks it."""
        N, K = idx.shape
        flat = idx.reshape(-1)
        w13, w2 = self.w13[flat].to(x.dtype), self.w2[flat].to(x.dtype)  # [N*K, d, 2I], [N*K, I, d]
        h = torch.bmm(x.repeat_interleave(K, dim=0)[:, None], w13)  # [N*K, 1, 2I]
        h = F.silu(h[..., : self.inter]) * h[..., self.inter :]
        y = torch.bmm(h, w2).view(N, K, -1)
        return (y * weights[..., None].to(y.dtype)).sum(dim=1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_impl)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        # tokens routed to each expert since the last reset (read and zeroed by the loss-free balancer)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)
        self.count_tokens = True  # False for forwards that are not real work (e.g. pipeline shape inference)
        self.capture_router = False  # when True, keep (scores, idx, (B, T)) for the auxiliary losses
        self.router_record: tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate(xf)
        if self.count_tokens:
            with torch.no_grad():  # a fixed-shape scatter (no host sync, traceable), not bincount
                flat = idx.flatten()
                self.tokens_per_expert.scatter_add_(0, flat, torch.ones_like(flat))
        if self.capture_router:
            self.router_record = (scores, idx, tuple(shape[:-1]))
        y = self.experts(xf, idx, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)
        return y.view(shape)
