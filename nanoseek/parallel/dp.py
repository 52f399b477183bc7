"""Data parallelism composed with expert and pipeline parallelism: gradient averaging, clipping, counts.

Every (dp, ep) rank of a pipeline stage trains on its own slice of the batch; the global loss is the mean
of the W = dp * ep local losses. Hence, after `loss.backward()`:
  * replicated parameters (everything but the routed experts) hold d(local loss): sum over the dp x ep
    ranks, divide by W;
  * an expert shard already holds the sum over its EP group of every rank's contribution (the backward of
    the all-to-all brought them home): sum over the dp ranks that hold the same experts, divide by W.

Without pipeline parallelism (`data_parallel`): `DistributedDataParallel` over the dp x ep ranks does the
first, bucketed and overlapped with backward (its hooks start a bucket's all-reduce as soon as the bucket's
gradients are ready); the expert shards are hidden from it (`_ddp_params_and_buffers_to_ignore`: they need
the dp group, not the dp x ep one) and `ExpertGradSync` all-reduces each one asynchronously from a
post-accumulate-grad hook, so they overlap with the rest of backward too. Under pipeline parallelism the
stage modules are run by the schedule and the tied embedding may sit in two stages of one rank, so
`sync_grads` does the same arithmetic with bucketed `all_reduce`s after the schedule's backward. In both,
weights and optimizer states are replicated; `fsdp` (FSDP2, `--dp-shard`, with or without EP, not with PP)
shards parameters, gradients and optimizer states instead (ZeRO-3): the same averaging, done by
reduce-scatters over the same two groups.

`clip_grad_norm_` computes the norm of the *global* gradient: replicated parameters once, expert shards
summed over the EP group, stages summed over the PP group, mirrored (tied) copies excluded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..model.moe import MoE
from .ep import ExpertParallel

BUCKET = 1 << 24  # elements per all-reduce bucket (64 MiB in fp32)


def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]  # .parameters() already de-duplicates


def split_params(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated parameters, expert-parallel shards)."""
    expert = {id(p) for m in module.modules() if isinstance(m, ExpertParallel) for p in m.parameters()}
    params = _unique_params(module)
    return [p for p in params if id(p) not in expert], [p for p in params if id(p) in expert]


@torch.no_grad()
def all_reduce_grads(params: Iterable[nn.Parameter], group, scale: float) -> None:
    """grad <- scale * sum over `group` of grad, in flat buckets. Missing grads count as zeros (every rank
    must pass the same parameters in the same order)."""
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1:
        if scale != 1.0:
            for p in params:
                p.grad.mul_(scale)
        return
    bucket: list[nn.Parameter] = []
    n = 0
    for i, p in enumerate(params):
        bucket.append(p)
        n += p.numel()
        if n >= BUCKET or i == len(params) - 1:
            by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
            for q in bucket:
                by_dtype.setdefault(q.grad.dtype, []).append(q)
            for same in by_dtype.values():
                flat = torch.cat([q.grad.reshape(-1) for q in same])
                dist.all_reduce(flat, group=group)
                flat.mul_(scale)
                for q, g in zip(same, flat.split([q.numel() for q in same])):
                    q.grad.copy_(g.view_as(q.grad))
            bucket, n = [], 0


def sync_grads(module: nn.Module, data_group, expert_group, width: int) -> None:
    """Average gradients over the data-parallel ranks (see the module docstring); `width` = dp * ep."""
    rep, exp = split_params(module)
    all_reduce_grads(rep, data_group, 1.0 / width)
    all_reduce_grads(exp, expert_group, 1.0 / width)


@torch.no_grad()
def clip_grad_norm_(
    module: nn.Module, max_norm: float, ep_group=None, pp_group=None, exclude: Iterable[nn.Parameter] = ()
) -> torch.Tensor:
    """Clip to `max_norm` by the global gradient norm (as `torch.nn.utils.clip_grad_norm_` on the single-
    process model); returns that norm. Call after `sync_grads`; collective over the EP and PP groups."""
    skip = {id(p) for p in exclude}
    rep, exp = split_params(module)
    rep = [p for p in rep if p.grad is not None and id(p) not in skip]
    exp = [p for p in exp if p.grad is not None]

    device = next(iter(module.parameters())).device

    def sumsq(ps):
        if not ps:
            return torch.zeros((), device=device)
        return torch.stack([p.grad.detach().float().pow(2).sum() for p in ps]).sum()

    e = sumsq(exp).double()
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(e, group=ep_group)
    total = sumsq(rep).double() + e
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    norm = total.sqrt().float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in rep + exp:
        p.grad.mul_(coef.to(p.grad.dtype))
    for p in exclude:  # mirrors get the same factor as the copy they mirror
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm


@torch.no_grad()
def reduce_counts(module: nn.Module, group) -> None:
    """Sum every MoE layer's `tokens_per_expert` over `group` (the dp x ep ranks of this stage), so the
    loss-free bias update sees the global batch. One all-reduce for all layers."""
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    if not layers or group is None or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([m.tokens_per_expert for m in layers])
    dist.all_reduce(flat, group=group)
    for m, c in zip(layers, flat.split([m.tokens_per_expert.numel() for m in layers])):
        m.tokens_per_expert.copy_(c)


# --- DistributedDataParallel for the replicated parameters, async hooks for the expert shards ---------------
class ExpertGradSync:
    """Averages the expert-parallel shards' gradients over the dp ranks holding the same experts, each one
    all-reduced asynchronously as soon as backward has accumulated it (while backward continues with earlier
    layers). `armed` selects the backward that communicates (the last micro-batch of a step, as DDP's
    `no_sync`); `finish` waits and scales by 1 / W."""

    def __init__(self, module: nn.Module, dp_group, width: int):
        self.params = split_params(module)[1]
        self.group, self.scale = dp_group, 1.0 / width
        self.size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.armed = True
        self.pending: dict[int, dist.Work] = {}
        if self.size > 1:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._ready)

    def _ready(self, p: nn.Parameter) -> None:
        if self.armed:
            self.pending[id(p)] = dist.all_reduce(p.grad, group=self.group, async_op=True)

    @torch.no_grad()
    def finish(self) -> None:
        for p in self.params:
            work = self.pending.pop(id(p), None)
            if work is not None:
                work.wait()
            elif self.size > 1:  # no gradient this step (or the hook did not fire): still a collective
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.group)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(self.scale)


def ddp(module: nn.Module, data_group, ignore: Iterable[nn.Parameter] = ()) -> DistributedDataParallel:
    """Wrap `module` in DDP over `data_group` (the dp x ep ranks), hiding the expert shards and `ignore`
    (parameters that get no gradient in this run, e.g. MTP modules trained with weight 0) from it. The
    routing buffers are not broadcast per forward: the counts are per rank until `reduce_counts`, and the
    bias is updated identically everywhere from the reduced counts. (`forward_sync_buffers=False` replaces the
    deprecated `broadcast_buffers=False`; it still broadcasts buffers once here, harmless: the bias is the same
    on every rank and the counts are zero when the model is wrapped.)"""
    skip = {id(p) for p in split_params(module)[1]} | {id(p) for p in ignore}
    names = [n for n, p in module.named_parameters() if id(p) in skip]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return DistributedDataParallel(module, process_group=data_group, forward_sync_buffers=False)


@contextlib.contextmanager
def accumulate(wrapped: nn.Module, experts: ExpertGradSync | None, sync: bool) -> Iterator[None]:
    """Forward + backward of one micro-batch; with `sync=False` (all but the last micro-batch of a step)
    gradients only accumulate locally, without communication."""
    ctx = wrapped.no_sync() if isinstance(wrapped, DistributedDataParallel) and not sync else contextlib.nullcontext()
    if experts is not None:
        experts.armed = sync
    with ctx:
        yield


# --- FSDP2 (`--dp-shard`): parameters, gradients and optimizer states sharded over the data ranks -----------
def fsdp(module: nn.Module, mesh, expert_mesh=None) -> None:
    """`fully_shard` every expert-parallel shard (over `expert_mesh`: the dp ranks holding the same experts;
    their reduce-scatter divides by dp, `scale_expert_grads` adds the missing 1/ep), every main layer (over
    `mesh`: all dp x ep ranks), then the root (embedding, final norm, head and the MTP modules: the MTP code
    calls their submodules directly rather than through the module's own forward, so their parameters are
    left to the root, which gathers them for the whole forward). Modifies `module` in place."""
    from torch.distributed.fsdp import fully_shard

    for m in module.modules():
        if isinstance(m, ExpertParallel):
            fully_shard(m, mesh=expert_mesh)
    for layer in module.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)


@torch.no_grad()
def scale_expert_grads(module: nn.Module, factor: float) -> None:
    """Multiply the expert shards' gradients by `factor` (FSDP2 x EP: 1/ep after the reduce-scatter's 1/dp,
    making 1/W; FSDP2's own divide factor would need a PREMUL_SUM reduction, which gloo lacks)."""
    for p in split_params(module)[1]:
        if p.grad is not None:
            _local(p.grad).mul_(factor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_sharded_grad_norm_(module: nn.Module, max_norm: float, group) -> torch.Tensor:
    """Global-norm clipping when every gradient is a shard (FSDP2): the local shards' squared sums, summed over
    `group` (dp x ep: the ranks together hold every replicated tensor once and, with EP, every expert once).
    Works on the local tensors, so it needs no DTensor dispatch."""
    grads = [_local(p.grad) for p in module.parameters() if p.grad is not None]
    total = torch.stack([g.float().pow(2).sum() for g in grads]).sum().double() if grads else torch.zeros(())
    dist.all_reduce(total, group=group)
    norm = total.sqrt().float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A (sharded) state dict with every DTensor gathered to a plain tensor. Collective."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in state.items()}


def local_optimizer_state(state: dict) -> dict:
    """An optimizer state dict with its DTensor moments replaced by this rank's local shards (picklable and
    small; `load_local_optimizer_state` puts them back)."""
    return {
        **state,
        "state": {i: {k: _local(v) for k, v in st.items()} for i, st in state["state"].items()},
    }


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `local_optimizer_state`: re-wrap each local shard as a DTensor laid out like its parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {}
    for i, st in state["state"].items():
        p = params[int(i)]
        out[i] = {
            k: (
                DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                if isinstance(p, DTensor) and v.dim() > 0
                else v
            )
            for k, v in st.items()
        }
    optimizer.load_state_dict({**state, "state": out})
