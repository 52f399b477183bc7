"""`nanoseek train`: pre-train a DeepSeek-V3-style model, CPU first.

One step = `grad_accum` micro-batches of next-token prediction plus the weighted MTP loss
(λ/D Σ_k L^k, V3 §2.2) and the enabled balance losses, then gradient clipping, AdamW and the loss-free
routing-bias update (an optimizer step hook, outside autograd). Mixed precision follows the V3 recipe:
fp32 master weights and optimizer states, bf16 compute through autocast (the gate, norms, softmax and
loss stay fp32), or the FP8 recipe on top of it (`--precision fp8`).

Outputs in --out: config.json (the model), tokenizer.json, train_config.json (every setting; replay with
--config), metrics.jsonl (one object per step and per evaluation) and checkpoints/step_*/ (model, tokenizer,
optimizer/scheduler/data/RNG state), written atomically so a kill never leaves a broken checkpoint. --resume
continues bit-identically: the loss curve matches the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .atomic import atomic_write_text
from .balance import LossFreeBalancer, capture_router, maxvio, router_losses
from .cli import set_threads
from .config import ModelConfig, config_fields, get_preset
from .cpu_malloc import keep_freed_memory
from .data import TokenStream, corpus_from_spec, default_corpus, val_batches
from .errors import NanoseekError
from .model import Transformer
from .model.moe import Gate
from .model.transformer import lm_cross_entropy
from .parallel.launch import ParallelPlan, init_distributed
from .tokenizer import Tokenizer, check_vocab_fits, get_tokenizer
from .train_checkpoint import CheckpointMixin
from .train_config import TrainConfig, add_arguments, from_args, run_dir_of, validate


# --- model and optimizer -------------------------------------------------------------------------------------
def build_model_config(tc: TrainConfig) -> ModelConfig:
    cfg = get_preset(tc.preset)
    if tc.model_config:
        try:
            extra = json.loads(Path(tc.model_config).read_text())
        except (OSError, ValueError) as e:
            raise NanoseekError(f"cannot read --model-config {tc.model_config}: {e}") from None
        extra = config_fields(extra, f"--model-config {tc.model_config}")
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **extra}, tc.model_config)
    kw = dict(ModelConfig.parse_override(item) for item in tc.override)
    if tc.mtp_depth is not None:
        kw["num_nextn_predict_layers"] = tc.mtp_depth
    return cfg.replace(**kw) if kw else cfg


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains and other vectors are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}]
    kw = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8)
    if tc.optim_states == "bf16":
        from .optim import AdamWLowPrecisionStates

        return AdamWLowPrecisionStates(groups, state_dtype=torch.bfloat16, **kw)
    # the fused kernel makes one pass over params, grads and moments: on CPU it is ~6x faster than the
    # default multi-tensor path, which at small batch sizes cost as much as the forward and backward
    return torch.optim.AdamW(groups, fused=True, **kw)


def lr_lambda(tc: TrainConfig):
    warmup = tc.warmup_steps if tc.warmup_steps is not None else max(10, tc.steps // 20)

    def f(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, tc.steps - warmup))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# --- losses --------------------------------------------------------------------------------------------------
def lm_losses(model: Transformer, x: torch.Tensor, y: torch.Tensor, use_mtp: bool):
    """(main next-token CE, [CE of each MTP depth]). MTP depth k at position i predicts t_{i+k+1} = y[:, i+k]."""
    main, mtps = model(x, mtp=True) if use_mtp else (model(x), [])  # via forward: DDP hooks it
    return lm_cross_entropy(main, mtps, y)


def mtp_only_params(model: Transformer) -> list[torch.nn.Parameter]:
    """The MTP modules' own parameters (not the embedding/head they share with the main model)."""
    main = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith("mtp.")}
    return [p for p in model.mtp.parameters() if id(p) not in main]


def _same_tokenizer(tok: Tokenizer, path: str) -> bool:
    try:
        return tok.same_as(Tokenizer.from_file(path))
    except NanoseekError:  # missing or unreadable
        return False


class Trainer(CheckpointMixin):
    def __init__(self, tc: TrainConfig):
        validate(tc)
        self.tc = tc
        set_threads(tc.threads)
        self.out = tc.resolved_out()
        self.resume_from = None
        self.newer_checkpoints: list[Path] = []  # a rewind's abandoned checkpoints, moved aside on resume
        if tc.resume is not None:
            self.out = run_dir_of(tc.resume, tc)
            # rank 0 repairs saves a kill interrupted; the others list the checkpoints only after that, or they
            # could resume from an older step than rank 0 (a checkpoint set aside as .old is not listed)
            distributed = init_distributed()
            if not distributed or dist.get_rank() == 0:
                for line in ckpt.recover_interrupted_saves(self.out):
                    print(f"{self.out}: {line}", file=sys.stderr)
            if distributed:
                dist.barrier()
            found = ckpt.list_checkpoints(self.out)
            if tc.resume != "latest" and Path(tc.resume).parent.name == "checkpoints":
                self.newer_checkpoints = found[found.index(Path(tc.resume)) + 1 :] if Path(tc.resume) in found else []
                found = [p for p in found if p == Path(tc.resume)]
            if not found:
                raise NanoseekError(f"--resume: no checkpoint found in {self.out}")
            if tc.resume != "latest" and tc.out is not None and Path(tc.out).resolve() != self.out.resolve():
                # the run continues in its own directory: an --out elsewhere would be recorded but never used
                raise NanoseekError(
                    f"--resume {tc.resume} continues the run in {self.out}, but --out is {tc.out}: drop --out "
                    "(or copy the run directory there and resume the copy)"
                )
            self.resume_from = found[-1]
        elif ckpt.list_checkpoints(self.out):
            # a fresh run here would mix its checkpoints with the old run's (the newest step wins when loading)
            raise NanoseekError(
                f"{self.out} already holds a run's checkpoints: continue it with --resume, or choose another --out"
            )
        elif self.out.is_dir() and any(self.out.iterdir()) and not (self.out / "train_config.json").is_file():
            # the run writes config.json, tokenizer files and metrics.jsonl here: an HF model directory or any
            # other folder would be overwritten (a run directory that died before its first checkpoint is reused)
            raise NanoseekError(f"--out {self.out} is a non-empty directory that is not a nanoseek run: choose another")
        elif self.out.exists() and not self.out.is_dir():
            raise NanoseekError(f"--out {self.out} is a file, not a directory")

        # data and tokenizer
        self.corpus = corpus_from_spec(tc.data) if tc.data else default_corpus()
        self.cfg = build_model_config(tc)
        if tc.seq_len > self.cfg.max_position_embeddings:  # a model trained past its context that generate refuses
            raise NanoseekError(
                f"--seq-len {tc.seq_len} exceeds the model's max_position_embeddings "
                f"{self.cfg.max_position_embeddings} (raise it with --override max_position_embeddings=N)"
            )
        run_tok = next(
            (d / "tokenizer.json" for d in (self.resume_from, self.out) if d and (d / "tokenizer.json").is_file()),
            None,
        )
        if self.resume_from is not None and run_tok is not None:
            # the tokenizer the checkpoint was trained with, not --tokenizer's path (replayed from
            # train_config.json): that file may have been moved or changed since
            self.tok = Tokenizer.from_file(run_tok)
            if tc.tokenizer and os.environ.get("RANK", "0") == "0" and not _same_tokenizer(self.tok, tc.tokenizer):
                print(f"note: --tokenizer {tc.tokenizer} is gone or changed; resuming with {run_tok}", file=sys.stderr)
        elif tc.tokenizer:
            self.tok = Tokenizer.from_file(tc.tokenizer)
            check_vocab_fits(self.tok, self.cfg.vocab_size, tc.tokenizer)
            lost = self.tok.round_trip_loss()
            if lost and os.environ.get("RANK", "0") == "0":
                print(
                    f"note: --tokenizer {tc.tokenizer} is lossy ({lost}): the model trains on altered text",
                    file=sys.stderr,
                )
        else:
            self.tok = get_tokenizer(self.corpus, self.cfg.vocab_size)
            check_vocab_fits(self.tok, self.cfg.vocab_size, self.tok.source)
            n, V = self.tok.vocab_size, self.cfg.vocab_size
            if n < V and self.resume_from is None and os.environ.get("RANK", "0") == "0":
                print(
                    f"note: this corpus supports a {n}-token BPE, the model has {V} ids: the other {V - n} are "
                    "never trained and never generated (more text, or --override vocab_size=N, uses them)",
                    file=sys.stderr,
                )

        # parallelism: a no-op plan without torchrun; under torchrun the same seed builds identical replicas,
        # which `plan.wrap` shards (experts over EP ranks, layers over PP stages; DP takes the other ranks)
        init_distributed()
        self.plan = ParallelPlan(
            pp=tc.pp, ep=tc.ep, pp_schedule=tc.pp_schedule, microbatches=tc.pp_microbatches,
            fp8_dispatch=tc.fp8_dispatch, overlap=tc.ep_overlap, ranks_per_node=tc.ranks_per_node,
            max_nodes_per_token=tc.max_nodes_per_token, mtp_weight=tc.mtp_weight, dp_shard=tc.dp_shard,
        )  # fmt: skip
        self.is_main = self.plan.is_main
        if tc.keep_freed_memory and self.plan.device.type == "cpu":
            keep_freed_memory()

        # model, optimizer, schedule, balancing
        self.cfg = self.plan.routing_config(self.cfg)  # node-limited routing, recorded in config.json
        torch.manual_seed(tc.seed)
        core = Transformer(self.cfg)
        # MTP runs when some step gives it a weight (--mtp-weight-late counts only with a drop step)
        late = tc.mtp_weight_drop_step is not None and tc.mtp_weight_late > 0
        self.use_mtp = bool(len(core.mtp)) and (tc.mtp_weight > 0 or late)
        if self.resume_from is not None:
            self._check_config(self.resume_from)
            core.load_state_dict(ckpt.read_weights(self.resume_from), strict=True)
        self.core = core  # the full single-process model (config, checkpoint layout)
        self.model = self.plan.wrap(core, use_mtp=self.use_mtp)
        if tc.precision == "fp8":  # after wrapping: expert-parallel modules get the FP8 expert GEMMs too
            from .fp8_linear import convert_to_fp8

            convert_to_fp8(self.model, granularity=tc.fp8_granularity)
        self.model.train()
        # what forward/backward run through: DDP when there are data-parallel peers (and no pipeline)
        self.train_model = self.plan.data_parallel(self.model, ignore=[] if self.use_mtp else mtp_only_params(core))
        self.optimizer = build_optimizer(self.model, tc)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tc))
        default_seq = 1e-4 if tc.balance == "loss-free" else 0.0
        self.seq_alpha = tc.seq_aux_alpha if tc.seq_aux_alpha is not None else default_seq
        self.batch_alpha = tc.aux_alpha if tc.balance == "aux" else 0.0
        if self.plan.pp > 1:  # each stage adds its own layers' balance loss (see Pipeline.set_balance_losses)
            self.model.set_balance_losses(self.seq_alpha, self.batch_alpha)
        capture_router(self.model, bool(self.seq_alpha or self.batch_alpha))
        self.bias_rate = tc.bias_update_rate if tc.balance == "loss-free" else 0.0
        gates = [m for m in core.modules() if isinstance(m, Gate)]
        if self.bias_rate and gates and all(g.e_score_correction_bias is None for g in gates) and self.is_main:
            # the default --balance with a router that has no bias to move (V2's greedy/softmax gates)
            print(
                f"note: --balance loss-free needs a routing bias (topk_method noaux_tc); this model's is "
                f"{self.cfg.topk_method}: no balancing (use --balance aux)",
                file=sys.stderr,
            )
        self.balancer = LossFreeBalancer(
            self.model, self.bias_rate, group=self.plan.counts_group, rule=tc.bias_update,
            stage_group=self.plan.pp_group if self.plan.pp > 1 else None,  # MaxVio over every stage's layers
        )  # fmt: skip
        self.balancer.attach(self.optimizer)
        self.forward = torch.compile(lm_losses) if tc.compile else lm_losses

        self.stream = TokenStream(self.corpus, self.tok, tc.seq_len, seed=tc.seed, shuffle_rows=tc.window_rows())
        self.val = val_batches(self.corpus, self.tok, tc.seq_len, tc.batch_size, tc.eval_tokens)
        self.step = 0
        self.tokens_seen = 0
        self.nan_skips = self.consecutive_nan = 0
        self.elapsed = 0.0
        self.last_eval: dict = {}
        if self.resume_from is not None:
            self._load_state(self.resume_from)
        elif self.is_main:
            self._init_out_dir()

    # --- bookkeeping -----------------------------------------------------------------------------------------
    def _init_out_dir(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps({"format": ckpt.FORMAT, **self.cfg.to_dict()}, indent=2))
            self.tok.save_to_dir(self.out, self.cfg.max_position_embeddings)
            self._write_train_config()
            (self.out / "metrics.jsonl").write_text("")
        except OSError as e:
            raise NanoseekError(f"cannot write the run directory --out {self.out}: {e.strerror or e}") from None

    def _write_train_config(self) -> None:
        # `resume` is how this process started, not a setting of the run: replaying the file must not resume
        settings = dict(self.tc.to_dict(), resume=None)
        atomic_write_text(self.out / "train_config.json", json.dumps(settings, indent=2) + "\n")

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def autocast(self):
        if self.tc.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.plan.device.type, dtype=torch.bfloat16)

    def mtp_weight(self) -> float:
        late = self.tc.mtp_weight_drop_step is not None and self.step >= self.tc.mtp_weight_drop_step
        return self.tc.mtp_weight_late if late else self.tc.mtp_weight

    # --- one optimizer step ----------------------------------------------------------------------------------
    def _micro_batch(
        self, x: torch.Tensor, y: torch.Tensor, lam: float, last: bool = True
    ) -> tuple[torch.Tensor, float, float, float]:
        """Forward + backward of one micro-batch: (total loss, main CE, mean MTP CE, balance loss). Gradients
        are communicated during the `last` micro-batch's backward only."""
        if self.plan.pp > 1:  # the pipeline schedule runs forward and backward over its own micro-batches
            self.model.mtp_weight = lam
            with self.autocast():
                total = self.plan.train_step(self.model, x, y)
            parts = self.model.last_parts
            return total, parts["loss"], parts["mtp_loss"], parts.get("aux_loss", 0.0)
        with self.plan.accumulate(self.train_model, sync=last):
            with self.autocast():
                loss, mtp = self.forward(self.train_model, x, y, self.use_mtp)
                total = loss + lam * torch.stack(mtp).mean() if mtp else loss
                aux = router_losses(self.model, self.seq_alpha, self.batch_alpha)
                if aux is not None:
                    total = total + aux
            # backward even when the loss is NaN: expert-parallel peers wait for this rank in the all-to-alls
            (total / self.tc.grad_accum).backward()
        mtp_mean = torch.stack(mtp).mean().item() if mtp else 0.0
        return total.detach(), loss.item(), mtp_mean, aux.item() if aux is not None else 0.0

    def train_step(self) -> dict:
        tc, plan = self.tc, self.plan
        t0 = time.perf_counter()
        lam = self.mtp_weight()
        sums = {"loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0}
        finite = True
        for i in range(tc.grad_accum):
            # every rank draws the same global batch and keeps its data-parallel slice
            batch = plan.shard_batch(self.stream.next_batch(tc.batch_size * plan.data_world))
            total, *parts = self._micro_batch(batch[:, :-1], batch[:, 1:], lam, last=i == tc.grad_accum - 1)
            finite = finite and bool(torch.isfinite(total))
            for k, v in zip(sums, parts):
                sums[k] += v / tc.grad_accum
        if plan.pp > 1 and tc.grad_accum > 1:  # the pipeline averages within a call, not across calls
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad /= tc.grad_accum
        plan.sync_grads(self.model)
        grad_norm = float(plan.clip_grad_norm_(self.model, tc.grad_clip))
        finite = plan.all_ranks(finite and math.isfinite(grad_norm))  # the same decision on every rank
        if plan.distributed:
            sums = {k: plan.mean_over_data(v) for k, v in sums.items()}
        lr = self.scheduler.get_last_lr()[0]
        if tc.bias_update_schedule == "lr":
            # The router drifts at a speed proportional to the lr, and the bias's dither around balance grows
            # with gamma: scaling gamma like the lr keeps it able to follow the drift at the peak while its
            # noise shrinks as the lr decays (V3 itself ends with gamma = 0). On the `tiny` balance bench it
            # measured no better than a constant gamma (BENCHMARKS.md, balance).
            self.balancer.rate = self.bias_rate * lr / tc.lr
        if finite:
            self.optimizer.step()  # the loss-free balancer runs from this step's post-hook
            self.scheduler.step()
            self.consecutive_nan = 0
        else:
            self.nan_skips += 1
            self.consecutive_nan += 1
            self.balancer.reset()
            if self.consecutive_nan >= tc.max_nan_skips:
                raise NanoseekError(
                    f"the loss or gradient was NaN/inf for {self.consecutive_nan} consecutive steps (last at step "
                    f"{self.step + 1}); lower --lr or check the data. The last checkpoint is intact in {self.out}"
                )
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        ntok = tc.grad_accum * tc.batch_size * plan.data_world * tc.seq_len
        self.tokens_seen += ntok
        dt = time.perf_counter() - t0
        self.elapsed += dt
        vio = self.balancer.maxvio_batch() if finite else []
        rec = {
            "step": self.step,
            **{k: (v if finite else None) for k, v in sums.items()},
            **({} if self.use_mtp else {"mtp_loss": None}),
            "mtp_weight": lam if self.use_mtp else 0.0,
            "lr": lr,
            "grad_norm": grad_norm if finite else None,
            "tokens": self.tokens_seen,
            "tokens_per_s": ntok / dt,
            "maxvio_batch": float(np.mean(vio)) if vio else None,
            "maxvio_batch_layers": vio,
            "expert_load": [c.tolist() for c in self.balancer.last_main] if finite else [],
            "skipped": not finite,
            "nan_skips": self.nan_skips,
        }
        self._log(rec)
        return rec

    # --- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor] | None = None) -> dict:
        """Loss and MaxVio_global over the validation batches (logged), or over `batches` (not logged)."""
        self.model.eval()
        capture_router(self.model, False)
        losses, mtp_losses, n = 0.0, 0.0, 0
        # every rank evaluates the same batches (EP peers must run the same forwards)
        for batch in self.val if batches is None else batches:
            x, y = batch[:, :-1], batch[:, 1:]
            with self.autocast():
                if self.plan.pp > 1:  # the pipeline reports the main and MTP parts of its loss
                    self.plan.eval_step(self.model, x, y)
                    loss, mtp_mean = self.model.last_parts["loss"], self.model.last_parts["mtp_loss"]
                else:
                    loss, mtp = lm_losses(self.model, x, y, self.use_mtp)
                    mtp_mean = torch.stack(mtp).mean().item() if mtp else 0.0
            losses += float(loss) * len(batch)
            mtp_losses += mtp_mean * len(batch)
            n += len(batch)
        # the routed-token counts over the whole validation set give MaxVio_global
        counts = self.balancer.main_counts()
        load = [c.tolist() for c in counts]
        vio = [maxvio(c) for c in counts]
        self.balancer.reset()
        capture_router(self.model, bool(self.seq_alpha or self.batch_alpha))
        self.model.train()
        rec = {
            "step": self.step,
            "val_loss": losses / n,
            "val_mtp_loss": mtp_losses / n if self.use_mtp else None,
            "maxvio_global": float(np.mean(vio)) if vio else None,
            "maxvio_global_layers": vio,
            "val_expert_load": load,
            "val_tokens": n * self.tc.seq_len,
        }
        if batches is None:
            self._log(rec)
            self.last_eval = rec
        return rec

    # --- checkpoints -----------------------------------------------------------------------------------------
    def fit(self) -> dict:
        tc = self.tc
        bar = None
        if tc.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=tc.steps,
                initial=self.step,
                desc=f"train {self.cfg.name}",
                unit="step",
                dynamic_ncols=True,
                mininterval=0.5,
                file=sys.stderr,
            )
        last_saved = self.step if self.resume_from is not None else -1
        self.last_checkpoint = self.resume_from
        try:
            while self.step < tc.steps:
                rec = self.train_step()
                if bar is not None:
                    post = {
                        "loss": f"{rec['loss']:.3f}" if rec["loss"] is not None else "nan",
                        "tok/s": f"{rec['tokens_per_s']:.0f}",
                    }
                    if rec["maxvio_batch"] is not None:
                        post["maxvio"] = f"{rec['maxvio_batch']:.2f}"
                    if self.last_eval:
                        post["val"] = f"{self.last_eval['val_loss']:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if self.step % tc.eval_every == 0 or self.step == tc.steps:
                    self.evaluate()
                if self.step % tc.save_every == 0 or self.step == tc.steps:
                    self.last_checkpoint = self.save()
                    last_saved = self.step
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()  # so that the message starts on its own line
            if self.is_main:
                last, resume = self.last_checkpoint, f"nanoseek train --resume --out {self.out}"
                if self.plan.world > 1:  # a plain `nanoseek train` would be one rank: refused on resume
                    resume = f"torchrun --nproc-per-node {self.plan.world} -m {resume}"
                where = f"the last checkpoint is {last}: continue with `{resume}`" if last else "no checkpoint yet"
                print(f"stopped at step {self.step}; {where}", file=sys.stderr)
            raise
        if bar is not None:
            bar.close()
        if last_saved != self.step:
            self.last_checkpoint = self.save()
        if not self.last_eval or self.last_eval["step"] != self.step:
            self.evaluate()
        summary = {
            "out": str(self.out),
            "steps": self.step,
            "tokens": self.tokens_seen,
            "seconds": round(self.elapsed, 2),
            "tokens_per_s": self.tokens_seen / self.elapsed if self.elapsed else None,
            "val_loss": self.last_eval.get("val_loss"),
            "val_mtp_loss": self.last_eval.get("val_mtp_loss"),
            "maxvio_global": self.last_eval.get("maxvio_global"),
            "nan_skips": self.nan_skips,
            "checkpoint": str(self.last_checkpoint),
        }
        if tc.plot and self.is_main:
            from .plot import plot_run

            plot_run(self.out)
        return summary


def train(tc: TrainConfig) -> dict:
    """Train as configured; returns the run summary (also usable from Python and the benches)."""
    trainer = Trainer(tc)
    summary = trainer.fit()
    summary["is_main"] = trainer.is_main
    return summary


def _cli(args) -> None:
    tc = from_args(args)
    s = train(tc)
    if not s["is_main"]:
        return
    val = f"{s['val_loss']:.4f}" if s["val_loss"] is not None else "n/a"
    vio = f"{s['maxvio_global']:.3f}" if s["maxvio_global"] is not None else "n/a"
    print(
        f"trained {s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.0f}s ({s['tokens_per_s']:.0f} tok/s); "
        f"val loss {val}, MaxVio_global {vio}; checkpoint {s['checkpoint']}"
    )


def add_cli(sub) -> None:
    p = sub.add_parser("train", help="pre-train a model (default: tiny on the Python stdlib, a few minutes on CPU)")
    add_arguments(p)
    p.set_defaults(func=_cli)
