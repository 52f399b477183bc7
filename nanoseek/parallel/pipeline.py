"""Pipeline parallelism: stages cut from one built model, run by `torch.distributed.pipelining` schedules.

Stages. The main layers plus one unit for "norm + head + MTP" are split into contiguous, near-equal
stages (`split_layers`). A stage is a *view* of the model (`stage_view`): a shallow copy whose layer
ModuleDict keeps only its layers, with `embed_tokens` only on the first stage and `norm`/`lm_head`/`mtp`
only on the last; parameters are shared with the model passed in (so load weights before `wrap`, then use
only the returned module). `StageModule.forward(x, tokens)` returns hidden states, or on the last stage the
tuple (main logits, MTP logits of depth 1..D).

Schedules (torch 2.13): `Schedule1F1B` (one stage per rank, stage r on rank r) and `ScheduleDualPipeV`
(two stages per rank in a V: rank r holds stages r and 2*pp-1-r, so the first and last stages, i.e. the
embedding and the head, sit on rank 0; it needs >= 2*pp micro-batches). Both take the whole batch and cut
it into micro-batches along dim 0; gradients are summed over micro-batches (`scale_grads=False`) and the
loss of each micro-batch is divided by their number, so the gradient is that of the full-batch mean loss.

MTP and the shared embedding. MTP depth k embeds t_{i+k}, so the last stage needs the embedding. The
tokens reach it as a keyword argument that the schedule passes to every stage. The embedding is tied like
Megatron's input/output embeddings:
  * DualPipeV: the last stage's MTP layers point at the *same* `nn.Embedding` object as the first stage,
    which lives on the same rank; both stages' backward passes accumulate into one `.grad`. No comm.
  * 1F1B (pp > 1): the last rank keeps its own copy (the model was built identically on every rank) and
    `sync_tied_grads` all-reduces (sums) its gradient with the first rank's after backward, so both copies
    get the full gradient and stay equal after identical optimizer steps. The copy is excluded from the
    gradient norm and from checkpoints (`mirror_keys`).

Evaluation (`eval_step`) runs micro-batches through the stages one after the other with blocking send/recv:
torch 2.13's DualPipeV schedule cannot run forward-only.

MoE balance losses (`set_balance_losses`): each stage computes its own MoE layers' sequence-wise (and, for
the aux baseline, batch-level) loss in forward and attaches it to its output with `_AttachAux`, whose backward
feeds d(loss)/d(aux) = 1 / micro-batches into it; nothing travels between stages. The batch-level loss is
per micro-batch, as under gradient accumulation in the single process.

Not done: the V3 overlapped forward/backward chunk (`OVERLAP_F_B`) runs its two halves one after the other
(torch's default).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..balance import router_losses
from ..errors import NanoseekError
from ..model import Transformer
from ..model.moe import MoE
from ..model.transformer import lm_cross_entropy

SCHEDULES = ("1f1b", "dualpipev")


def split_layers(n_layers: int, n_stages: int, head_units: int = 1) -> list[list[int]]:
    """Contiguous near-equal split of `n_layers` layers plus `head_units` (norm + head + MTP) over stages."""
    units = n_layers + head_units
    if units < n_stages:
        raise NanoseekError(
            f"pipeline: {n_layers} layers (+{head_units} head) cannot fill {n_stages} stages: use a smaller --pp "
            "(DualPipeV has 2 stages per rank) or more layers"
        )
    cuts = [round(s * units / n_stages) for s in range(n_stages + 1)]
    return [list(range(cuts[s], min(cuts[s + 1], n_layers))) for s in range(n_stages)]


def stage_view(model: Transformer, layers: list[int], first: bool, last: bool, use_mtp: bool) -> Transformer:
    """The model restricted to one stage: same parameter objects, unowned parts removed."""
    m = copy.copy(model)
    m._modules, m._parameters, m._buffers = dict(model._modules), dict(model._parameters), dict(model._buffers)
    m.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
    if not first:
        m.embed_tokens = None
    if not last:
        m.norm, m.lm_head = None, None
    if not (last and use_mtp):
        m.mtp = nn.ModuleList()
    else:
        for layer in m.mtp:  # MTP embeds tokens: point it at the (first stage's or mirrored) embedding
            if layer.embed_tokens is None:
                layer.embed_tokens = model.embed_tokens
    return m


class _AttachAux(torch.autograd.Function):
    """Identity on x whose backward also sends `scale` into `aux` (a scalar balance loss computed inside this
    stage): the stage's MoE balance loss gets its gradient without travelling to the loss function on the
    last stage, as if `scale * aux` had been added to the loss there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.aux_meta = scale, (aux.shape, aux.dtype, aux.device)
        return x.clone()  # not x itself nor a view: the schedule detaches stage outputs in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class StageModule(nn.Module):
    def __init__(self, model: Transformer, index: int, n_stages: int, layers: list[int], use_mtp: bool):
        super().__init__()
        self.index, self.is_first, self.is_last = index, index == 0, index == n_stages - 1
        self.model = stage_view(model, layers, self.is_first, self.is_last, use_mtp)
        self.seq_alpha = self.batch_alpha = 0.0  # MoE balance losses (set by `Pipeline.set_balance_losses`)
        self.aux_scale = 1.0  # d(loss) / d(balance loss): 1 / micro-batches
        self.aux_sum: float | torch.Tensor = 0.0  # balance losses of this step's micro-batches, for logging

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None):
        """x: tokens [b, T] (first stage) or hidden [b, T, d]; tokens: the micro-batch's tokens (for MTP)."""
        m = self.model
        h = m.hidden(x)
        out = h if not self.is_last else m.logits(h)
        mtp = m.mtp_logits(h, tokens) if self.is_last else []
        if torch.is_grad_enabled() and (self.seq_alpha or self.batch_alpha):
            aux = router_losses(m, self.seq_alpha, self.batch_alpha)  # this stage's MoE layers (MTP's included)
            if aux is not None:
                self.aux_sum = self.aux_sum + aux.detach().float()  # stays on device: no host sync here
                out = _AttachAux.apply(out, aux, self.aux_scale)
        return out if not self.is_last else (out, *mtp)


def lm_loss(outputs: tuple[torch.Tensor, ...], targets: torch.Tensor, mtp_weight: float) -> tuple[torch.Tensor, ...]:
    """(total, main CE, mean MTP CE) with total = CE(main) + mtp_weight * mean_k CE(mtp_k), as in train.py."""
    ce, mtps = lm_cross_entropy(outputs[0], list(outputs[1:]), targets)
    if not mtps:
        return ce, ce, ce.new_zeros(())
    mtp = torch.stack(mtps).mean()
    return ce + mtp_weight * mtp, ce, mtp


class Pipeline(nn.Module):
    """This rank's pipeline stages plus the schedule that runs them. `step(tokens, targets)` runs forward and
    backward over all micro-batches and returns the loss (the same value on every pp rank)."""

    def __init__(
        self,
        model: Transformer,
        group: dist.ProcessGroup,
        schedule: str = "1f1b",
        n_microbatches: int | None = None,
        mtp_weight: float = 0.3,
        use_mtp: bool = True,
        device: torch.device | None = None,
        loss_fn: Callable | None = None,
    ):
        super().__init__()
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

        schedule = schedule.lower()
        if schedule not in SCHEDULES:
            raise NanoseekError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        pp, r = dist.get_world_size(group), dist.get_rank(group)
        self.group, self.pp, self.schedule_name = group, pp, schedule
        use_mtp = use_mtp and len(model.mtp) > 0
        # does MTP use the main embedding (rather than a separate one from a checkpoint)? Same on every rank.
        shares = use_mtp and any(layer.embed_tokens in (None, model.embed_tokens) for layer in model.mtp)
        n_stages = 2 * pp if schedule == "dualpipev" else pp
        self.n_stages, self.hidden_size = n_stages, model.cfg.hidden_size
        self.n_microbatches = n_microbatches or (n_stages if schedule == "dualpipev" else pp)
        if schedule == "dualpipev" and use_mtp and len(model.mtp) > 1:
            # torch 2.13's split backward (I, then one W pass per weight group) fails on the embedding shared by
            # chained MTP depths ("backward through the graph a second time"); retaining the graph avoids the
            # crash but multi-step runs then drift from the single process, so refuse it (1F1B is exact)
            raise NanoseekError(
                f"--pp-schedule dualpipev does not support MTP depth {len(model.mtp)} yet: "
                "use --mtp-depth 1 or --pp-schedule 1f1b"
            )
        if schedule == "dualpipev" and self.n_microbatches < n_stages:
            raise NanoseekError(f"DualPipeV needs --pp-microbatches >= 2 x pp = {n_stages}, got {self.n_microbatches}")
        split = split_layers(model.cfg.num_hidden_layers, n_stages)
        mine = [r, n_stages - 1 - r] if schedule == "dualpipev" else [r]
        self.stages = nn.ModuleList([StageModule(model, s, n_stages, split[s], use_mtp) for s in sorted(mine)])
        # MTP modules that no stage runs (training without MTP) still belong in checkpoints, unchanged; a plain
        # list, so that they are not registered as this module's parameters
        self.unused_mtp = [] if use_mtp else [model.mtp]
        self.last_rank = 0 if schedule == "dualpipev" else pp - 1  # pp-group rank holding the loss
        last = self.stages[-1]
        # 1F1B: the first and last ranks sum their embedding gradients; the last one's copy is a "mirror"
        self.tied = shares and pp > 1 and schedule == "1f1b"
        self.mirror: nn.Embedding | None = model.embed_tokens if self.tied and last.is_last else None
        # state-dict keys that repeat the embedding (the mirror, or DualPipeV's shared module)
        self.mirror_keys = [
            f"mtp.{k}.embed_tokens.weight"
            for k, layer in enumerate(last.model.mtp)
            if last.is_last and layer.embed_tokens is model.embed_tokens
        ]
        self.tied_group = None  # set by the plan when pp > 2 (the first and last ranks only)
        self.mtp_weight, self.loss_fn = mtp_weight, loss_fn or lm_loss
        self.last_parts: dict[str, float] = {}
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.device = device = device or torch.device("cpu")
        self.pstages = [PipelineStage(s, s.index, n_stages, device, group=group) for s in self.stages]
        pstages = self.pstages

        def loss(outputs, targets):
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            total, main, mtp = self.loss_fn(outputs, targets, self.mtp_weight)
            self._parts.append((main.detach(), mtp.detach()))
            return total / self.n_microbatches

        if schedule == "dualpipev":
            self.schedule = ScheduleDualPipeV(pstages, self.n_microbatches, loss_fn=loss, scale_grads=False)
        else:
            self.schedule = Schedule1F1B(pstages[0], self.n_microbatches, loss_fn=loss, scale_grads=False)
        # The schedule's first step runs an extra forward to infer shapes (on micro-batch 0, and on empty
        # tensors for later stages). It must not count as routed tokens, or the first loss-free bias update
        # would differ from the single-process one.
        name = "_initialize_stages" if hasattr(self.schedule, "_initialize_stages") else "_initialize_stage"
        init = getattr(self.schedule, name)

        def init_without_counting(*a, **k):  # nor as balance losses
            moes = self.moe_layers()
            alphas = [(st.seq_alpha, st.batch_alpha) for st in self.stages]
            for m in moes:
                m.count_tokens = False
            for st in self.stages:
                st.seq_alpha = st.batch_alpha = 0.0
            try:
                return init(*a, **k)
            finally:
                for m in moes:
                    m.count_tokens = True
                for st, (sa, ba) in zip(self.stages, alphas):
                    st.seq_alpha, st.batch_alpha = sa, ba

        setattr(self.schedule, name, init_without_counting)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_balance_losses(self, seq_alpha: float, batch_alpha: float) -> None:
        """Add the MoE balance losses (sequence-wise α, batch-level α) inside each stage: every stage computes
        its own layers' loss in forward and feeds its gradient (1 / micro-batches, like the LM loss) into
        backward through `_AttachAux`, so the pipeline trains the single-process objective."""
        for s in self.stages:
            s.seq_alpha, s.batch_alpha, s.aux_scale = seq_alpha, batch_alpha, 1.0 / self.n_microbatches

    def holds_loss(self) -> bool:
        return dist.get_rank(self.group) == self.last_rank

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward + backward of the whole batch (gradients accumulate into .grad); returns the mean loss."""
        if tokens.shape[0] % self.n_microbatches:
            raise NanoseekError(
                f"pipeline: batch {tokens.shape[0]} is not a multiple of {self.n_microbatches} micro-batches: "
                "make --batch-size a multiple of --pp-microbatches"
            )
        losses: list[torch.Tensor] = []
        self._parts = []
        for s in self.stages:
            s.aux_sum = 0.0
        args = (tokens,) if self.stages[0].is_first else ()
        self.schedule.step(*args, target=targets, losses=losses, tokens=tokens, return_outputs=False)
        total = self._gather_loss(losses)
        if any(s.seq_alpha or s.batch_alpha for s in self.stages):  # the balance losses, summed over stages
            aux = sum(s.aux_sum for s in self.stages)
            aux = torch.as_tensor(aux, dtype=torch.float64, device=self.device).reshape(1) / self.n_microbatches
            dist.all_reduce(aux, group=self.group)
            self.last_parts["aux_loss"] = aux.item()
            total = total + aux[0].float().cpu()
        return total

    def _gather_loss(self, losses: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
        """`losses` are already weighted; `weights` (default: 1 / micro-batches each) weight the parts."""
        out = torch.zeros(3, dtype=torch.float64, device=self.device)
        if self.holds_loss():
            weights = weights or [1.0 / self.n_microbatches] * self.n_microbatches
            parts = self._parts[-len(weights) :]  # the schedule's first step also calls the loss to infer shapes
            out[0] = float(sum(x.item() for x in losses))
            out[1] = float(sum(w * p[0].item() for w, p in zip(weights, parts)))
            out[2] = float(sum(w * p[1].item() for w, p in zip(weights, parts)))
        dist.broadcast(out, src=dist.get_global_rank(self.group, self.last_rank), group=self.group)
        self.last_parts = {"loss": out[1].item(), "mtp_loss": out[2].item()}
        return out[0].float()

    @torch.no_grad()
    def eval_step(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward only: the mean loss of the batch, on every pp rank. Micro-batches go through the stages
        one after the other with blocking send/recv (torch 2.13's DualPipeV cannot run forward-only)."""
        n_stages, pp, me = self.n_stages, self.pp, dist.get_rank(self.group)
        owner = [min(s, 2 * pp - 1 - s) if self.schedule_name == "dualpipev" else s for s in range(n_stages)]
        mine = {s.index: s for s in self.stages}
        losses: list[torch.Tensor] = []
        self._parts = []
        # a short last validation batch may give fewer chunks than micro-batches
        chunks = list(zip(tokens.chunk(self.n_microbatches), targets.chunk(self.n_microbatches)))
        # and uneven ones (7 rows -> 4 + 3): weight each chunk's mean loss by its rows, as one batch would
        weights = [len(tok) / len(tokens) for tok, _ in chunks]
        for (tok, tgt), w in zip(chunks, weights):
            h = None
            for s in range(n_stages):
                if owner[s] != me:
                    continue
                if s > 0 and owner[s - 1] != me:  # hidden states travel in fp32 (exact for bf16 too)
                    h = torch.empty(*tok.shape, self.hidden_size, device=self.device)
                    dist.recv(h, dist.get_global_rank(self.group, owner[s - 1]), group=self.group)
                out = mine[s](tok if s == 0 else h, tokens=tok)
                if s == n_stages - 1:
                    total, main, mtp = self.loss_fn(out, tgt, self.mtp_weight)
                    self._parts.append((main, mtp))
                    losses.append(total * w)
                else:
                    h = out
                    if owner[s + 1] != me:
                        dst = dist.get_global_rank(self.group, owner[s + 1])
                        dist.send(h.float().contiguous(), dst, group=self.group)
        return self._gather_loss(losses, weights)

    def sync_tied_grads(self) -> None:
        """1F1B with pp > 1: sum the embedding gradient of the first stage and the last stage's copy."""
        if not self.tied:
            return
        r = dist.get_rank(self.group)
        if r not in (0, self.pp - 1):
            return
        emb = self.stages[0].model.embed_tokens if r == 0 else self.mirror
        g = emb.weight.grad if emb.weight.grad is not None else torch.zeros_like(emb.weight)
        dist.all_reduce(g, group=self.tied_group or self.group)
        emb.weight.grad = g

    def mirror_params(self) -> list[nn.Parameter]:
        """Parameters that duplicate another rank's (count them once in norms and checkpoints)."""
        return list(self.mirror.parameters()) if self.mirror is not None else []

    def stage_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters and buffers under the single-process names (mirrors left out)."""
        out: dict[str, torch.Tensor] = {}
        for s in self.stages:
            out.update(s.model.state_dict())
        for k in self.mirror_keys:
            out.pop(k, None)
        return out
