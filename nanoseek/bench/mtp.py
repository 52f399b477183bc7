"""`nanoseek bench mtp`: training with vs without multi-token prediction (V3 §2.2, depth D = 1, λ = 0.3).

Both arms train the same `tiny` model on the same data order and seeds; the MTP arm adds the depth-1 module
and its weighted loss. Measured:
- next-token validation loss of the main model (the MTP module is not used for it);
- acceptance rate of the MTP head as a draft model, two ways: teacher-forced on validation text (fraction of
  positions where the MTP head's argmax equals the main model's greedy next token one position later), and
  in real greedy self-speculative decoding through the serving engine (`Engine.generate(speculative=1)`:
  draft one token with the MTP head, verify it with one main forward over two tokens);
- the speculative speed-up in wall time (prefill included) against the engine's plain greedy decoding of the
  same model, prompts and lengths, interleaved prompt by prompt, and whether both produce the same tokens.
Acceptance is pooled over all drafts of all prompts, tokens/s over the whole generation: as `bench decode`.
"""

from __future__ import annotations

import copy
import statistics

import torch

from ..balance import capture_router
from ..engine import Engine
from ..model import Transformer
from .common import BenchOptions, Report, base_settings, goal, log, mean_std, plot_lines, train_arm

TITLE = "Multi-token prediction: quality, acceptance rate and speculative decoding"
STEPS, QUICK_STEPS = 300, 4
SEEDS = 1
MTP_WEIGHT = 0.3


# --- decoding ------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_forced_acceptance(model: Transformer, batches: list[torch.Tensor]) -> float:
    """Fraction of positions i where argmax MTP(h_i, t_{i+1}) == argmax main(t_{<=i+1}) (the main model's
    greedy guess for t_{i+2}), on validation text."""
    hits = total = 0
    for b in batches:
        x = b[:, :-1]
        main, mtps = model.forward_mtp(x)
        g = main.argmax(-1)[:, 1:]  # main's prediction for t_{i+2}, at positions 0..T-2
        d = mtps[0].argmax(-1)  # MTP at position i predicts t_{i+2}
        hits += int((g == d).sum())
        total += g.numel()
    return hits / max(total, 1)


def engine_decode_bench(model: Transformer, prompts: list[torch.Tensor], n_new: int) -> dict:
    """Plain greedy vs MTP speculative greedy (k = 1) through the serving engine (`Engine.generate`, bf16,
    latent cache, batch 1), interleaved prompt by prompt; returns acceptance, tokens per forward, speeds.

    Measured as `nanoseek bench decode` does (`Pooled`): acceptance over all drafts of all prompts (a mean of
    per-prompt rates would weigh the few steps of a well-drafted prompt like the many of a badly drafted one),
    tokens/s and the speed-up over the whole generation, prefill included (the speculative prefill also runs
    the MTP module over the prompt); the decode-only speed-up is kept beside it."""
    from ..bench_decode import Pooled

    eng = Engine(copy.deepcopy(model), dtype=torch.bfloat16)
    ids = [p[0].tolist() for p in prompts]
    eng.generate(ids[0], min(8, n_new), ignore_eos=True)  # warm-up
    eng.generate(ids[0], min(8, n_new), speculative=1, ignore_eos=True)
    plain, spec = [], []
    for p in ids:
        plain.append(eng.generate(p, n_new, ignore_eos=True))
        spec.append(eng.generate(p, n_new, speculative=1, ignore_eos=True))
    same = sum(int(x == y) for g, s in zip(plain, spec) for x, y in zip(g.tokens[0], s.tokens[0]))
    total = n_new * len(ids)
    g, s = Pooled(plain), Pooled(spec)
    return {
        "acceptance_rate": s.acceptance_rate,
        "tokens_per_forward": s.tokens_per_forward,
        "greedy_tok_s": g.tokens_per_s,
        "speculative_tok_s": s.tokens_per_s,
        "speedup": s.tokens_per_s / g.tokens_per_s,
        "decode_only_speedup": s.decode_tokens_per_s / g.decode_tokens_per_s,
        "same_tokens_fraction": same / total,
        "prompts": len(ids),
        "new_tokens": n_new,
        "dtype": "bf16",
    }


# --- the bench -----------------------------------------------------------------------------------------------
def run(opts: BenchOptions, report: Report) -> dict:
    steps = opts.n_steps(STEPS, QUICK_STEPS)
    n_seeds = opts.n_seeds(SEEDS)
    settings = base_settings(opts, steps=steps, mtp_weight=MTP_WEIGHT)
    settings["eval_every"] = opts.eval_every(steps, 5)
    n_prompts, prompt_len, n_new = (2, 8, 8) if opts.quick else (8, 64, 96)
    log(f"mtp: 2 arms x {n_seeds} seeds x {steps} steps")

    arms = {"no MTP": [], "MTP (D=1, λ=0.3)": []}
    eng, tf_acc = [], []
    for seed in range(n_seeds):
        arms["no MTP"].append(train_arm(opts, "no_mtp", seed, mtp_depth=0, **settings))
        a = train_arm(opts, "mtp", seed, keep=True, mtp_depth=1, **settings)
        model = a.trainer.model
        model.eval()
        capture_router(model, False)
        val = a.trainer.val[:4]
        tf_acc.append(teacher_forced_acceptance(model, val))
        rows = torch.cat(list(a.trainer.val))
        prompts = [rows[i : i + 1, :prompt_len] for i in range(0, min(len(rows), n_prompts * 3), 3)][:n_prompts]
        eng.append(engine_decode_bench(model, prompts, n_new))
        acc = eng[-1]["acceptance_rate"]  # None when no prompt reached a speculative step
        log(f"  engine: acceptance {'n/a' if acc is None else f'{acc:.3f}'}, speed-up {eng[-1]['speedup']:.2f}x")
        a.trainer = None
        arms["MTP (D=1, λ=0.3)"].append(a)

    res_arms = []
    for label, runs in arms.items():
        vl, sd = mean_std([r.summary["val_loss"] for r in runs])
        res_arms.append(
            {
                "label": label,
                "mtp_depth": 1 if runs is arms["MTP (D=1, λ=0.3)"] else 0,
                "val_loss": vl,
                "val_loss_std": sd,
                "val_mtp_loss": mean_std([r.summary.get("val_mtp_loss") for r in runs])[0]
                if "MTP (" in label
                else None,
                "tokens_per_s": statistics.fmean(r.summary["tokens_per_s"] for r in runs),
                "tokens": runs[0].summary["tokens"],
                "seeds": len(runs),
            }
        )
    avg = {  # over seeds; acceptance is None for a seed whose prompts never reached a speculative step
        k: statistics.fmean(v) if (v := [s[k] for s in eng if s[k] is not None]) else None
        for k in eng[0]
        if k != "dtype"
    }
    no, yes = res_arms
    result = {
        "arms": res_arms,
        "val_loss_no_mtp": no["val_loss"],
        "val_loss_mtp": yes["val_loss"],
        "val_loss_delta": yes["val_loss"] - no["val_loss"],
        "acceptance_rate": avg["acceptance_rate"],
        "acceptance_rate_teacher_forced": statistics.fmean(tf_acc),
        "tokens_per_forward": avg["tokens_per_forward"],
        "speculative_speedup": avg["speedup"],
        "speculative_speedup_decode_only": avg["decode_only_speedup"],
        "greedy_tok_s": avg["greedy_tok_s"],
        "speculative_tok_s": avg["speculative_tok_s"],
        "same_tokens_fraction": avg["same_tokens_fraction"],
        "train_cost_ratio": no["tokens_per_s"] / yes["tokens_per_s"],
        "train_tok_s_mtp": yes["tokens_per_s"],
        "train_tok_s_no_mtp": no["tokens_per_s"],
        "decode": {
            "prompts": n_prompts,
            "prompt_len": prompt_len,
            "new_tokens": n_new,
            "batch": 1,
            "source": "nanoseek.engine (bf16)",
        },
        "seeds": n_seeds,
        "steps": steps,
    }

    B, T = settings["batch_size"], settings["seq_len"]
    report.text(
        f"Model: `tiny` (MoE, MLA), bf16, loss-free balancing; {steps} steps x {B}x{T} tokens, {n_seeds} seed(s). "
        f"The MTP arm adds one MTP module (depth 1) with loss weight λ = {MTP_WEIGHT}. Decoding: batch 1, "
        f"{n_prompts} validation prompts of {prompt_len} tokens, {n_new} new tokens each, latent (absorbed) MLA "
        f"cache, `nanoseek.engine` in bf16; greedy and speculative runs interleaved prompt by prompt."
    )
    report.table(
        ["arm", "val loss (next token)", "± sd", "val MTP loss", "train tok/s"],
        [[r["label"], r["val_loss"], r["val_loss_std"], r["val_mtp_loss"], r["tokens_per_s"]] for r in res_arms],
        title="Quality",
    )
    report.table(
        ["metric", "ours", "paper"],
        [
            ["acceptance of the 2nd token (speculative decoding)", result["acceptance_rate"], "85–90% (V3 §5.4.3)"],
            ["acceptance, teacher-forced on validation text", result["acceptance_rate_teacher_forced"], "–"],
            ["tokens per main forward", result["tokens_per_forward"], "1.85 (Gloeckle, 2 heads)"],
            ["speculative speed-up (wall time)", result["speculative_speedup"], "1.8x TPS (V3)"],
            [
                "greedy tok/s -> speculative tok/s",
                f"{result['greedy_tok_s']:.1f} -> {result['speculative_tok_s']:.1f}",
                "–",
            ],
            ["speculative output == greedy output", result["same_tokens_fraction"], "1.0 (lossless)"],
            ["training cost of MTP (tok/s without / with)", result["train_cost_ratio"], "–"],
            ["val loss change with MTP (nats)", result["val_loss_delta"], "Pile BPB .729→.729 (flat)"],
        ],
        title="MTP as a draft model",
    )
    goals = [
        goal(
            "next-token val loss not worse by > 0.02 nats",
            result["val_loss_delta"],
            "≤ 0.02",
            result["val_loss_delta"] <= 0.02,
        ),
        goal(
            "speculative decoding reproduces greedy tokens",
            result["same_tokens_fraction"],
            "≥ 0.99",
            result["same_tokens_fraction"] >= 0.99,
        ),
        goal("speculative speed-up > 1", result["speculative_speedup"], "> 1", result["speculative_speedup"] > 1),
    ]
    report.goals(goals)
    result["goals"] = goals
    series = []
    for label, runs in arms.items():
        r = runs[0]
        series.append((f"{label}: val loss", [e["step"] for e in r.evals], [e["val_loss"] for e in r.evals]))
        if r.evals and r.evals[-1].get("val_mtp_loss") is not None:
            series.append(
                (f"{label}: val MTP loss (t+2)", [e["step"] for e in r.evals], [e["val_mtp_loss"] for e in r.evals])
            )
    report.plot(
        plot_lines(
            opts.out / "mtp_val_loss.png",
            series,
            "step",
            "validation loss (nats)",
            "Next-token loss with and without MTP (seed 0)",
            markers=True,
        ),
        "validation loss",
    )
    return result
