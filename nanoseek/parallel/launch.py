"""Launch helpers: `init_distributed()` from torchrun's environment and `ParallelPlan`, the small API the
training loop calls (docs/parallel.md shows where).

Ranks form a (pp, dp, ep) DeviceMesh, ep innermost: EP peers are consecutive ranks, so they share a node
when ep <= ranks per node, and node-limited routing sees nodes of consecutive experts. Without
torch.distributed (a plain `python -m nanoseek ...`), every method is the single-process no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ModelConfig
from ..errors import NanoseekError
from . import dp as dp_mod
from . import ep as ep_mod
from .pipeline import SCHEDULES, Pipeline


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialise the default process group from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR/PORT):
    nccl on CUDA (one GPU per LOCAL_RANK), gloo on CPU. Returns False when not launched by torchrun.
    `timeout_s` bounds how long a collective waits for its peers (torch's default: 10 minutes)."""
    if dist.is_available() and dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"), **kw)
    global RANKS_CONNECTED
    RANKS_CONNECTED = True
    return True


# set once this process has joined its peers: from then on an error may be this rank's own (`cli.main` prints
# errors of ranks other than 0 only then; before it, every rank checks the same inputs and fails alike)
RANKS_CONNECTED = False


def clip_grad_norm_if_over(params, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_`, bit for bit, without its multiply when it would scale by exactly 1.

    torch always multiplies every gradient by min(1, max_norm / (norm + 1e-6)), a full pass over the gradients
    (20 ms per step at `small`, 1.5% of it) that changes nothing on the ~80% of steps whose norm is below
    max_norm. Reading the norm costs a host sync, which the trainer pays anyway to log it."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if float(max_norm / (norm + 1e-6)) < 1.0:  # NaN/inf norms: no scaling; the trainer skips the step
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class ParallelPlan:
    """Process groups for pipeline x data x expert parallelism and the calls a training loop needs.

    pp: pipeline stages (ranks); ep: expert-parallel ranks; dp: data-parallel replicas (default: the rest
    of the world). pp_schedule: "1f1b" or "dualpipev"; microbatches: per step (default: the least the
    schedule accepts). fp8_dispatch: E4M3 token dispatch; overlap: two-half comm/compute overlap in EP.
    ranks_per_node (default LOCAL_WORLD_SIZE) and max_nodes_per_token enable node-limited routing.
    dp_shard: FSDP2 instead of DDP for the data-parallel ranks (parameters, gradients and optimizer states
    sharded: ZeRO-3); composes with EP, not with PP.
    """

    def __init__(
        self,
        pp: int = 1,
        ep: int = 1,
        dp: int | None = None,
        pp_schedule: str = "1f1b",
        microbatches: int | None = None,
        fp8_dispatch: bool = False,
        overlap: bool = False,
        ranks_per_node: int | None = None,
        max_nodes_per_token: int | None = None,
        mtp_weight: float = 0.3,
        dp_shard: bool = False,
    ):
        self.distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        if world == 1 and pp * ep > 1:  # a plain `nanoseek train --ep 2`
            flags = " x ".join(f"--{k} {v}" for k, v in (("pp", pp), ("ep", ep)) if v > 1)
            raise NanoseekError(
                f"{flags} needs {pp * ep} processes (or a multiple): launch with "
                f"`torchrun --nproc-per-node {pp * ep} -m nanoseek ...`"
            )
        if world % (pp * ep):
            raise NanoseekError(
                f"world size {world} is not divisible by pp x ep = {pp * ep}: launch with torchrun --nproc-per-node N "
                f"where N is a multiple of {pp * ep}"
            )
        dp = dp or world // (pp * ep)
        if pp * dp * ep != world:
            raise NanoseekError(f"pp {pp} x dp {dp} x ep {ep} != world size {world}: launch {pp * dp * ep} processes")
        if pp_schedule.lower() not in SCHEDULES:
            raise NanoseekError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {pp_schedule!r}")
        self.pp, self.dp, self.ep, self.world = pp, dp, ep, world
        if dp_shard and pp > 1:
            raise NanoseekError("--dp-shard (FSDP2) does not run under pipeline parallelism (--pp) yet: drop one")
        self.dp_shard = dp_shard
        self.pp_schedule, self.microbatches = pp_schedule.lower(), microbatches
        self.fp8_dispatch, self.overlap, self.mtp_weight = fp8_dispatch, overlap, mtp_weight
        self.ranks_per_node = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        self.max_nodes_per_token = max_nodes_per_token
        self.mesh = self.data_mesh = self.pp_group = self.ep_group = self.dp_group = self.data_group = None
        self.pp_rank, self.dp_rank, self.ep_rank = 0, 0, 0
        self.tied_group, self.n_microbatches = None, microbatches
        self._experts: dict[int, dp_mod.ExpertGradSync] = {}  # id(model) -> its hooks, for data_parallel
        self._sharded: set[int] = set()  # id(model) of models sharded with FSDP2 by data_parallel
        # where small collective tensors live: NCCL only moves CUDA tensors, gloo is used on CPU
        nccl = self.distributed and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        if self.distributed:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (pp, dp, ep), mesh_dim_names=("pp", "dp", "ep"))
            self.pp_group, self.dp_group, self.ep_group = (self.mesh.get_group(n) for n in ("pp", "dp", "ep"))
            self.data_mesh = self.mesh["dp", "ep"]._flatten("dp_ep")
            self.data_group = self.data_mesh.get_group()
            self.pp_rank, self.dp_rank, self.ep_rank = (self.mesh.get_local_rank(n) for n in ("pp", "dp", "ep"))
            if pp > 2:  # first and last stage of each (dp, ep) column, for the tied MTP embedding (1F1B)
                ranks = self.mesh.mesh  # [pp, dp, ep] global ranks
                for i in range(dp):
                    for j in range(ep):
                        g = dist.new_group([int(ranks[0, i, j]), int(ranks[pp - 1, i, j])])
                        if self.rank in (int(ranks[0, i, j]), int(ranks[pp - 1, i, j])):
                            self.tied_group = g
        self.data_rank, self.data_world = self.dp_rank * ep + self.ep_rank, dp * ep

    # --- set-up ----------------------------------------------------------------------------------------
    def layout(self) -> dict:
        """What a checkpoint's optimizer states and loss curve depend on besides the world size (stored in it;
        resuming under another layout is refused). Call after `wrap`."""
        out = {"pp": self.pp, "dp": self.dp, "ep": self.ep, "dp_shard": self.dp_shard and self.data_world > 1}
        if self.pp > 1:
            out.update(pp_schedule=self.pp_schedule, pp_microbatches=self.n_microbatches)
        if self.max_nodes_per_token and self.ep > 1:  # node-limited routing
            out.update(nodes=self.n_nodes, max_nodes_per_token=self.max_nodes_per_token)
        return out

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def counts_group(self):
        """The group to sum MoE routing counts over (LossFreeBalancer(group=...)): this stage's dp x ep ranks."""
        return self.data_group

    @property
    def n_nodes(self) -> int:
        return max(1, self.ep // self.ranks_per_node)

    def routing_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config the gates route with under this plan: node-limited routing (--max-nodes-per-token with EP
        over several nodes) is group-limited routing over nodes, so it belongs in the model's config; a run
        built from it saves it in config.json, and a single process then serves the model with the routing it
        was trained with (V3's own config encodes its node limit the same way: n_group 8, topk_group 4)."""
        if not (self.max_nodes_per_token and self.ep > 1):
            return cfg
        if self.ep % self.ranks_per_node and self.ranks_per_node % self.ep:
            raise NanoseekError(f"--ranks-per-node {self.ranks_per_node} must divide ep {self.ep} (or vice versa)")
        return ep_mod.node_limit_config(cfg, self.n_nodes, self.max_nodes_per_token)

    def wrap(self, model: nn.Module, device: torch.device | None = None, use_mtp: bool = True) -> nn.Module:
        """Apply node-limited routing, expert parallelism and pipeline stages to a built (and loaded) model,
        identical on every rank (same seed). Returns the module to train: the model itself, or a `Pipeline`
        when pp > 1 (then use only the returned module; `use_mtp=False` leaves the MTP layers out)."""
        if self.max_nodes_per_token and self.ep > 1:
            if self.ep % self.ranks_per_node and self.ranks_per_node % self.ep:
                raise NanoseekError(f"--ranks-per-node {self.ranks_per_node} must divide ep {self.ep} (or vice versa)")
            ep_mod.apply_node_limit(model, self.n_nodes, self.max_nodes_per_token)
        if self.ep > 1:
            chunks = 2 if self.overlap else 1
            ep_mod.shard_experts(model, self.ep_group, self.ranks_per_node, self.fp8_dispatch, chunks)
        if self.pp > 1:
            dev = device or self.device
            pipe = Pipeline(model, self.pp_group, self.pp_schedule, self.microbatches, self.mtp_weight, use_mtp, dev)
            pipe.tied_group = self.tied_group
            self.n_microbatches = pipe.n_microbatches
            return pipe
        return model

    def data_parallel(self, model: nn.Module, ignore: list[nn.Parameter] | None = None) -> nn.Module:
        """The module to run forward/backward through: `DistributedDataParallel` over the dp x ep ranks
        (expert shards averaged over dp by async hooks, `dp.ExpertGradSync`) when this rank has data-parallel
        peers and no pipeline; with `dp_shard`, `model` itself after FSDP2 sharded it in place; else `model`.
        Call after `wrap` (and FP8 conversion); keep using `model` for everything else (optimizer, checkpoints,
        evaluation). `ignore`: parameters without a gradient in this run (DDP would wait for them forever)."""
        if not self.distributed or self.data_world == 1 or self.pp > 1:
            return model
        if self.dp_shard:  # FSDP2 shards in place: the model is also what forward runs through
            dp_mod.fsdp(model, self.data_mesh, self.mesh["dp"])
            self._sharded.add(id(model))
            return model
        wrapped = dp_mod.ddp(model, self.data_group, ignore or [])
        self._experts[id(model)] = dp_mod.ExpertGradSync(model, self.dp_group, self.data_world)
        return wrapped

    def accumulate(self, wrapped: nn.Module, sync: bool = True):
        """Context for one micro-batch's forward + backward; `sync=False` for all but the last of a step
        (DDP's `no_sync`; the expert hooks stay quiet too)."""
        if id(wrapped) in self._sharded:  # FSDP2: reduce-scatter only in the last micro-batch's backward
            wrapped.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        inner = wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped
        return dp_mod.accumulate(wrapped, self._experts.get(id(inner)), sync)

    def shard_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (the same on every rank): one slice per (dp, ep) rank."""
        if self.data_world == 1:
            return batch
        if batch.shape[0] % self.data_world:
            raise NanoseekError(f"batch {batch.shape[0]} does not split over {self.data_world} data ranks")
        return batch.chunk(self.data_world)[self.data_rank]

    # --- per step --------------------------------------------------------------------------------------
    def train_step(self, wrapped: Pipeline, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """PP only: forward + backward of this rank's batch through the pipeline; returns the local loss."""
        return wrapped.step(tokens, targets)

    def eval_step(self, wrapped: Pipeline, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """PP only: forward-only loss of a batch (evaluation), the same on every pp rank."""
        return wrapped.eval_step(tokens, targets)

    def sync_grads(self, wrapped: nn.Module) -> None:
        """After backward, before clipping: tied embedding (PP) and data-parallel gradient averaging (the rest
        of it, after `data_parallel`). Pass the model, not the DDP wrapper."""
        if isinstance(wrapped, Pipeline):
            wrapped.sync_tied_grads()
        if id(wrapped) in self._sharded:  # FSDP2 reduce-scattered (and averaged) the gradients in backward
            if self.ep > 1:  # expert shards: averaged over their dp ranks, the global mean needs 1/(dp x ep)
                dp_mod.scale_expert_grads(wrapped, 1.0 / self.ep)
            return
        if id(wrapped) in self._experts:  # DDP averaged the replicated parameters during backward
            self._experts[id(wrapped)].finish()
        elif self.distributed:
            dp_mod.sync_grads(wrapped, self.data_group, self.dp_group, self.data_world)

    def clip_grad_norm_(self, wrapped: nn.Module, max_norm: float) -> torch.Tensor:
        """Replaces torch.nn.utils.clip_grad_norm_: the norm of the global (all-rank) gradient."""
        if not self.distributed:
            return clip_grad_norm_if_over(wrapped.parameters(), max_norm)
        if id(wrapped) in self._sharded:
            return dp_mod.clip_sharded_grad_norm_(wrapped, max_norm, self.data_group)
        exclude = wrapped.mirror_params() if isinstance(wrapped, Pipeline) else []
        return dp_mod.clip_grad_norm_(wrapped, max_norm, self.ep_group, self.pp_group, exclude)

    def reduce_counts(self, wrapped: nn.Module) -> None:
        """Sum `tokens_per_expert` over this stage's dp x ep ranks (before the loss-free bias update)."""
        if self.distributed:
            dp_mod.reduce_counts(wrapped, self.data_group)

    def mean_over_data(self, value: float | torch.Tensor) -> float:
        """Average a logged scalar (e.g. the local loss) over the dp x ep ranks."""
        t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone().to(self.device)
        if self.distributed and self.data_world > 1:
            dist.all_reduce(t, group=self.data_group)
            t /= self.data_world
        return float(t)

    def all_ranks(self, ok: bool) -> bool:
        """True only if `ok` holds on every rank. Use it for decisions that gate collectives (skip a step on a
        NaN loss): one rank skipping backward while the others run it would hang them in the all-to-all."""
        if not self.distributed:
            return bool(ok)
        t = torch.tensor([1.0 if bool(ok) else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def comm_report(self, wrapped: nn.Module, reset: bool = True) -> dict:
        """EP traffic since the last reset, summed over all ranks: bytes per token per MoE layer (dispatch +
        combine, off-rank only) and the most nodes any token's experts spanned."""
        total = ep_mod.CommStats()
        for m in ep_mod.ep_modules(wrapped):
            total.merge(m.stats)
            if reset:
                m.stats.reset()
        return ep_mod.all_reduce_stats(total, device=self.device).report()

    # --- checkpoints -----------------------------------------------------------------------------------
    def full_state_dict(self, wrapped: nn.Module) -> dict[str, torch.Tensor]:
        """The single-process state dict (experts gathered, stages merged), on every rank. Collective.
        Gathers whole tensors: meant for the small models this CPU-first project trains."""
        if not self.distributed:
            return wrapped.state_dict()
        if id(wrapped) in self._sharded:
            return ep_mod.gather_experts(wrapped, dp_mod.full_tensors(wrapped.state_dict()))
        if isinstance(wrapped, Pipeline):
            state = ep_mod.gather_experts(nn.ModuleList([s.model for s in wrapped.stages]), {})
            local = wrapped.stage_state_dict()
            local.update({k.split(".", 1)[1]: v for k, v in state.items()})  # drop the ModuleList index
            parts: list = [None] * self.pp
            dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()}, group=self.pp_group)
            out: dict[str, torch.Tensor] = {}
            for p in parts:
                out.update(p)
            for mtp in wrapped.unused_mtp:  # the same on every rank (never trained): experts gathered over EP
                out.update({f"mtp.{k}": v for k, v in ep_mod.gather_experts(mtp).items()})
            return out
        return ep_mod.gather_experts(wrapped)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's optimizer state for a checkpoint (FSDP2 moments as local shards)."""
        return dp_mod.local_optimizer_state(optimizer.state_dict()) if self._sharded else optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Inverse of `optimizer_state` (call after `data_parallel`)."""
        if self._sharded:
            dp_mod.load_local_optimizer_state(optimizer, state)
        else:
            optimizer.load_state_dict(state)

    def load_full_state_dict(self, wrapped: nn.Module, full: dict[str, torch.Tensor]) -> None:
        """Load a single-process state dict into the wrapped (sharded / staged) model."""
        mods = [s.model for s in wrapped.stages] if isinstance(wrapped, Pipeline) else [wrapped]
        for m in mods:
            own = m.state_dict()
            m.load_state_dict({k: v for k, v in ep_mod.shard_state(m, full).items() if k in own}, strict=False)
            if isinstance(wrapped, Pipeline):
                for k in wrapped.mirror_keys:
                    if k in own:
                        own[k].copy_(full["embed_tokens.weight"])

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


# --- local multi-process runs (tests and benches) ---------------------------------------------------------
def _local_entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    init_distributed("gloo", timeout_s=300)  # a rank stuck in a collective fails instead of waiting 10 min
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_local(fn, world: int, *args) -> None:
    """Run `fn(rank, world, *args)` on `world` gloo ranks of this machine, one thread each (as torchrun would).
    Forks where possible (about 0.1 s, against seconds per rank to re-import torch under spawn); `fn` must be
    a module-level function. A rank's exception is re-raised here with its traceback."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fork = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
    mp.start_processes(
        _local_entry, args=(world, port, fn, args), nprocs=world, join=True, start_method="fork" if fork else "spawn"
    )
