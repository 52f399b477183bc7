"""`nanoseek bench moe`: DeepSeekMoE vs dense models ("less is more", DeepSeekMoE 2401.06066).

Three `tiny`-sized arms trained on the same data order, seeds and token budget (no MTP):
- DeepSeekMoE: the preset (first layer dense, then 1 shared + 16 fine-grained routed experts, top-2,
  loss-free balancing);
- dense, same *activated* parameters: every layer a SwiGLU whose width makes params_active match;
- dense, same *total* parameters: the width that makes params_total match (≈2.5x the FLOPs per token).
Validation loss is plotted against training FLOPs (tokens x `cost_report(...)["train_flops_per_token"]`)
and against training wall time (evaluation excluded); the iso-FLOP and iso-time comparisons interpolate
the dense curves at the MoE arm's final FLOPs / seconds.
"""

from __future__ import annotations

import itertools
import statistics

from ..config import get_preset
from ..costs import cost_report, param_counts
from .common import (
    MICRO,
    BenchOptions,
    Report,
    base_settings,
    fmt,
    goal,
    log,
    mean_std,
    plot_lines,
    train_arm,
)

TITLE = "DeepSeekMoE vs dense: loss against FLOPs and wall time"
STEPS, QUICK_STEPS = 300, 4
SEEDS = 1


def match_width(base: dict, key: str, target: int) -> tuple[int, int]:
    """The dense SwiGLU width (multiple of 16) whose `key` parameter count is closest to `target`."""
    lo, hi = 16, 16 * 1024
    while hi - lo > 16:  # params grow monotonically with the width
        mid = (lo + hi) // 32 * 16
        n = param_counts(
            get_preset("tiny", **{**base, "n_routed_experts": 0, "intermediate_size": mid}, num_nextn_predict_layers=0)
        )[key]
        lo, hi = (mid, hi) if n < target else (lo, mid)
    cands = [
        (
            w,
            param_counts(
                get_preset(
                    "tiny", **{**base, "n_routed_experts": 0, "intermediate_size": w}, num_nextn_predict_layers=0
                )
            )[key],
        )
        for w in (lo, hi)
    ]
    return min(cands, key=lambda c: abs(c[1] - target))


def arm_configs(quick: bool) -> list[dict]:
    base = dict(MICRO) if quick else {}
    moe = get_preset("tiny", **base, num_nextn_predict_layers=0)
    pc = param_counts(moe)
    w_act, _ = match_width(base, "params_active", pc["params_active"])
    w_tot, _ = match_width(base, "params_total", pc["params_total"])
    arms = [
        {
            "label": "DeepSeekMoE",
            "fields": base,
            "desc": f"1 shared + {moe.n_routed_experts} routed (top-"
            f"{moe.num_experts_per_tok}) x {moe.moe_intermediate_size}, first layer dense {moe.intermediate_size}",
        },
        {
            "label": "dense, same active",
            "fields": {**base, "n_routed_experts": 0, "intermediate_size": w_act},
            "desc": f"SwiGLU {w_act} in every layer",
        },
        {
            "label": "dense, same total",
            "fields": {**base, "n_routed_experts": 0, "intermediate_size": w_tot},
            "desc": f"SwiGLU {w_tot} in every layer",
        },
        {  # the compute-matched baseline: fewer steps, with its own complete LR schedule
            "label": "dense, same total, same FLOPs",
            "fields": {**base, "n_routed_experts": 0, "intermediate_size": w_tot},
            "desc": f"SwiGLU {w_tot} in every layer, trained for DeepSeekMoE's FLOPs",
            "match_flops": True,
        },
    ]
    for a in arms:
        a["cfg"] = get_preset("tiny", **a["fields"], num_nextn_predict_layers=0)
        p = param_counts(a["cfg"])
        a["params_total"], a["params_active"] = p["params_total"], p["params_active"]
    return arms


def interp(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of a curve at x (None outside its range)."""
    pts = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
    return None


def curves_of(arm, flops_tok: float) -> tuple[list[float], list[float], list[float]]:
    """(FLOPs, seconds, val loss) at each evaluation; seconds = cumulative training-step time."""
    total, prev, by_step = 0.0, 0, {}
    for s in arm.steps:
        total += (s["tokens"] - prev) / s["tokens_per_s"]
        prev = s["tokens"]
        by_step[s["step"]] = (s["tokens"], total)
    fl, sec, loss = [], [], []
    for e in arm.evals:
        tok, t = by_step.get(e["step"], (0, 0.0))
        fl.append(tok * flops_tok)
        sec.append(t)
        loss.append(e["val_loss"])
    return fl, sec, loss


def run(opts: BenchOptions, report: Report) -> dict:
    steps = opts.n_steps(STEPS, QUICK_STEPS)
    n_seeds = opts.n_seeds(SEEDS)
    arms = arm_configs(opts.quick)
    results, curves = [], {}
    for a in arms:
        a["flops_tok"] = cost_report(a["cfg"], base_settings(opts)["seq_len"])["train_flops_per_token"]
        n = max(1, round(steps * arms[0]["flops_tok"] / a["flops_tok"])) if a.get("match_flops") else steps
        s = base_settings(opts, a["fields"], mtp_depth=0, steps=n)
        s["eval_every"] = opts.eval_every(n, 6)
        log(
            f"moe arm {a['label']}: {a['desc']}; {a['params_total']:,} total / {a['params_active']:,} active params, "
            f"{a['flops_tok'] / 1e6:.1f} MFLOP/token"
        )
        slug = a["label"].replace(", ", "_").replace(" ", "_")
        runs = [train_arm(opts, slug, seed, **s) for seed in range(n_seeds)]
        vl, sd = mean_std([r.summary["val_loss"] for r in runs])
        curves[a["label"]] = curves_of(runs[0], a["flops_tok"])
        fl, sec, _ = curves[a["label"]]
        results.append(
            {
                "label": a["label"],
                "config": a["desc"],
                "params_total": a["params_total"],
                "params_active": a["params_active"],
                "train_flops_per_token": a["flops_tok"],
                "val_loss": vl,
                "val_loss_std": sd,
                "train_flops": fl[-1],
                "train_seconds": sec[-1],
                "tokens_per_s": statistics.fmean(r.summary["tokens_per_s"] for r in runs),
                "tokens": runs[0].summary["tokens"],
                "steps": n,
                "seeds": n_seeds,
            }
        )
    moe = results[0]
    _, m_sec, m_loss = curves[moe["label"]]
    for r in results[1:3]:
        fl, sec, loss = curves[r["label"]]
        r["val_loss_at_moe_flops"] = interp(fl, loss, moe["train_flops"])
        r["val_loss_at_moe_seconds"] = interp(sec, loss, moe["train_seconds"])
        # equal wall time: whichever arm finished first, against the other one's curve at that time
        t = min(r["train_seconds"], moe["train_seconds"])
        r["iso_time_seconds"] = t
        r["iso_time_dense_loss"] = interp(sec, loss, t)
        r["iso_time_moe_loss"] = interp(m_sec, m_loss, t)

    s = base_settings(opts, {}, steps=steps)
    report.text(
        f"`tiny` dims (d=256, 4 layers), bf16, no MTP; {steps} steps x {s['batch_size']}x{s['seq_len']} tokens per "
        f"arm, {n_seeds} seed(s), same data order. FLOPs per token from `cost_report` (matmuls x 6 + attention). "
        f"The last arm is the compute-matched baseline: the same-total dense model trained for {results[3]['steps']} "
        "steps, i.e. DeepSeekMoE's training FLOPs, with its own complete LR schedule (a point read off the longer "
        "run's curve would sit mid-schedule, at a high learning rate). Wall time = the sum of training-step "
        "times (evaluations excluded); the arms ran one after another, so wall-time comparisons carry the "
        "machine's load drift (FLOPs comparisons do not). Equal-time losses interpolate the validation curves "
        "(evaluated every 1/6 of a run); '–' where a curve does not reach that point."
    )
    report.table(
        [
            "arm",
            "config",
            "params total",
            "params active",
            "MFLOP/token",
            "val loss",
            "± sd",
            "train tok/s",
            "steps",
            "dense loss at MoE's FLOPs (mid-run)",
            "equal wall time (s)",
            "loss at it: this arm / MoE",
        ],
        [
            [
                r["label"],
                r["config"],
                r["params_total"],
                r["params_active"],
                r["train_flops_per_token"] / 1e6,
                r["val_loss"],
                r["val_loss_std"],
                r["tokens_per_s"],
                r["steps"],
                r.get("val_loss_at_moe_flops"),
                r.get("iso_time_seconds"),
                "–"
                if "iso_time_seconds" not in r
                else f"{fmt(r['iso_time_dense_loss'])} / {fmt(r['iso_time_moe_loss'])}",
            ]
            for r in results
        ],
        title="Results",
    )
    report.table(
        ["paper (DeepSeekMoE Table 1, 2B total, 100B tokens)", "Pile loss"],
        [
            ["Dense 0.2B (same active)", 2.060],
            ["GShard (top-2 of 16)", 1.867],
            ["DeepSeekMoE (1 shared + 63 routed, 7 active)", 1.808],
            ["Dense x16 (same total)", 1.806],
        ],
        title="Paper figures",
    )
    act, tot, iso_arm = results[1], results[2], results[3]
    iso = iso_arm["val_loss"]
    goals = [
        goal(
            "DeepSeekMoE beats dense with the same activated params (Δ val loss)",
            moe["val_loss"] - act["val_loss"],
            "< 0",
            moe["val_loss"] < act["val_loss"],
        ),
        goal(
            "DeepSeekMoE ≤ dense-same-total trained for the same FLOPs (Δ)",
            None if iso is None else moe["val_loss"] - iso,
            "≤ 0",
            None if iso is None else moe["val_loss"] <= iso,
        ),
        goal(
            "dense-same-total FLOPs per token / DeepSeekMoE's",
            tot["train_flops_per_token"] / moe["train_flops_per_token"],
            "> 1 (MoE is cheaper)",
            tot["train_flops_per_token"] > moe["train_flops_per_token"],
        ),
    ]
    for r in (act, tot):
        d, m = r.get("iso_time_dense_loss"), r.get("iso_time_moe_loss")
        goals.append(
            goal(
                f"DeepSeekMoE ≤ {r['label']} at equal wall time on this CPU (Δ)",
                None if d is None or m is None else m - d,
                "≤ 0",
                None if d is None or m is None else m <= d,
            )
        )
    report.goals(goals)
    report.plot(
        plot_lines(
            opts.out / "moe_loss_vs_flops.png",
            [(k, c[0], c[2]) for k, c in curves.items()],
            "training FLOPs",
            "validation loss (nats)",
            "Validation loss vs training FLOPs (seed 0)",
            markers=True,
            logx=True,
        ),
        "loss vs FLOPs",
    )
    report.plot(
        plot_lines(
            opts.out / "moe_loss_vs_seconds.png",
            [(k, c[1], c[2]) for k, c in curves.items()],
            "training seconds",
            "validation loss (nats)",
            "Validation loss vs wall time (seed 0)",
            markers=True,
            logx=True,
        ),
        "loss vs seconds",
    )
    return {"arms": results, "goals": goals, "settings": {"steps": steps, "seeds": n_seeds}}
