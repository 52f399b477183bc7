"""`nanoseek bench balance`: auxiliary-loss-free load balancing vs an auxiliary balance loss vs nothing.

A 16-expert `tiny` model (1 shared + 16 routed experts, top-2, sigmoid gate, group-limited routing, no MTP)
is trained seven ways on the same data order and seeds (Wang et al. 2408.15664; V3 §2.1.2):
- loss-free: the routing bias moves by ±γ per step towards balance (no balance loss at all, so the arm
  is the pure method of the paper, not V3's loss-free + tiny sequence-wise loss);
- aux α=1e-3 (the paper's baseline) and aux α=1e-2: the classic batch-level balance loss α Σ f_i P_i;
- none: neither;
- loss-free with the paper's proportional rule (b_i += u · relative load error, u = 1e-2; its Table 3);
- loss-free with γ scaled like the learning rate (`--bias-update-schedule lr`: 1e-2 at the peak, 1e-3 at
  the end), so the bias follows the router's fast early drift and dithers less once the lr has decayed.
Measured: MaxVio_batch every step, MaxVio_global over the validation tokens at each evaluation, validation
loss; after training, MaxVio over 1M tokens of shuffled training rows and the floors of both measurements
(`train_sample_maxvio`). MaxVio_batch has a sampling floor even for a perfectly
fair router, ≈ 1.8·√((1−K/N)/(T·K/N)) for T tokens per batch (paper-targets §1), printed beside the curves.

γ: the bias can move at most steps·γ over a run. V3's γ = 1e-3 was set for ~10^5 steps; over the 1000 steps
here it allows a total movement of 1.0 (sigmoid scores lie in (0, 1)), so it can still reach balance; a 10x
larger γ = 1e-2 reacts faster but dithers ±1e-2 every step around the balance point. Both are run and both
are judged against the goals (`GAMMAS`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..balance import maxvio
from .common import (
    ARM_FILE,
    BenchOptions,
    Report,
    base_settings,
    ema,
    goal,
    log,
    mean_std,
    plot_lines,
    smooth_tail,
    train_arm,
)

TITLE = "Load balancing: auxiliary-loss-free bias vs auxiliary loss vs none"
GAMMAS = (1e-3, 1e-2)  # loss-free arms: V3's γ first, then a 10x larger step for this short run
PROPORTIONAL = 1e-2  # and the paper's proportional rule (its best u in Table 3)
SCHEDULED = 1e-2  # and the sign rule with γ scaled like the lr (1e-2 at the peak, 1e-3 at the end)
AUX_ALPHAS = (1e-3, 1e-2)
STEPS, QUICK_STEPS = 1000, 4
SEEDS = 1
VAL_TOKENS = 1 << 20  # more than the stdlib's validation split holds: evaluate on all of it
TRAIN_SAMPLE_TOKENS, QUICK_TRAIN_SAMPLE_TOKENS = 1 << 20, 256  # shuffled training rows for the balance reached


def arms() -> list[dict]:
    out = [dict(label=f"loss-free γ={g:g}", balance="loss-free", gamma=g, alpha=0.0) for g in GAMMAS]
    u = PROPORTIONAL
    prop = dict(label=f"loss-free proportional u={u:g}", balance="loss-free", gamma=u, alpha=0.0, rule="proportional")
    out.append(prop)
    g = SCHEDULED
    out.append(dict(label=f"loss-free γ={g:g}·lr/peak", balance="loss-free", gamma=g, alpha=0.0, schedule="lr"))
    out += [dict(label=f"aux α={a:g}", balance="aux", gamma=0.0, alpha=a) for a in AUX_ALPHAS]
    out.append(dict(label="none", balance="none", gamma=0.0, alpha=0.0))
    return out


def _share(loads: list[int]) -> torch.Tensor:
    c = torch.tensor(loads, dtype=torch.float64)
    return c / c.sum()


def _ratio_maxvio(num: list[list[int]], den: list[list[int]]) -> float:
    """Layer mean of MaxVio(num's load share / den's): the imbalance `num` would show under a router that is
    exactly balanced on `den` (to first order)."""
    return statistics.fmean(maxvio(_share(a) / _share(b).clamp_min(1e-12)) for a, b in zip(num, den))


def train_sample_maxvio(trainer, seed: int, last_eval: dict, tokens: int) -> dict:
    """Balance of the trained router on shuffled *training* rows, and the floors of both measurements.

    The validation split is whole files (73 of them, ~330k tokens, for the stdlib corpus): its expert loads
    carry those files' content, so even a router balanced on the corpus shows an imbalance there (`val_split_floor`: the
    validation MaxVio of a router exactly balanced on the training rows). `tokens` of rows drawn from the
    whole training split (another seed than the run's data order) measure the balance the bias reached on the
    distribution it was trained on (`maxvio_global_train`); that sample has a sampling floor of its own, since
    routing is correlated within a row: half the MaxVio between its two halves' load shares
    (`train_sample_floor`; the share ratio of two independent halves has twice the relative spread of the whole).
    """
    from ..data import TokenStream

    tc = trainer.tc
    rows = max(2, tokens // tc.seq_len)
    stream = TokenStream(trainer.corpus, trainer.tok, tc.seq_len, seed=10_000 + seed, shuffle_rows=tc.window_rows())
    batches = [stream.next_batch(min(tc.batch_size, rows - i)) for i in range(0, rows, tc.batch_size)]
    halves = [trainer.evaluate(batches[: len(batches) // 2]), trainer.evaluate(batches[len(batches) // 2 :])]
    a, b = (h["val_expert_load"] for h in halves)
    total = [[x + y for x, y in zip(la, lb)] for la, lb in zip(a, b)]
    return {
        "maxvio_global_train": statistics.fmean(maxvio(torch.tensor(t)) for t in total),
        "train_sample_floor": _ratio_maxvio(a, b) / 2,
        "val_split_floor": _ratio_maxvio(last_eval["val_expert_load"], total),
        "train_sample_tokens": sum(x.numel() - len(x) for x in batches),
    }


def sampling_floor(tokens: int, n: int, k: int) -> float:
    return 1.8 * math.sqrt((1 - k / n) / (tokens * k / n))


def mean_curve(runs: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Average several (step, value) curves on their common steps."""
    common = sorted(set.intersection(*(set(s for s, _ in r) for r in runs))) if runs else []
    maps = [dict(r) for r in runs]
    return common, [statistics.fmean(m[s] for m in maps) for s in common]


def arm_settings(opts: BenchOptions) -> dict:
    """The training settings every arm shares (the arms add their balance options)."""
    steps = opts.n_steps(STEPS, QUICK_STEPS)
    settings = base_settings(opts, dict(n_routed_experts=16, num_experts_per_tok=2), mtp_depth=0, steps=steps)
    settings["eval_every"] = opts.eval_every(steps, 5)
    if not opts.quick:  # MaxVio_global over the whole validation split (~300k tokens), not a few files of it
        settings["eval_tokens"] = VAL_TOKENS
    return settings


def train_one(opts: BenchOptions, arm: dict, seed: int, settings: dict):
    """Train (or, with --reuse, reload) one arm for one seed and measure its balance on training rows.

    Separate from `run` so that several processes can share the (arm, seed) pairs of a long run (each calls
    this with the same options, then `--reuse` assembles the report)."""
    kw = dict(settings, balance=arm["balance"], seq_aux_alpha=0.0)
    if arm["balance"] == "loss-free":
        kw["bias_update_rate"] = arm["gamma"]
        kw["bias_update"] = arm.get("rule", "sign")
        kw["bias_update_schedule"] = arm.get("schedule", "constant")
    if arm["balance"] == "aux":
        kw["aux_alpha"] = arm["alpha"]
    name = arm["label"].replace("γ", "g").replace("α", "a").replace("·lr/peak", "_lr-scheduled")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("=", ""))
    out = train_arm(opts, slug, seed, keep=True, **kw)
    tokens = QUICK_TRAIN_SAMPLE_TOKENS if opts.quick else TRAIN_SAMPLE_TOKENS
    run_dir = Path(opts.out) / "runs" / f"{slug}-s{seed}"
    # measured once per finished arm: --reuse keeps it while the arm's record (and so its weights) is unchanged
    key = {"arm": hashlib.sha256((run_dir / ARM_FILE).read_bytes()).hexdigest(), "tokens": tokens}
    cache = run_dir / "train_sample.json"
    saved = json.loads(cache.read_text()) if opts.reuse and cache.exists() else {}
    if saved.get("key") != key:
        saved = {"key": key, "measured": train_sample_maxvio(out.trainer, seed, out.evals[-1], tokens)}
        atomic_write_text(cache, json.dumps(saved, indent=1) + "\n")
    out.summary.update(saved["measured"])
    out.trainer = None  # one live model at a time
    return out


def run(opts: BenchOptions, report: Report) -> dict:
    n_seeds = opts.n_seeds(SEEDS)
    settings = arm_settings(opts)
    steps, B, T = settings["steps"], settings["batch_size"], settings["seq_len"]
    floor = sampling_floor(B * T, 16, 2)
    log(f"balance: {len(arms())} arms x {n_seeds} seeds x {steps} steps of {B}x{T} tokens")

    results, curves = [], {}
    for arm in arms():
        runs = [train_one(opts, arm, seed, settings) for seed in range(n_seeds)]
        vl, vl_sd = mean_std([r.summary["val_loss"] for r in runs])
        vg, vg_sd = mean_std([r.summary["maxvio_global"] for r in runs])
        vt, vt_sd = mean_std([r.summary["maxvio_global_train"] for r in runs])
        floors = {k: statistics.fmean(r.summary[k] for r in runs) for k in ("val_split_floor", "train_sample_floor")}
        vb = statistics.fmean(smooth_tail([s["maxvio_batch"] for s in r.steps]) for r in runs)
        results.append(
            {
                "label": arm["label"],
                "balance": arm["balance"],
                "alpha": arm["alpha"],
                "gamma": arm["gamma"],
                "bias_update": arm.get("rule", "sign") if arm["balance"] == "loss-free" else None,
                "bias_update_schedule": arm.get("schedule", "constant") if arm["balance"] == "loss-free" else None,
                "val_loss": vl,
                "val_loss_std": vl_sd,
                "maxvio_global": vg,
                "maxvio_global_std": vg_sd,
                "maxvio_global_train": vt,
                "maxvio_global_train_std": vt_sd,
                **floors,
                "train_sample_tokens": runs[0].summary["train_sample_tokens"],
                "maxvio_batch_final": vb,
                "seeds": n_seeds,
                "steps": steps,
                "tokens": runs[0].summary["tokens"],
                "val_tokens": runs[0].evals[-1]["val_tokens"],
                "tokens_per_s": statistics.fmean(r.summary["tokens_per_s"] for r in runs),
                "per_seed": [
                    {
                        k: r.summary[k]
                        for k in (
                            "val_loss",
                            "maxvio_global",
                            "maxvio_global_train",
                            "val_split_floor",
                            "train_sample_floor",
                        )
                    }
                    | {"seed": r.seed}
                    for r in runs
                ],
            }
        )
        curves[arm["label"]] = {
            "batch": mean_curve(
                [[(s["step"], s["maxvio_batch"]) for s in r.steps if s["maxvio_batch"] is not None] for r in runs]
            ),
            "global": mean_curve([[(e["step"], e["maxvio_global"]) for e in r.evals] for r in runs]),
            "val": mean_curve([[(e["step"], e["val_loss"]) for e in r.evals] for r in runs]),
        }

    # --- report ---
    report.text(
        f"Model: `tiny` (d=256, 4 layers, first dense, 1 shared + 16 routed experts, top-2 of 4 groups keep 2, "
        f"sigmoid gate), no MTP, bf16. {steps} steps x {B}x{T} tokens ({results[0]['tokens']:,} tokens) per arm, "
        f"{n_seeds} seed(s), same data order per seed. MaxVio_global over {results[0]['val_tokens']:,} "
        f"validation tokens, averaged over the MoE layers. The loss-free arms use no balance loss at all. "
        f"MaxVio_batch sampling floor at {B * T} tokens/batch: {floor:.3f}. Batches are drawn from shuffled windows "
        "of ~8M tokens (the trainer's default `--shuffle-rows`, about the whole corpus): the packer serves text "
        "contiguously, and the routing bias tracks whatever content recent batches carry (the papers' batches "
        "are i.i.d. sequences)."
    )
    report.table(
        [
            "arm",
            "val loss",
            "± sd",
            "MaxVio_global",
            "± sd",
            "MaxVio, training rows",
            "its floor",
            "validation-split floor",
            "MaxVio_batch (last 10%)",
            "tok/s",
        ],
        [
            [
                r["label"],
                r["val_loss"],
                r["val_loss_std"],
                r["maxvio_global"],
                r["maxvio_global_std"],
                r["maxvio_global_train"],
                r["train_sample_floor"],
                r["val_split_floor"],
                r["maxvio_batch_final"],
                r["tokens_per_s"],
            ]
            for r in results
        ],
        title="Results (mean over seeds)",
    )
    report.text(
        'MaxVio_global is measured on the validation split (whole files). "MaxVio, training rows": the same '
        f"measure over {results[0]['train_sample_tokens']:,} tokens of shuffled training rows (the distribution the "
        'bias balances); "its floor": what that sample\'s own size leaves even for a perfectly balanced router '
        '(half the MaxVio between its halves); "validation-split floor": the validation MaxVio of a router '
        "exactly balanced on the training rows (the split's content shift): a router balanced on the training "
        "distribution shows about that much imbalance on this split."
    )
    report.table(
        ["paper (Wang et al. 1B, Table 2; V3 Table 5)", "aux-loss", "loss-free"],
        [
            ["MaxVio_global (1B)", 0.72, 0.04],
            ["PPL (1B)", 9.56, 9.50],
            ["MaxVio_global (3B)", 0.52, 0.04],
            ["val loss, seq-aux vs loss-free (V3 1B)", 2.258, 2.253],
        ],
        title="Paper figures",
    )
    aux = [r for r in results if r["balance"] == "aux"]
    goals = []
    for lf in (r for r in results if r["balance"] == "loss-free"):  # every γ is judged, none picked afterwards
        goals.append(
            goal(f"{lf['label']}: MaxVio_global ≤ 0.05", lf["maxvio_global"], "≤ 0.05", lf["maxvio_global"] <= 0.05)
        )
        # supplementary, not the goal: the same bound on the training distribution (both floors beside it)
        goals.append(
            goal(
                f"{lf['label']}: MaxVio on {lf['train_sample_tokens']:,} training-row tokens ≤ 0.05 (sample floor "
                f"{lf['train_sample_floor']:.3f}; validation-split floor {lf['val_split_floor']:.3f})",
                lf["maxvio_global_train"],
                "≤ 0.05",
                lf["maxvio_global_train"] <= 0.05,
            )
        )
        for a in aux:
            ratio = a["maxvio_global"] / lf["maxvio_global"] if lf["maxvio_global"] else float("inf")
            goals.append(goal(f"{a['label']} MaxVio_global / {lf['label']}'s", ratio, "≥ 4", ratio >= 4))
        goals += [
            goal(
                f"{lf['label']}: val loss ≤ every aux arm's (Δ to the best aux arm)",
                lf["val_loss"] - min(r["val_loss"] for r in aux),
                "≤ 0",
                all(lf["val_loss"] <= r["val_loss"] for r in aux),
            ),
        ]
    report.goals(goals)
    report.plot(
        plot_lines(
            opts.out / "maxvio_batch.png",
            [(lab, c["batch"][0], ema(c["batch"][1], 0.9)) for lab, c in curves.items()],
            "step",
            "MaxVio_batch (EMA 0.9, layer mean)",
            "Per-batch load imbalance",
            logy=True,
            hlines=[(floor, f"sampling floor {floor:.3f}")],
        ),
        "MaxVio_batch",
    )
    report.plot(
        plot_lines(
            opts.out / "maxvio_global.png",
            [(lab, *c["global"]) for lab, c in curves.items()],
            "step",
            "MaxVio_global (validation)",
            "Global load imbalance",
            logy=True,
            markers=True,
            hlines=[(0.05, "goal 0.05")],
        ),
        "MaxVio_global",
    )
    report.plot(
        plot_lines(
            opts.out / "val_loss.png",
            [(lab, *c["val"]) for lab, c in curves.items()],
            "step",
            "validation loss (nats)",
            "Validation loss",
            markers=True,
        ),
        "validation loss",
    )
    return {
        "arms": results,
        "goals": goals,
        "settings": {"steps": steps, "batch_size": B, "seq_len": T, "gammas": list(GAMMAS), "sampling_floor": floor},
    }
