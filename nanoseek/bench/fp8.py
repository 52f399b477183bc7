"""`nanoseek bench fp8`: bf16 vs FP8 fine-grained (1x128 / 128x128 tiles) vs FP8 per-tensor training.

Same `tiny` model (no MTP), seed and data order in every arm; `nanoseek train --precision fp8` emulates the
V3 recipe on CPU (quantise -> dequantise -> an fp32-accurate GEMM), so it measures the *numerics* of FP8 training,
not its speed (tokens/s are reported, and on CPU FP8 is slower). Measured:
- relative training-loss error against bf16, |L_fp8 − L_bf16| / L_bf16, with both losses smoothed over the
  last ~10% of steps (the V3 report plots EMA-smoothed curves and quotes < 0.25%); the per-step EMA(0.9)
  curve is plotted. With several --seeds, `rel_loss_error_blockwise` / `_tensorwise` are |mean of the signed
  per-seed errors| (a systematic error; per-seed errors of opposite signs cancel), `..._abs_mean` the mean of
  their absolute values (what one run would show), and the goal's verdict uses
  `rel_loss_error_blockwise_bound` = |mean| + 2 standard errors;
- validation loss of each arm;
- saved-activation bytes of one training forward (`nanoseek.fp8.SavedTensorBytes`, parameters excluded),
  FP8 / bf16.
"""

from __future__ import annotations

import statistics

import torch

from .common import (
    BenchOptions,
    Report,
    base_settings,
    ema,
    goal,
    log,
    plot_lines,
    smooth_tail,
    train_arm,
)

TITLE = "FP8 mixed precision: fine-grained vs per-tensor scaling against bf16"
STEPS, QUICK_STEPS = 500, 3  # the issue and V3 compare relative loss error at 500+ steps
ARMS = [("bf16", "bf16", None), ("fp8 block-wise", "fp8", "block"), ("fp8 tensor-wise", "fp8", "tensor")]
# The control: fp32 against bf16 on the same seed and batches. A small model at a high learning rate amplifies
# any rounding difference into a different trajectory; the control's "error" is that noise floor, to read the
# FP8 arms against (not part of the goals).
CONTROL = ("fp32 (control)", "fp32", None)


def activation_bytes(settings: dict, granularity: str | None, batch: torch.Tensor) -> dict:
    """Bytes autograd saves in one training forward (+ loss) of a freshly built model, weights excluded."""
    from ..fp8 import SavedTensorBytes
    from ..model import Transformer
    from ..train import build_model_config, lm_losses
    from ..train_config import TrainConfig

    tc = TrainConfig(**{k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__})
    torch.manual_seed(0)
    model = Transformer(build_model_config(tc)).train()
    if granularity is not None:
        from ..fp8_linear import convert_to_fp8

        convert_to_fp8(model, granularity=granularity)
    x, y = batch[:, :-1], batch[:, 1:]
    # one step first, outside the measurement: one-off work on a process's first call (the MoE kernel autotune
    # runs its own forwards and backwards) would otherwise count as this arm's activations
    with torch.autocast("cpu", torch.bfloat16):
        lm_losses(model, x, y, False)[0].backward()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16), SavedTensorBytes(exclude=model.parameters()) as m:
        loss, _ = lm_losses(model, x, y, False)
    del loss
    return {"bytes": m.bytes, "by_dtype": {str(k).replace("torch.", ""): v for k, v in m.by_dtype.items()}}


def run(opts: BenchOptions, report: Report) -> dict:
    steps = opts.n_steps(STEPS, QUICK_STEPS)
    n_seeds = opts.n_seeds(1)
    settings = base_settings(opts, mtp_depth=0, steps=steps)
    settings["eval_every"] = opts.eval_every(steps, 4)
    runs: dict[str, list] = {}  # label -> one Arm per seed
    for seed in range(n_seeds):
        for label, precision, gran in [*ARMS, CONTROL]:
            kw = dict(settings, precision=precision)
            if gran:
                kw["fp8_granularity"] = gran
            slug = label.replace(" (control)", "").replace(" ", "_")
            runs.setdefault(label, []).append(train_arm(opts, slug, seed, keep=label == "bf16" and not seed, **kw))
    batch = runs["bf16"][0].trainer.stream.next_batch(settings["batch_size"])
    runs["bf16"][0].trainer = None
    mem = {label: activation_bytes(settings, gran, batch) for label, _, gran in ARMS}

    def losses(label: str, seed: int | None = None) -> list[float]:
        """Per-step training loss of one seed, or averaged over the seeds (which averages out the trajectory
        noise that any rounding difference causes, and keeps what a precision changes systematically)."""
        per = [[s["loss"] for s in arm.steps if s["loss"] is not None] for arm in runs[label]]
        if seed is not None:
            return per[seed]
        return [statistics.fmean(v) for v in zip(*per)]

    others = [label for label, _, _ in [*ARMS[1:], CONTROL]]
    # signed relative error of the smoothed final loss, per seed; the reported error is |mean over seeds|
    signed = {
        label: [
            (smooth_tail(losses(label, k)) - smooth_tail(losses("bf16", k))) / smooth_tail(losses("bf16", k))
            for k in range(n_seeds)
        ]
        for label in others
    }
    rel = {label: abs(statistics.fmean(v)) for label, v in signed.items()}
    sem = {label: statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else None for label, v in signed.items()}
    ema_bf = ema(losses("bf16"), 0.9)
    mean_abs = {  # |relative error| of the EMA(0.9) curves averaged over all steps: less luck than the end point
        label: statistics.fmean(abs(a - b) / b for a, b in zip(ema(losses(label), 0.9), ema_bf))
        for label, _, _ in [*ARMS[1:], CONTROL]
    }

    def tok_s(label: str) -> float:
        return statistics.fmean(a.summary["tokens_per_s"] for a in runs[label])

    result = {
        "rel_loss_error_blockwise": rel["fp8 block-wise"],
        "rel_loss_error_tensorwise": rel["fp8 tensor-wise"],
        "rel_loss_error_fp32_control": rel[CONTROL[0]],
        "rel_loss_error_blockwise_abs_mean": statistics.fmean(map(abs, signed["fp8 block-wise"])),
        "rel_loss_error_tensorwise_abs_mean": statistics.fmean(map(abs, signed["fp8 tensor-wise"])),
        "rel_loss_error_per_seed": signed,  # signed, (L_arm - L_bf16) / L_bf16, one per seed
        "rel_loss_error_sem": sem,  # standard error of the mean over seeds (None with one seed)
        "mean_rel_loss_error": mean_abs,
        "activation_memory_ratio": mem["fp8 block-wise"]["bytes"] / mem["bf16"]["bytes"],
        "activation_memory_ratio_tensorwise": mem["fp8 tensor-wise"]["bytes"] / mem["bf16"]["bytes"],
        "activation_bytes": {k: v["bytes"] for k, v in mem.items()},
        "activation_bytes_by_dtype": {k: v["by_dtype"] for k, v in mem.items()},
        "tokens_per_s_bf16": tok_s("bf16"),
        "tokens_per_s_fp8_blockwise": tok_s("fp8 block-wise"),
        "tokens_per_s_fp8_tensorwise": tok_s("fp8 tensor-wise"),
        "tokens_per_s_fp32": tok_s(CONTROL[0]),
        "val_loss": {k: statistics.fmean(a.summary["val_loss"] for a in r) for k, r in runs.items()},
        "final_loss_smoothed": {k: smooth_tail(losses(k)) for k in runs},
        "steps": steps,
        "tokens": runs["bf16"][0].summary["tokens"],
        "seeds": n_seeds,
    }
    log(f"fp8: rel. loss error block {rel['fp8 block-wise']:.4%}, tensor {rel['fp8 tensor-wise']:.4%}")

    report.text(
        f"`tiny` (MoE + MLA, no MTP), {n_seeds} seed(s) (0..{n_seeds - 1}), {steps} steps x "
        f"{settings['batch_size']}x{settings['seq_len']} tokens, "
        "the same data order in every arm of a seed. FP8 is emulated exactly on CPU (E4M3 values, fp32 scales; "
        "activations 1x128, weights 128x128 for block-wise; one scale per tensor for tensor-wise); the "
        "embedding, head, gate, norms and attention core stay high precision, as in V3. Relative error of the "
        "training loss averaged over the last 10% of steps (signed per seed; the table shows |mean over seeds| "
        "and its standard error), and of the seed-averaged EMA(0.9) curves averaged over all steps. "
        "The fp32 arm is a control: its difference from bf16 is the noise floor of this comparison (a rounding "
        "difference grows into a different trajectory), not a goal."
    )
    report.table(
        [
            "arm",
            "final train loss (last 10%)",
            "rel. error vs bf16",
            "± s.e. (seeds)",
            "per seed (signed)",
            "mean rel. error (EMA curves)",
            "val loss",
            "saved activations (MiB)",
            "vs bf16",
            "train tok/s",
        ],
        [
            [
                label,
                result["final_loss_smoothed"][label],
                rel.get(label, 0.0),
                sem.get(label),
                " ".join(f"{v:+.3%}" for v in signed.get(label, [])),
                mean_abs.get(label, 0.0),
                result["val_loss"][label],
                mem[label]["bytes"] / 2**20 if label in mem else None,
                mem[label]["bytes"] / mem["bf16"]["bytes"] if label in mem else None,
                tok_s(label),
            ]
            for label, _, _ in [*ARMS, CONTROL]
        ],
        title="Results",
    )
    report.table(
        ["arm", "saved bytes by dtype"],
        [[k, str(v["by_dtype"])] for k, v in mem.items()],
        title="Saved activations by dtype (one forward)",
        echo=False,
    )
    report.table(
        ["paper", "figure"],
        [
            ["V3 (16B / 230B MoE, ~1T tokens): FP8 fine-grained rel. loss error", "< 0.25%"],
            ["FP8-LM 7B zero-shot avg bf16 / fp8", "58.4 / 58.0"],
            ["expected here (paper-targets §2)", "fine-grained < 0.25%, per-tensor worse; no CPU speed-up"],
        ],
        title="Paper figures",
    )
    # with several seeds a verdict must hold beyond the seed-to-seed noise: |mean| + 2 s.e. below the limit, and
    # per-tensor worse by more than 2 s.e. of the difference; one seed has no error bar (point estimates)
    blk, ten = "fp8 block-wise", "fp8 tensor-wise"
    diff_two_se = 2 * ((sem[blk] or 0.0) ** 2 + (sem[ten] or 0.0) ** 2) ** 0.5
    result["rel_loss_error_blockwise_bound"] = rel[blk] + 2 * (sem[blk] or 0.0)  # |mean| + 2 s.e.
    goals = [
        goal(
            "FP8 block-wise relative loss error (|mean| + 2 s.e. over seeds)",
            result["rel_loss_error_blockwise_bound"],
            "< 0.25%",
            result["rel_loss_error_blockwise_bound"] < 0.0025,
        ),
        goal(
            "per-tensor error above block-wise by more than 2 s.e. (visibly worse)",
            rel[ten] - rel[blk],
            f"> {diff_two_se:.4%}",
            rel[ten] - rel[blk] > diff_two_se,
        ),
        goal(
            "FP8 saved activations ≥ 30% below bf16 (fp8 / bf16 bytes)",
            result["activation_memory_ratio"],
            "≤ 0.70",
            result["activation_memory_ratio"] <= 0.70,
        ),
    ]
    report.goals(goals)
    result["goals"] = goals
    bf = ema(losses("bf16"), 0.9)
    series = []
    for label, _, _ in [*ARMS[1:], CONTROL]:
        fl = ema(losses(label), 0.9)  # the V3 report compares EMA(0.9)-smoothed loss curves
        series.append((label, list(range(1, len(fl) + 1)), [abs(a - b) / b for a, b in zip(fl, bf)]))
    report.plot(
        plot_lines(
            opts.out / "fp8_rel_error.png",
            series,
            "step",
            "|EMA(L_fp8) − EMA(L_bf16)| / EMA(L_bf16)",
            "Relative training-loss error vs bf16",
            logy=True,
            hlines=[(0.0025, "0.25% (V3)")],
        ),
        "relative loss error",
    )
    report.plot(
        plot_lines(
            opts.out / "fp8_loss.png",
            [(k, list(range(1, len(losses(k)) + 1)), ema(losses(k), 0.9)) for k in runs],
            "step",
            "training loss (EMA 0.9)",
            "Training loss",
        ),
        "training loss",
    )
    return result
