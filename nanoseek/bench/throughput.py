"""`nanoseek bench train`: training-step tokens/s, ours vs transformers' `DeepseekV3ForCausalLM`.

Identical config (exported with `nanoseek.hf`), identical initial weights (ours saved with `save_pretrained`,
loaded by transformers) and the identical batch; both steps are forward + cross-entropy + backward + clip +
AdamW (lr 3e-3, betas 0.9/0.95, wd 0.1). MTP is disabled in ours (transformers has none), so both count the
same `cost_report(cfg, T)["train_flops_per_token"]`. Ours is the real `Trainer.train_step` (fp32 master
weights; bf16 = autocast, as `nanoseek train --precision bf16`), including the loss-free bias update and
the default sequence-wise balance loss, fed the fixed batch.

transformers gets its best shot: every experts implementation it offers on CPU (`grouped_mm`, `batched_mm`,
`eager`), sdpa attention, and for bf16 both `torch.autocast` over fp32 weights and weights cast to bf16.
Each transformers variant is timed in its own interleaved pair with ours (one step of each, alternating,
after warm-up), and the speed-up is the ratio of the medians within the pair, so machine load that drifts
between pairs cancels. In the bf16 pass ours is paired with every variant, fp32 ones included, so "speed-up
over transformers' best precision" is also a within-pair ratio: the variant reported is the one that comes
closest to ours (the lowest speed-up), with ours' tokens/s of that same pair (`ours_tok_s_in_pair`);
`ours_tok_s` is our median over all pairs. The bf16 GEMM peak is a 2048x2048x2048 bf16 matmul timed between
the training steps of each pass: `gemm_peak_fraction` (the goal's number) divides by the median of those
probes (the same load as the steps), `gemm_peak_fraction_of_max` by the highest probe of the run.

Both libraries run in this one process, so the malloc thresholds our Trainer sets on CPU (`cpu_malloc.py`) apply
to transformers' steps as well: the ratios compare the libraries under the same allocator, not our allocator
setting against glibc's defaults.
"""

from __future__ import annotations

import copy
import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import get_preset
from ..costs import cost_report
from .common import (
    MICRO,
    BenchOptions,
    Report,
    gemm_gflops,
    goal,
    log,
    median,
    overrides,
    plot_bars,
)

TITLE = "Training throughput: ours vs transformers' DeepseekV3ForCausalLM"
FULL_CASES = [("tiny", 8, 256, 5), ("small", 4, 512, 3)]  # preset, batch, seq_len, timed rounds per pair
QUICK_CASES = [("tiny", 2, 64, 2)]
HF_EXPERTS = ("grouped_mm", "batched_mm", "eager")
LR, BETAS, WD = 3e-3, (0.9, 0.95), 0.1


BATCHED_MM_LIMIT = 3 * 2**30


def batched_mm_bytes(cfg, tokens: int, elem: int) -> int:
    """Bytes of expert weights transformers' `batched_mm` gathers (and keeps for backward) in one step."""
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    pairs = tokens * cfg.num_experts_per_tok
    return n_moe * pairs * 3 * cfg.moe_intermediate_size * cfg.hidden_size * elem


class OursStep:
    def __init__(
        self,
        opts: BenchOptions,
        preset: str,
        model_overrides: dict,
        B: int,
        T: int,
        precision: str,
        tokenizer: str,
        out: Path,
    ):
        from ..train import Trainer
        from ..train_config import TrainConfig

        tc = TrainConfig(
            preset=preset,
            override=overrides(model_overrides),
            mtp_depth=0,
            batch_size=B,
            seq_len=T,
            precision=precision,
            data=opts.data,
            tokenizer=tokenizer,
            eval_tokens=T + 1,
            steps=10**6,
            progress=False,
            out=str(out),
            lr=LR,
            weight_decay=WD,
            threads=opts.threads,
        )
        self.trainer = Trainer(tc)
        self.batch: torch.Tensor | None = None

    def set_batch(self, batch: torch.Tensor) -> None:
        self.batch = batch
        self.trainer.stream.next_batch = lambda n: batch

    def __call__(self) -> float:
        return self.trainer.train_step()["loss"]


class HFStep:
    """One transformers training step on the same batch (cross-entropy computed like ours, in fp32)."""

    def __init__(self, model, mode: str):
        self.model, self.mode = model, mode  # mode: fp32 | autocast | bf16-weights
        self.model.train()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WD}, {"params": other, "weight_decay": 0.0}], lr=LR, betas=BETAS
        )

    def __call__(self, batch: torch.Tensor) -> float:
        x, y = batch[:, :-1], batch[:, 1:]
        ctx = torch.autocast("cpu", torch.bfloat16) if self.mode == "autocast" else torch.autocast("cpu", enabled=False)
        with ctx:
            logits = self.model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class GemmProbe:
    """GFLOP/s of one n x n x n bf16 matmul, timed between training steps: the peak under the same load."""

    def __init__(self, n: int):
        self.n = n
        self.a = torch.randn(n, n).bfloat16()
        self.b = torch.randn(n, n).bfloat16()
        self.a @ self.b

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.a @ self.b
        return 2 * self.n**3 / (time.perf_counter() - t0) / 1e9


def timed_pair(ours: OursStep, hf: HFStep, batch: torch.Tensor, rounds: int, probe: GemmProbe):
    """Warm up both, then alternate one step of each `rounds` times, with one GEMM-peak probe per round;
    returns (ours times, hf times, probe GFLOP/s)."""
    ours()
    hf(batch)
    t_ours, t_hf, peaks = [], [], []
    for _ in range(rounds):
        peaks.append(max(probe(), probe()))
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        hf(batch)
        t2 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_hf.append(t2 - t1)
    return t_ours, t_hf, peaks


def bench_preset(opts: BenchOptions, preset: str, B: int, T: int, rounds: int, tokenizer: str, tmp: Path) -> dict:
    from transformers import DeepseekV3ForCausalLM

    from ..hf import save_pretrained

    model_over = dict(MICRO) if opts.quick else {}
    cfg = get_preset(preset, **model_over, num_nextn_predict_layers=0)
    flops_tok = cost_report(cfg, T)["train_flops_per_token"]
    n = 512 if opts.quick else 2048  # the GEMM size of the peak probes
    peak_bf16 = gemm_gflops(n, torch.bfloat16, 5 if not opts.quick else 2)
    peak_fp32 = gemm_gflops(n, torch.float32, 3 if not opts.quick else 2)
    probe = GemmProbe(n)
    log(
        f"train: {preset} B={B} T={T}: {flops_tok / 1e6:.1f} MFLOP/token; GEMM {n}^3 bf16 {peak_bf16:.0f} "
        f"GFLOP/s, fp32 {peak_fp32:.0f} GFLOP/s"
    )
    out = {
        "preset": preset,
        "batch_size": B,
        "seq_len": T,
        "flops_per_token": flops_tok,
        "params": cost_report(cfg, T)["params_total"],
        "gemm_bf16_gflops": peak_bf16,
        "gemm_fp32_gflops": peak_fp32,
        "passes": {},
    }

    for precision in ("fp32", "bf16"):
        ours = OursStep(opts, preset, model_over, B, T, precision, tokenizer, tmp / f"ours_{preset}_{precision}")
        batch = ours.trainer.stream.next_batch(B)
        ours.set_batch(batch)
        hf_dir = tmp / f"hf_{preset}"
        if precision == "fp32":  # the same initial weights as ours
            save_pretrained(ours.trainer.model, hf_dir, dtype=torch.float32)
        base = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
        modes = ["fp32"] if precision == "fp32" else ["fp32", "autocast", "bf16-weights"]
        if opts.quick:  # a smoke run: one transformers variant per pass
            modes = modes[-1:]
        pairs = []
        first = {}
        for mode in modes:
            for impl in HF_EXPERTS[:1] if opts.quick else HF_EXPERTS:
                label = f"{mode}/{impl}"
                gathered = batched_mm_bytes(cfg, B * T, 2 if mode == "bf16-weights" else 4)
                if impl == "batched_mm" and gathered > BATCHED_MM_LIMIT:
                    why = (
                        f"skipped: batched_mm gathers one weight copy per (token, expert) pair, "
                        f"{gathered / 2**30:.1f} GiB per step here"
                    )
                    log(f"  transformers {label}: {why}")
                    pairs.append({"variant": label, "error": why})
                    continue
                try:
                    m = base if mode != "bf16-weights" else copy.deepcopy(base).to(torch.bfloat16)
                    m.set_experts_implementation(impl)
                    hf = HFStep(m, mode)
                    if precision == "fp32" and not first:  # identical weights, config and batch: same loss
                        first = {"ours": ours(), "transformers": hf(batch)}
                    t_ours, t_hf, peaks = timed_pair(ours, hf, batch, rounds, probe)
                except Exception as e:  # a variant transformers cannot run here is reported, not fatal
                    log(f"  transformers {label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    pairs.append({"variant": label, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                finally:
                    gc.collect()
                n = B * T
                p = {
                    "variant": label,
                    "ours_tok_s": n / median(t_ours),
                    "transformers_tok_s": n / median(t_hf),
                    "speedup": median(t_hf) / median(t_ours),
                    "gemm_bf16_gflops": median(peaks),
                }
                pairs.append(p)
                log(
                    f"  {precision} ours {p['ours_tok_s']:.0f} tok/s vs transformers {label} "
                    f"{p['transformers_tok_s']:.0f} tok/s: {p['speedup']:.2f}x"
                )
                del hf
                if mode == "bf16-weights":
                    del m
        del base
        out["passes"][precision] = {"pairs": pairs, "first_step_loss": first}
        del ours
        gc.collect()
    shutil.rmtree(tmp / f"hf_{preset}", ignore_errors=True)
    return out


def summarise(case: dict, peak_max: float) -> list[dict]:
    """One row per precision pass. The GEMM peak of a pass is the median of the probes timed between its
    training steps (the same load as the steps); `gemm_peak_max_gflops` is the best seen in the run."""
    rows = []
    for precision, pas in case["passes"].items():
        ok = [p for p in pas["pairs"] if "error" not in p]
        if not ok:
            continue
        ours_tok_s = median([p["ours_tok_s"] for p in ok])
        same = [
            p
            for p in ok
            if (p["variant"].startswith("fp32") if precision == "fp32" else not p["variant"].startswith("fp32"))
        ]
        best_any = min(ok, key=lambda p: p["speedup"])  # transformers' best relative to ours
        best_same = min(same, key=lambda p: p["speedup"]) if same else best_any
        achieved = ours_tok_s * case["flops_per_token"]
        peak = median([p["gemm_bf16_gflops"] for p in ok])
        rows.append(
            {
                "preset": case["preset"],
                "precision": precision,
                "batch_size": case["batch_size"],
                "seq_len": case["seq_len"],
                "ours_tok_s": ours_tok_s,
                "ours_tok_s_in_pair": best_any["ours_tok_s"],  # speedup = this / transformers_tok_s
                "transformers_tok_s": best_any["transformers_tok_s"],
                "transformers_best": best_any["variant"],
                "speedup": best_any["speedup"],
                "transformers_same_precision_tok_s": best_same["transformers_tok_s"],
                "speedup_same_precision": best_same["speedup"],
                "achieved_gflops": achieved / 1e9,
                "transformers_achieved_gflops": best_any["transformers_tok_s"] * case["flops_per_token"] / 1e9,
                "gemm_peak_gflops": peak,
                "gemm_peak_max_gflops": peak_max,
                "gemm_peak_fraction_of_max": achieved / 1e9 / peak_max,
                "gemm_peak_fraction": achieved / 1e9 / peak,
                "flops_per_token": case["flops_per_token"],
                "mtp_in_flops": False,
                "first_step_loss": pas["first_step_loss"],
            }
        )
    return rows


def run(opts: BenchOptions, report: Report) -> dict:
    from ..data import corpus_from_spec, default_corpus
    from ..tokenizer import get_tokenizer

    cases = QUICK_CASES if opts.quick else FULL_CASES
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-", dir=opts.out))
    corpus = corpus_from_spec(opts.data) if opts.data else default_corpus()
    tok_path = tmp / "tokenizer.json"
    get_tokenizer(corpus, 4096).save(tok_path)  # the cached tiny tokenizer; ids fit every preset's vocab
    try:
        raw = [bench_preset(opts, p, B, T, r, str(tok_path), tmp) for p, B, T, r in cases]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak = max(
        [c["gemm_bf16_gflops"] for c in raw]
        + [p["gemm_bf16_gflops"] for c in raw for pas in c["passes"].values() for p in pas["pairs"] if "error" not in p]
    )
    results = [row for c in raw for row in summarise(c, peak)]

    report.text(
        "Train-step tokens/s of the same model, batch and initial weights. `speedup` = transformers' time / ours, "
        "within an interleaved pair, against the transformers variant (any precision) that comes closest to ours; "
        "`same-precision` restricts transformers to the row's precision (bf16 = its best of autocast and bf16 "
        "weights). FLOPs/token from `cost_report` without MTP (disabled in both). The bf16 GEMM peak is a "
        f"{'512' if opts.quick else '2048'}³ "
        "bf16 matmul timed between the training steps of each pass (median; same load as the steps); the best "
        f"measurement of the run was {peak:.0f} GFLOP/s, and the last column uses it."
    )
    report.table(
        [
            "preset",
            "B×T",
            "precision",
            "ours tok/s (median of pairs)",
            "ours tok/s in the closest pair",
            "transformers tok/s in that pair",
            "closest variant",
            "speed-up (in that pair)",
            "speed-up same precision",
            "ours GFLOP/s",
            "bf16 GEMM GFLOP/s (same load)",
            "% of that peak",
            "% of the run's best peak",
        ],
        [
            [
                r["preset"],
                f"{r['batch_size']}×{r['seq_len']}",
                r["precision"],
                r["ours_tok_s"],
                r["ours_tok_s_in_pair"],
                r["transformers_tok_s"],
                r["transformers_best"],
                r["speedup"],
                r["speedup_same_precision"],
                r["achieved_gflops"],
                r["gemm_peak_gflops"],
                100 * r["gemm_peak_fraction"],
                100 * r["gemm_peak_fraction_of_max"],
            ]
            for r in results
        ],
        title="Training throughput",
    )
    detail = [
        [
            c["preset"],
            prec,
            p["variant"],
            p.get("ours_tok_s"),
            p.get("transformers_tok_s"),
            p.get("speedup"),
            p.get("error", "")[:60],
        ]
        for c in raw
        for prec, pas in c["passes"].items()
        for p in pas["pairs"]
    ]
    report.table(
        ["preset", "ours precision", "transformers variant", "ours tok/s", "transformers tok/s", "speed-up", "error"],
        detail,
        title="Every interleaved pair",
    )
    report.table(
        ["preset", "ours loss (step 1)", "transformers loss (step 1)"],
        [
            [
                c["preset"],
                c["passes"]["fp32"]["first_step_loss"].get("ours"),
                c["passes"]["fp32"]["first_step_loss"].get("transformers"),
            ]
            for c in raw
        ],
        title="Like-for-like check: same weights and batch give the same fp32 loss",
        digits=6,
    )
    report.table(
        ["reference (cpu-performance-notes.md)", "value"],
        [
            ["transformers tiny B=8 T=256 fp32", "4,614 tok/s"],
            ["transformers small B=4 T=512", "476 fp32 / 298 bf16 tok/s"],
            ["bf16 GEMM 2048³ (Xeon, AMX)", "1,384 GFLOP/s"],
        ],
        title="Reference figures",
    )
    goals = []
    for r in results:
        if (r["preset"] == "small" and r["precision"] == "bf16") or (opts.quick and r["precision"] == "bf16"):
            goals.append(goal(f"{r['preset']} bf16 ≥ 3x transformers' best", r["speedup"], "≥ 3", r["speedup"] >= 3))
            goals.append(
                goal(
                    f"{r['preset']} bf16 ≥ 35% of the bf16 GEMM peak",
                    r["gemm_peak_fraction"],
                    "≥ 0.35",
                    r["gemm_peak_fraction"] >= 0.35,
                )
            )
    report.goals(goals)
    groups = [f"{r['preset']} {r['precision']}" for r in results]
    report.plot(
        plot_bars(
            opts.out / "train_tok_s.png",
            groups,
            {
                "ours": [r["ours_tok_s"] for r in results],
                "transformers (best)": [r["transformers_tok_s"] for r in results],
            },
            "tokens/s (training)",
            "Training throughput, same model and batch",
        ),
        "training tokens/s",
    )
    return {"results": results, "goals": goals, "raw": raw, "gemm_bf16_peak_gflops": peak}
