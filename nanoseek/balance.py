"""Load balancing for DeepSeekMoE: the auxiliary-loss-free bias update, the balance losses, and MaxVio.

Loss-free balancing (Wang et al. 2024; V3 §2.1.2): after every optimizer step, each expert's routing bias
b_i moves by a fixed γ towards balance, b_i += γ · sign(mean_load − load_i), with the loads counted over the
whole (global) batch of the step. The paper's proportional variant (its Table 3; `rule="proportional"`) moves
by γ times the relative load error instead, b_i += γ · (mean_load − load_i) / mean_load: large steps while the
router is far from balance (early training, when it drifts fastest), small ones near balance (no ±γ dither).
The two rules also stop at different points. The sign rule is at rest when an expert is over the mean in half
of the batches, i.e. it equalises the experts' *median* batch loads; the proportional rule equalises their
*expected* loads. With V3's batches of millions of tokens the two coincide; with small batches whose content
favours some experts now and then (a batch of a few files' text), the sign rule leaves those experts
over-loaded on the whole stream (tests/test_train.py; BENCHMARKS.md, balance). `--bias-update-schedule lr`
scales γ like the learning rate (the trainer sets `rate` every step): fast while the router drifts fast,
quiet once the lr has decayed (on the `tiny` bench, no better than a constant γ within the noise).
The bias only changes which experts are *selected*; it never enters the gate weights or the gradient. The
update runs outside autograd, from an optimizer step hook.

Losses (each returns a scalar to add to the training loss):
- `seq_aux_loss`: V3's complementary sequence-wise loss, α Σ_i f_i P_i per sequence (eqs. 17-20), with
  f_i = E/(K·T) Σ_t 1[i ∈ TopK_t] and P_i = (1/T) Σ_t s'_{i,t}, s' the scores normalised per token.
- `batch_aux_loss`: the classic auxiliary loss over the whole batch (the baseline arm of the balance bench).

MaxVio = (max_i load_i − mean load) / mean load: per training batch (MaxVio_batch) and over the whole
validation set (MaxVio_global), per layer and averaged over layers.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from .model.moe import MoE
from .model.transformer import Transformer


def maxvio(counts: torch.Tensor) -> float:
    """counts [E] -> (max - mean) / mean (0 = perfectly balanced)."""
    c = counts.double()
    mean = c.mean()
    return float((c.max() - mean) / mean) if mean > 0 else 0.0


def _f_and_p(scores: torch.Tensor, idx: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [G*T, E], idx [G*T, K] -> f, P [G, E] over each of `groups` contiguous token groups."""
    E, K = scores.shape[-1], idx.shape[-1]
    s = scores.view(groups, -1, E)
    T = s.shape[1]
    chosen = torch.zeros_like(s).scatter_(2, idx.view(groups, T, K), 1.0)  # [G, T, E] 0/1
    f = chosen.sum(1) * (E / (K * T))
    p = (s / s.sum(-1, keepdim=True)).mean(1)
    return f, p


def seq_aux_loss(scores: torch.Tensor, idx: torch.Tensor, batch_shape: tuple[int, ...], alpha: float) -> torch.Tensor:
    """V3's sequence-wise balance loss, averaged over the sequences of the batch."""
    f, p = _f_and_p(scores, idx, batch_shape[0])
    return alpha * (f * p).sum(-1).mean()


def batch_aux_loss(scores: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """The conventional auxiliary balance loss over all tokens of the batch."""
    f, p = _f_and_p(scores, idx, 1)
    return alpha * (f * p).sum()


def router_losses(model: torch.nn.Module, seq_alpha: float, batch_alpha: float) -> torch.Tensor | None:
    """Sum of the enabled balance losses over every MoE layer that captured its router in this forward."""
    total = None
    for moe in model.modules():
        if not isinstance(moe, MoE) or moe.router_record is None:
            continue
        scores, idx, shape = moe.router_record
        moe.router_record = None
        term = 0.0
        if seq_alpha:
            term = term + seq_aux_loss(scores, idx, shape, seq_alpha)
        if batch_alpha:
            term = term + batch_aux_loss(scores, idx, batch_alpha)
        total = term if total is None else total + term
    return total


def capture_router(model: torch.nn.Module, enabled: bool) -> None:
    for moe in model.modules():
        if isinstance(moe, MoE):
            moe.capture_router = enabled


class LossFreeBalancer:
    """Moves each MoE layer's `e_score_correction_bias` by ±γ after every optimizer step.

    The MoE layers count routed tokens into `tokens_per_expert` during forward (all micro-batches of a step
    accumulate); `step()` all-reduces them over `group` when running distributed (so the update sees the
    global batch), records MaxVio_batch, updates the biases when γ > 0, and zeroes the counters.
    """

    RULES = ("sign", "proportional")

    def __init__(self, model: torch.nn.Module, rate: float = 1e-3, group=None, rule: str = "sign", stage_group=None):
        if rule not in self.RULES:
            raise ValueError(f"bias update rule must be one of {self.RULES}, got {rule!r}")
        self.rule = rule
        # main-model MoE layers first, then the MTP layers' (all are updated; MaxVio reports the main ones)
        mtp = lambda n: n.startswith("mtp.") or ".mtp." in n
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE) and not mtp(n)]
        main = [m for _, m in named]
        self.layers = main + [m for m in model.modules() if isinstance(m, MoE) and m not in main]
        self.n_main = len(main)
        self.rate, self.group = rate, group
        self.last_counts: list[torch.Tensor] = []  # this rank's layers (main, then MTP), summed over `group`
        self.last_main: list[torch.Tensor] = []  # every main layer's, in layer order (all stages)
        # pipeline: the main layers are spread over the stages of `stage_group`; the reports gather them
        self.stage_group = stage_group
        if stage_group is not None:
            self.layer_ids = [int(re.search(r"(?:^|\.)layers\.(\d+)\.", n + ".").group(1)) for n, _ in named]
            cfg = next(m.cfg for m in model.modules() if isinstance(m, Transformer))
            self.shape = (cfg.num_hidden_layers, cfg.n_routed_experts)
            self.device = next(model.parameters()).device

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run `step()` after each optimizer step (skipped steps never call the optimizer, so no update)."""
        return optimizer.register_step_post_hook(lambda *_: self.step())

    def _gather(self) -> list[torch.Tensor]:
        counts = [m.tokens_per_expert.clone() for m in self.layers]
        if self.group is not None or (dist.is_available() and dist.is_initialized()):
            flat = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
            dist.all_reduce(flat, group=self.group)
            counts = list(flat.split([c.numel() for c in counts]))
        return counts

    def _all_stages(self, main: list[torch.Tensor]) -> list[torch.Tensor]:
        """Main-layer counts of every pipeline stage in layer order (collective over `stage_group`): one row per
        layer plus a flag column marking the MoE layers; each layer lives on exactly one stage, so a sum."""
        if self.stage_group is None:
            return [c.cpu() for c in main]
        L, E = self.shape
        rows = torch.zeros(L, E + 1, dtype=torch.long, device=self.device)
        for i, c in zip(self.layer_ids, main):
            rows[i, :E], rows[i, E] = c, 1
        dist.all_reduce(rows, group=self.stage_group)
        return [r[:E].cpu() for r in rows if r[E] > 0]

    @torch.no_grad()
    def step(self) -> None:
        counts = self._gather()
        self.last_counts = [c.cpu() for c in counts]
        self.last_main = self._all_stages(counts[: self.n_main])
        for moe, c in zip(self.layers, counts):
            bias = moe.gate.e_score_correction_bias
            if self.rate and bias is not None and c.sum() > 0:
                mean = c.float().mean()
                err = mean - c.float()  # > 0: under-loaded, raise its bias
                step = torch.sign(err) if self.rule == "sign" else err / mean
                bias += self.rate * step.to(bias)
            moe.tokens_per_expert.zero_()

    def reset(self) -> None:
        """Drop the counts of a skipped step."""
        for moe in self.layers:
            moe.tokens_per_expert.zero_()

    def maxvio_batch(self) -> list[float]:
        """Per-layer MaxVio of the last step's (global) batch, main-model layers (as the papers report it)."""
        return [maxvio(c) for c in self.last_main if c.sum() > 0]

    def main_counts(self) -> list[torch.Tensor]:
        """Tokens per expert of each main-model MoE layer since the last reset (e.g. over a validation pass), of
        every pipeline stage (collective under PP)."""
        return self._all_stages([m.tokens_per_expert.clone() for m in self.layers[: self.n_main]])
