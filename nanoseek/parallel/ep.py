"""Expert parallelism: routed experts sharded over an EP process group, tokens moved with all-to-all.

`ExpertParallel` replaces `moe.experts` (same forward signature) and keeps only this rank's E/ep experts
(`w13 [E/ep, d, 2I]`, `w2 [E/ep, I, d]`); expert e lives on EP rank e // (E/ep). One forward:

  1. route (local): each token is sent *once* to every EP rank that holds at least one of its K experts
     (a "pair" = token x destination rank, as DeepEP does), with a row of metadata: its K combine weights
     and local expert ids, masked (-1 / 0) for the experts that are not on that rank. Pairs are ordered by
     destination rank, then token.
  2. exchange the pair counts (one small all-to-all), then dispatch the token rows and the metadata with
     `all_to_all_single` and uneven splits. Optional FP8 dispatch: rows are quantised to E4M3 with 1x128
     tiles and power-of-two scales (`nanoseek.fp8.quantize`), sent as 1 byte per element plus one int8
     exponent per tile, and dequantised on arrival (V3 §3.3.4); the combine stays in the activation dtype.
  3. on the expert rank: expand pairs to (row, local expert) copies, sort by expert, run the expert MLPs
     (`Experts.mlp_sorted`), weight them, and sum each pair's copies into one row.
  4. combine: the reverse all-to-all, then sum each token's pairs.

Autograd: `_AllToAll` starts the collective with `async_op=True` and returns its output buffer; the caller
waits on the work handle before reading it. Its backward is the reverse all-to-all (synchronous). FP8
dispatch uses a straight-through gradient (the dispatch's backward carries full-precision gradients).
`chunks=2` splits the tokens in two halves so one half's dispatch/combine runs while the other half's experts
compute (see `nanoseek.parallel.overlap`).

Node-limited routing (V3 §2.1.2): with `ranks_per_node`, EP ranks form nodes of contiguous experts, and
`node_limit_config` turns the gate's group-limited routing into node-limited routing (groups = nodes,
topk_group = max nodes), so each token's experts span at most M nodes. `CommStats` records, per forward,
the bytes each token moves off its rank (dispatch + combine, actual dtype sizes, tokens that stay on the
local rank excluded) and the largest number of distinct nodes a token touches.

Legend: N tokens, K experts per token, E experts, El = E/ep local experts, d hidden, P pairs sent,
Pr pairs received.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import ModelConfig
from ..errors import NanoseekError
from ..model.moe import Experts, MoE, padded_slots

TILE = 128  # FP8 dispatch: one power-of-two scale per 1x128 tile


# ------------------------------------------------------------------------------------------ all-to-all
class _AllToAll(torch.autograd.Function):
    """Differentiable `all_to_all_single` with uneven splits, started asynchronously.

    forward: launches `out[recv] <- x[send]` and appends `(work, packed_recv_or_None)` to `pending`; the
    returned tensor is valid only after `work.wait()` (with fp8: a placeholder that `_wait` replaces by the
    dequantised rows through `_Arrive`).
    backward: the reverse all-to-all of the gradient (send and receive splits swapped).
    """

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group, pending: list, fp8: bool):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), x.shape[1])
        if fp8:  # send packed bytes; `out` is a placeholder that `_Arrive` replaces (straight-through)
            packed = fp8_pack(x)
            buf = packed.new_empty(sum(recv), packed.shape[1])
            work = dist.all_to_all_single(buf, packed, recv, send, group=group, async_op=True)
            pending.append((work, buf))
        else:
            work = dist.all_to_all_single(out, x.contiguous(), recv, send, group=group, async_op=True)
            pending.append((work, None))
        return out

    @staticmethod
    def backward(ctx, g):
        gx = g.new_empty(sum(ctx.send), g.shape[1])
        dist.all_to_all_single(gx, g.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return gx, None, None, None, None, None


class _Arrive(torch.autograd.Function):
    """Fill an FP8 dispatch placeholder with the dequantised rows; gradient passes straight through."""

    @staticmethod
    def forward(ctx, placeholder, values):
        return values

    @staticmethod
    def backward(ctx, g):
        return g, None


def fp8_pack(x: torch.Tensor) -> torch.Tensor:
    """x [P, d] -> uint8 [P, d + ceil(d/128)]: E4M3 codes, then one int8 power-of-two exponent per tile
    (-128 marks a tile with NaN or inf, which unpacks as NaN rather than as finite numbers)."""
    from ..fp8 import TILE_1x128, quantize

    q, scale = quantize(x.detach(), TILE_1x128, pow2_scale=True)  # scale [P, tiles], exact powers of two
    _, e = torch.frexp(scale)  # scale = 0.5 * 2**e
    e = torch.where(scale.isfinite(), e - 1, -128)
    return torch.cat([q.view(torch.uint8), e.to(torch.int8).view(torch.uint8)], dim=1)


def fp8_unpack(packed: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    from ..fp8 import TILE_1x128, dequantize

    q = packed[:, :d].contiguous().view(torch.float8_e4m3fn)
    e = packed[:, d:].contiguous().view(torch.int8).to(torch.int32)
    scale = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), e)
    return dequantize(q, scale.masked_fill_(e == -128, float("nan")), TILE_1x128, dtype)


def _wait(pending: list, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    work, buf = pending.pop(0)
    work.wait()
    return out if buf is None else _Arrive.apply(out, fp8_unpack(buf, out.shape[1], dtype))


# --------------------------------------------------------------------------------------------- stats
@dataclass
class CommStats:
    """Accumulated over forwards until `reset()`; bytes are those this rank's tokens move off the rank."""

    tokens: int = 0  # token-layer visits (tokens x MoE layers)
    pairs: int = 0  # (token, destination rank) pairs, local ones included
    remote_pairs: int = 0
    dispatch_bytes: int = 0  # token rows + routing metadata sent to other ranks
    combine_bytes: int = 0  # expert outputs received back from other ranks
    internode_bytes: int = 0  # the part of dispatch + combine that crosses nodes (V3: InfiniBand)
    max_nodes: int = 0  # most distinct nodes any token's experts span (keep last: reduced with MAX)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def merge(self, other: CommStats) -> None:
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, max(a, b) if f.name == "max_nodes" else a + b)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.float64)

    def report(self) -> dict:
        t = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "bytes_per_token": (self.dispatch_bytes + self.combine_bytes) / t,
            "dispatch_bytes_per_token": self.dispatch_bytes / t,
            "combine_bytes_per_token": self.combine_bytes / t,
            "internode_bytes_per_token": self.internode_bytes / t,
            "remote_ranks_per_token": self.remote_pairs / t,
            "max_nodes_per_token": self.max_nodes,
        }


def all_reduce_stats(stats: CommStats, group=None, device=None) -> CommStats:
    """Sum (max for max_nodes) the stats of every rank in `group`."""
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    t = stats.as_tensor().to(device or "cpu")
    hi = t[-1:].clone()
    dist.all_reduce(t, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    vals = [int(v) for v in t.tolist()]
    vals[-1] = int(hi.item())
    return CommStats(*vals)


# ---------------------------------------------------------------------------------------- node limits
def node_limit_config(cfg: ModelConfig, n_nodes: int, max_nodes: int | None) -> ModelConfig:
    """A gate config whose group-limited routing keeps every token within `max_nodes` of `n_nodes` nodes.

    Experts are laid out in node order (node j holds experts [j E/n, (j+1) E/n)). If the config's groups
    already bound the nodes (groups inside nodes and topk_group <= max_nodes, or groups of whole nodes and
    topk_group x nodes per group <= max_nodes), routing is unchanged;
    otherwise the gate becomes node-limited: n_group = n_nodes, topk_group = max_nodes (group score = sum of
    the top-2 biased scores, as in V3's code; the paper ranks nodes by their top K/M affinities).
    """
    if max_nodes is None or n_nodes <= 1 or max_nodes >= n_nodes:
        return cfg
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    if E % n_nodes:
        raise NanoseekError(f"node-limited routing: {E} experts do not split over {n_nodes} nodes")
    if max_nodes < 1 or max_nodes * (E // n_nodes) < K:
        raise NanoseekError(
            f"node-limited routing: {K} experts per token do not fit in {max_nodes} node(s) of {E // n_nodes}"
        )
    G = max(cfg.n_group, 1)
    grouped = cfg.topk_method != "greedy" and G > 1 and cfg.topk_group < G
    if grouped and G % n_nodes == 0 and cfg.topk_group <= max_nodes:
        return cfg  # every group sits inside one node: at most topk_group nodes already
    if grouped and n_nodes % G == 0 and cfg.topk_group * (n_nodes // G) <= max_nodes:
        return cfg  # every group spans n_nodes/G whole nodes
    method = "group_limited_greedy" if cfg.topk_method == "greedy" else cfg.topk_method
    return cfg.replace(n_group=n_nodes, topk_group=max_nodes, topk_method=method)


def apply_node_limit(model: nn.Module, n_nodes: int, max_nodes: int | None) -> bool:
    """Set every MoE gate of `model` to node-limited routing; returns True if routing changed."""
    changed = False
    for moe in model.modules():
        if isinstance(moe, MoE):
            new = node_limit_config(moe.gate.cfg, n_nodes, max_nodes)
            changed |= new is not moe.gate.cfg
            moe.gate.cfg = new
    return changed


def nodes_per_token(idx: torch.Tensor, n_experts: int, n_nodes: int) -> torch.Tensor:
    """idx [N, K] global expert ids -> distinct nodes per token [N] (experts in node order)."""
    node = idx // (n_experts // n_nodes)
    hit = torch.zeros(idx.shape[0], n_nodes, dtype=torch.bool, device=idx.device).scatter_(1, node, True)
    return hit.sum(1)


# ------------------------------------------------------------------------------------------ the module
@dataclass
class _Route:
    tok: torch.Tensor  # [P] source token of each pair (pairs sorted by destination rank, then token)
    send: list[int]  # pairs per destination rank
    meta: torch.Tensor  # [P, 2K] fp32: combine weights (0 where masked) | local expert ids (-1 where masked)
    max_nodes: int


class ExpertParallel(Experts):
    """The routed experts of one MoE layer, sharded over `group` (a drop-in for `Experts`).

    Parameters keep the single-process names (`w13`, `w2`) with only the local slice, so a checkpoint
    gathers back by concatenation along dim 0 (`gather_experts`).
    """

    def __init__(
        self,
        experts: Experts,
        group: dist.ProcessGroup,
        ranks_per_node: int | None = None,
        fp8_dispatch: bool = False,
        chunks: int = 1,
    ):
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        E = experts.n_experts
        if E % ep:
            raise NanoseekError(
                f"--ep {ep}: {E} routed experts do not split evenly over {ep} ranks; use an --ep dividing {E}"
            )
        El = E // ep
        d, inter = experts.w13.shape[1], experts.inter
        super().__init__(El, d, inter, experts.impl)
        with torch.no_grad():
            self.w13 = nn.Parameter(experts.w13.detach()[rank * El : (rank + 1) * El].clone())
            self.w2 = nn.Parameter(experts.w2.detach()[rank * El : (rank + 1) * El].clone())
        self.group, self.ep_size, self.ep_rank, self.n_global = group, ep, rank, E
        self.fp8_dispatch, self.chunks = fp8_dispatch, chunks
        # node of each EP rank, from global ranks (torchrun places consecutive ranks on one node)
        rpn = ranks_per_node or ep
        glob = [dist.get_global_rank(group, j) for j in range(ep)]
        ids = sorted({g // rpn for g in glob})
        self.node_of = torch.tensor([ids.index(g // rpn) for g in glob])
        self.n_nodes = len(ids)
        self.stats = CommStats()
        # bench only: "compute" skips the collectives (each rank computes its own sends), "serial" runs the
        # chunks one after the other without overlap
        self.bench_mode: str | None = None

    def extra_repr(self) -> str:
        return f"experts {self.n_experts}/{self.n_global} on ep rank {self.ep_rank}/{self.ep_size}"

    # --- steps ---------------------------------------------------------------------------------------
    def _route(self, idx: torch.Tensor, weights: torch.Tensor) -> _Route:
        N = idx.shape[0]
        El, ep = self.n_experts, self.ep_size
        dest = idx // El  # [N, K] destination rank of each copy
        hit = torch.zeros(N, ep, dtype=torch.bool, device=idx.device).scatter_(1, dest, True)
        rank, tok = hit.t().nonzero(as_tuple=True)  # pairs, sorted by rank then token
        mine = dest[tok] == rank[:, None]  # [P, K] copies of the pair's token that this rank serves
        lid = torch.where(mine, idx[tok] - rank[:, None] * El, -1)
        meta = torch.cat([weights[tok].float() * mine, lid.float()], dim=1)
        node = self.node_of.to(idx.device)[dest]
        nodes = torch.zeros(N, self.n_nodes, dtype=torch.bool, device=idx.device).scatter_(1, node, True)
        return _Route(tok, hit.sum(0).tolist(), meta, int(nodes.sum(1).max()) if N else 0)

    def _experts(self, xr: torch.Tensor, meta_r: torch.Tensor) -> torch.Tensor:
        """Received pairs xr [Pr, d] + meta [Pr, 2K] -> per-pair weighted sum of its experts [Pr, d]."""
        if xr.shape[0] == 0:  # nothing arrived: stay connected to both dispatches, so that their backward
            return xr * meta_r.sum().to(xr.dtype)  # all-to-alls still run here (the peers wait for them)
        K = meta_r.shape[1] // 2
        lid = meta_r[:, K:].detach().long()
        p, k = (lid >= 0).nonzero(as_tuple=True)
        e = lid[p, k]
        order = e.argsort(stable=True)
        p, k, e = p[order], k[order], e[order]
        counts = torch.bincount(e, minlength=self.n_experts)
        xs = xr.index_select(0, p)  # [M, d] sorted by local expert
        align = self.pad_rows_to(len(e), xr.device)
        if align > 1:  # zero-row padding, as in Experts.forward (ROW_ALIGN)
            padded, slot = padded_slots(e, counts, align)
            xs = xs.new_zeros(int(padded.sum()), xs.shape[1]).index_copy(0, slot, xs)
            ys = self.mlp_sorted(xs, padded).index_select(0, slot)
        else:
            ys = self.mlp_sorted(xs, counts)
        ys = ys * meta_r[p, k, None].to(ys.dtype)
        return torch.zeros(xr.shape[0], ys.shape[1], dtype=ys.dtype, device=ys.device).index_add_(0, p, ys)

    def _record(self, rt: _Route, n: int, x: torch.Tensor) -> None:
        d = x.shape[1]
        remote = sum(c for j, c in enumerate(rt.send) if j != self.ep_rank)
        node = self.node_of.tolist()
        inter = sum(c for j, c in enumerate(rt.send) if node[j] != node[self.ep_rank])
        row = d + math.ceil(d / TILE) if self.fp8_dispatch else d * x.element_size()
        s = self.stats
        s.tokens += n
        s.pairs += sum(rt.send)
        s.remote_pairs += remote
        s.dispatch_bytes += remote * (row + rt.meta.shape[1] * rt.meta.element_size())
        s.combine_bytes += remote * d * x.element_size()  # the combine returns rows in x's dtype
        s.internode_bytes += inter * (row + rt.meta.shape[1] * rt.meta.element_size() + d * x.element_size())
        s.max_nodes = max(s.max_nodes, rt.max_nodes)

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d], idx/weights [N, K] (global expert ids) -> sum_k weights[:, k] * Expert_idx[:, k](x)."""
        if torch.is_autocast_enabled(x.device.type):  # as in Experts.forward
            x = x.to(torch.get_autocast_dtype(x.device.type))
        N = x.shape[0]
        C = max(1, min(self.chunks, N))
        bounds = [(c * N // C, (c + 1) * N // C) for c in range(C)]
        if self.bench_mode == "serial":  # the chunks one after the other, nothing in flight (bench baseline)
            return torch.cat([self._pipelined(x, idx, weights, [(a, b)]) for a, b in bounds])
        return self._pipelined(x, idx, weights, bounds)

    def _pipelined(self, x, idx, weights, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """Route, dispatch, compute and combine the chunks `bounds` of x with every transfer in flight as
        early as possible; returns the rows x[bounds[0][0]:bounds[-1][1]]."""
        g, base = self.group, bounds[0][0]
        routes = [self._route(idx[a:b], weights[a:b]) for a, b in bounds]
        local = self.bench_mode == "compute"
        # one count exchange for all chunks: recv[c][j] = pairs rank j sends me in chunk c
        send_counts = torch.tensor([rt.send for rt in routes], dtype=torch.long, device=x.device)  # [C, ep]
        if local:
            recv = [rt.send for rt in routes]
        else:
            got = torch.empty_like(send_counts.t().contiguous())
            dist.all_to_all_single(got, send_counts.t().contiguous(), group=g)
            recv = got.t().tolist()
        # dispatch every chunk (async), then compute each chunk as soon as it has arrived
        pending, sent = [], []
        for (a, b), rt, rc in zip(bounds, routes, recv):
            xs = x[a:b].index_select(0, rt.tok)
            if local:
                sent.append((xs, rt.meta))
                continue
            xr = _AllToAll.apply(xs, rt.send, rc, g, pending, self.fp8_dispatch)
            mr = _AllToAll.apply(rt.meta, rt.send, rc, g, pending, False)
            sent.append((xr, mr))
            self._record(rt, b - a, x)
        outs, back = [], []
        for (xr, mr), rt, rc in zip(sent, routes, recv):
            if not local:
                xr, mr = _wait(pending, xr, x.dtype), _wait(pending, mr, mr.dtype)
            yr = self._experts(xr, mr)
            outs.append(yr if local else _AllToAll.apply(yr, rc, rt.send, g, back, False))
        y = torch.zeros_like(x[base : bounds[-1][1]])
        for (a, _), rt, yb in zip(bounds, routes, outs):
            if not local:
                yb = _wait(back, yb, x.dtype)
            y = y.index_add(0, rt.tok + (a - base), yb.to(y.dtype))
        return y


# ------------------------------------------------------------------------------------- shard / gather
def shard_experts(
    model: nn.Module,
    group: dist.ProcessGroup,
    ranks_per_node: int | None = None,
    fp8_dispatch: bool = False,
    chunks: int = 1,
) -> list[ExpertParallel]:
    """Replace every `moe.experts` of a full model by this rank's `ExpertParallel` slice (in place)."""
    out = []
    for moe in model.modules():
        if isinstance(moe, MoE) and not isinstance(moe.experts, ExpertParallel):
            moe.experts = ExpertParallel(moe.experts, group, ranks_per_node, fp8_dispatch, chunks)
            out.append(moe.experts)
    return out


def ep_modules(model: nn.Module) -> list[ExpertParallel]:
    return [m for m in model.modules() if isinstance(m, ExpertParallel)]


def gather_experts(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None, grads: bool = False
) -> dict[str, torch.Tensor]:
    """`model.state_dict()` (or `state`) with every sharded expert tensor all-gathered back to the single-
    process layout ([E, ...] in expert order); `grads=True` gathers the gradients instead of the weights.
    Collective over each EP group: every EP rank must call it."""
    state = dict(model.state_dict() if state is None else state)
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertParallel):
            for pname in ("w13", "w2"):
                p = getattr(mod, pname)
                t = (p.grad if grads and p.grad is not None else torch.zeros_like(p) if grads else p).detach()
                if isinstance(t, DTensor):  # FSDP2 (--dp-shard): first the whole EP shard, from the dp ranks
                    t = t.full_tensor()
                t = t.contiguous()
                parts = [torch.empty_like(t) for _ in range(mod.ep_size)]
                dist.all_gather(parts, t, group=mod.group)
                state[f"{name}.{pname}" if name else pname] = torch.cat(parts)
    return state


def shard_state(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full (single-process) state dict cut down to this rank's expert slices, for `load_state_dict`."""
    out = dict(full)
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertParallel):
            El, r = mod.n_experts, mod.ep_rank
            for pname in ("w13", "w2"):
                key = f"{name}.{pname}" if name else pname
                out[key] = full[key][r * El : (r + 1) * El]
    return out
