"""The checkpoint half of `nanoseek.train.Trainer`: writing a checkpoint and resuming from one.

Writing: the weights are gathered to the single-process layout (a collective under torchrun), each rank's
optimizer state (its expert shards, stage or FSDP2 moment shards) is collected to rank 0, and rank 0 writes
model, tokenizer and trainer state into one directory atomically; every rank then learns whether it worked.
Resuming: the checkpoint's model config, world size and parallel layout must match, the optimizer, scheduler,
data stream and RNG states are restored, settings the user changed (lr, weight decay, betas) take effect, and
metrics logged after the checkpoint are set aside. Kept apart from the training loop, which it only serves.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from . import checkpoint as ckpt
from .atomic import atomic_dir, atomic_write_text, free_space_note
from .errors import NanoseekError


class CheckpointMixin:
    """Methods of `Trainer` (they use its model, plan, optimizer, scheduler, stream, tokenizer and out)."""

    def save(self) -> Path:
        """Write a checkpoint atomically. Under torchrun the model is gathered to the single-process layout
        and each rank's optimizer state (its expert shards / stage) is collected; rank 0 writes."""
        target = self.out / "checkpoints" / f"step_{self.step:07d}"
        weights = self.plan.full_state_dict(self.model)  # collective under torchrun
        optim = self._gather_objects(self.plan.optimizer_state(self.optimizer))
        failed = None
        if self.is_main:
            try:
                self._write_checkpoint(target, weights, optim)
            except NanoseekError as e:
                failed = e
        # every rank learns whether rank 0 wrote it: the others would run on into the next collective and die
        # there with a transport traceback once rank 0 exits
        if not self.plan.all_ranks(failed is None):
            raise failed or NanoseekError(f"rank 0 could not write the checkpoint {target}", echo=True)
        return target

    def _write_checkpoint(self, target: Path, weights: dict, optim: list) -> None:
        state = {
            "step": self.step,
            "world": self.plan.world,
            "layout": self.plan.layout(),  # resuming needs the same one (optimizer-state layout, numerics)
            "optimizer": optim,  # one entry per rank
            "scheduler": self.scheduler.state_dict(),
            "data": self.stream.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "tokens_seen": self.tokens_seen,
            "nan_skips": self.nan_skips,
            "consecutive_nan": self.consecutive_nan,
            "elapsed": self.elapsed,
            "val_id": self._val_id,
        }
        try:
            with atomic_dir(target) as tmp:
                ckpt.save_model(self.core, tmp, state_dict=weights)
                self.tok.save_to_dir(tmp, self.cfg.max_position_embeddings)
                torch.save(state, tmp / "trainer_state.pt")
        except (OSError, RuntimeError, SafetensorError) as e:  # disk full, read-only, removed directory
            last = ckpt.list_checkpoints(self.out)
            intact = f"; the last complete checkpoint is {last[-1]}" if last else ""
            raise NanoseekError(f"cannot write the checkpoint {target}: {e}{free_space_note(target)}{intact}") from None
        for old in ckpt.list_checkpoints(self.out)[: -self.tc.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @functools.cached_property
    def _val_id(self) -> str:
        """A hash of the validation tokens: a resume whose data or --eval-tokens changed them is noted, since
        its val_loss no longer continues the curve (the train split's position is checked by the stream)."""
        return hashlib.sha256(b"".join(b.numpy().tobytes() for b in self.val)).hexdigest()[:16]

    def _gather_objects(self, obj) -> list:
        if not self.plan.distributed:
            return [obj]
        out = [None] * self.plan.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def _check_config(self, directory: Path) -> None:
        saved, now = ckpt.read_config(directory).to_dict(), self.cfg.to_dict()
        diff = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in saved if k != "name" and saved[k] != now.get(k)]
        if diff:
            # e.g. an --override or --mtp-depth not given again, or a run without its train_config.json (the
            # flags it was started with are then not replayed)
            raise NanoseekError(
                f"--resume: the model settings differ from the checkpoint {directory}: {', '.join(diff)} "
                "(give the run's --preset/--override/--mtp-depth again)"
            )

    def _load_state(self, directory: Path) -> None:
        try:
            state = torch.load(directory / "trainer_state.pt", weights_only=False)
        except Exception as e:  # missing, empty, truncated or not a torch file: whatever torch.load raises
            raise NanoseekError(f"--resume: cannot read {directory / 'trainer_state.pt'}: {e}") from None
        if state["step"] > self.tc.steps:
            raise NanoseekError(
                f"--resume: {directory} is at step {state['step']}, past --steps {self.tc.steps}; give a larger --steps"
            )
        if state["world"] != self.plan.world:
            raise NanoseekError(
                f"--resume: {directory} was written by {state['world']} ranks, this run has {self.plan.world}"
            )
        layout = self.plan.layout()
        if state.get("layout", layout) != layout:  # checkpoints from before the field: the world check only
            show = lambda d: " ".join(f"{k}={v}" for k, v in d.items())
            raise NanoseekError(
                f"--resume: {directory} was written with {show(state['layout'])}, this run has {show(layout)}; "
                "resume with the same --pp/--ep/--dp-shard/--pp-schedule/--pp-microbatches settings"
            )
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.plan.load_optimizer_state(self.optimizer, state["optimizer"][self.plan.rank])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        self.step = state["step"]
        if state.get("val_id", self._val_id) != self._val_id and self.is_main:  # (checkpoints before 30 Nov: none)
            print(
                f"note: the validation batches differ from those of {directory} (the data or --eval-tokens changed): "
                f"val_loss before and after step {self.step} are not comparable",
                file=sys.stderr,
            )
        self._keep_new_hyperparameters(fresh)
        self.tokens_seen, self.nan_skips = state["tokens_seen"], state["nan_skips"]
        self.consecutive_nan, self.elapsed = state["consecutive_nan"], state["elapsed"]
        # drop metrics logged after this checkpoint (by a run that died before its next save, or by the run a
        # rewind abandons) and a line cut short by a crash; the last evaluation is this run's again
        mfile = self.out / "metrics.jsonl"
        keep, dropped = [], []
        for ln in mfile.read_text().splitlines() if mfile.exists() else []:
            try:
                rec = json.loads(ln)
            except ValueError:
                continue  # a partial line from a process killed mid-write
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                continue  # not a record of ours
            if rec["step"] > self.step:
                dropped.append(ln)
                continue
            keep.append(ln)
            if "val_loss" in rec:
                self.last_eval = rec
        if self.is_main:
            try:
                if self.newer_checkpoints:
                    self._set_aside(dropped)
                atomic_write_text(mfile, "".join(ln + "\n" for ln in keep))
                self._write_train_config()
            except OSError as e:  # a read-only or full disk: the run could not log or checkpoint either
                raise NanoseekError(f"--resume: cannot write the run directory {self.out}: {e.strerror or e}") from None

    def _keep_new_hyperparameters(self, fresh: list[dict]) -> None:
        """Loading the optimizer and scheduler states restores the *checkpoint's* lr, weight decay and betas
        (they live in the param groups and in the scheduler's base_lrs): put back this run's settings, so that
        a rewind with a lower --lr trains with it, and recompute the current lr from the schedule."""
        changed = {}
        for group, new in zip(self.optimizer.param_groups, fresh):
            for key in ("initial_lr", "weight_decay", "betas", "eps"):
                old = group.get(key)
                if isinstance(old, (list, tuple)):
                    old = tuple(old)
                if key in new and old != new[key]:
                    changed.setdefault("lr" if key == "initial_lr" else key, (old, new[key]))
                    group[key] = new[key]
        sched = self.scheduler
        sched.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        for group, base, f in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * f(sched.last_epoch)  # what LambdaLR computes at this step
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if changed and self.is_main:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            print(f"--resume: {what} from step {self.step + 1} on (the checkpoint had the former)", file=sys.stderr)

    def _set_aside(self, metrics: list[str]) -> None:
        """Resuming from an earlier checkpoint (a rewind) abandons the newer ones: move them and their metrics
        to DIR/abandoned/ (not deleted; no longer picked by `--resume` or `nanoseek generate`)."""
        dest = self.out / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.newer_checkpoints:
            os.replace(p, dest / p.name)
        (dest / "metrics.jsonl").write_text("".join(ln + "\n" for ln in metrics))
        names = ", ".join(p.name for p in self.newer_checkpoints)
        print(f"rewinding to {self.resume_from.name}: moved the newer {names} to {dest}", file=sys.stderr)

    # --- the loop --------------------------------------------------------------------------------------------
