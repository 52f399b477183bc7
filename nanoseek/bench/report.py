"""`nanoseek bench report`: one markdown report over the whole suite.

Collects every bench's saved result (`<results dir>/NAME/result.json`, the results dir being the parent of
`--out`, i.e. `runs/bench` by default) and runs the benches that have none (with the same --quick, --seeds,
--steps and --data). For each of the five design choices it puts the quality effect and the cost effect
next to the conventional alternative, with the papers' figures beside ours, plus a summary figure and the
benches' own plots. Benches that cannot run in this checkout are listed with the reason. Results saved by
other code than this checkout (their `code` commit differs, or they record none) are named in the report and
in `older_code`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import NanoseekError
from .common import BenchOptions, Report, code_version, fmt, log, table

TITLE = "DeepSeek-V3 design choices at small scale: quality and cost against the conventional alternative"
ORDER = ["kv", "balance", "mtp", "train", "attention", "moe", "decode", "fp8", "comm"]


def collect(opts: BenchOptions) -> tuple[dict[str, dict], dict[str, str]]:
    from . import OPTIONS
    from . import run as run_bench

    root = Path(opts.out).parent
    results, missing = {}, {}
    for name in ORDER:
        path = root / name / "result.json"
        why = "no saved result"
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except ValueError:
                saved, why = None, f"{path} is not valid JSON"
            if isinstance(saved, dict) and saved.get("bench") == name:
                try:
                    sections({name: saved})  # the fields the report reads are there and of the right kind
                    results[name] = _with_paths(saved, root / name)
                    continue
                except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                    why = f"{path} lacks what the report reads ({type(e).__name__}: {e})"
            elif saved is not None:  # another shape: hand-edited, or another version's
                why = f"{path} is not a {name} result"
        log(f"report: {why}; running {name}")
        # the training options reach the benches that read them (a --steps given to kv would be refused)
        take = OPTIONS[name]
        sub = BenchOptions(
            quick=opts.quick,
            out=root / name,
            seeds=opts.seeds if "seeds" in take else None,
            steps=opts.steps if "steps" in take else None,
            data=opts.data if "data" in take else None,
            threads=opts.threads,
            reuse=opts.reuse and "reuse" in take,
            argv=[name, *(["--quick"] if opts.quick else [])],
        )
        try:
            results[name] = run_bench(name, sub)
        except NanoseekError as e:
            missing[name] = str(e)
            log(f"report: {name} unavailable: {e}")
    return results, missing


def _with_paths(result: dict, out_dir: Path) -> dict:
    """A saved result's report and plot paths were written relative to where its bench ran: found from
    elsewhere (`bench report` run in another directory) they are looked up in the bench's own directory."""

    def here(p):
        return p if not isinstance(p, str) or Path(p).exists() else str(out_dir / Path(p).name)

    plots = result.get("plots")
    return {
        **result,
        "report": here(result.get("report")),
        "plots": [here(p) for p in plots] if isinstance(plots, list) else [],
    }


def _get(d: dict | None, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _arm(res: dict | None, key: str, value) -> dict:
    return next((a for a in (res or {}).get("arms", []) if a.get(key) == value), {})


def sections(r: dict[str, dict]) -> list[tuple[str, list[list], str]]:
    """(title, rows [metric, DeepSeek choice, conventional, effect, paper], note) per design choice."""
    out = []
    fp8, tr = r.get("fp8"), r.get("train")
    bf16_rows = [x for x in (tr or {}).get("results", []) if x["precision"] == "bf16"]
    small_bf16 = next((x for x in bf16_rows if x["preset"] == "small"), bf16_rows[-1] if bf16_rows else {})
    small_fp32 = next(
        (
            x
            for x in (tr or {}).get("results", [])
            if x["preset"] == small_bf16.get("preset") and x["precision"] == "fp32"
        ),
        {},
    )
    rows = [
        [
            "rel. training-loss error vs bf16",
            _get(fp8, "rel_loss_error_blockwise"),
            _get(fp8, "rel_loss_error_tensorwise"),
            "fine-grained (1x128/128x128) vs per-tensor FP8",
            "< 0.25% (V3, fine-grained)",
        ],
        [
            "saved activation bytes, FP8 / bf16",
            _get(fp8, "activation_memory_ratio"),
            1.0,
            "memory",
            "FP8 caching (V3 §3.3)",
        ],
        [
            "train tok/s FP8 (CPU emulation) vs bf16",
            _get(fp8, "tokens_per_s_fp8_blockwise"),
            _get(fp8, "tokens_per_s_bf16"),
            "no FP8 GEMMs on CPU",
            "–",
        ],
        [
            f"train tok/s bf16 vs fp32 ({small_bf16.get('preset', '?')})",
            small_bf16.get("ours_tok_s"),
            small_fp32.get("ours_tok_s"),
            "bf16 GEMMs",
            "–",
        ],
        [
            "ours bf16 vs transformers' best (speed-up)",
            small_bf16.get("speedup"),
            1.0,
            "same model & batch",
            "goal ≥ 3x",
        ],
        ["fraction of the bf16 GEMM peak", small_bf16.get("gemm_peak_fraction"), None, "", "goal ≥ 35%"],
    ]
    out.append(("1. Mixed precision and FP8", rows, "Quality: loss error. Cost: activation memory and throughput."))

    m = r.get("mtp")
    rows = [
        [
            "next-token val loss",
            _get(m, "val_loss_mtp"),
            _get(m, "val_loss_no_mtp"),
            _get(m, "val_loss_delta"),
            "Pile BPB .729 → .729 (V3 small)",
        ],
        [
            "training tok/s",
            _get(m, "train_tok_s_mtp"),
            _get(m, "train_tok_s_no_mtp"),
            f"{fmt(_get(m, 'train_cost_ratio'))}x the time per token",
            "–",
        ],
        ["acceptance of the drafted 2nd token", _get(m, "acceptance_rate"), None, "", "85–90% (V3)"],
        ["tokens per main forward", _get(m, "tokens_per_forward"), 1.0, "", "1.85 (Gloeckle, 2 heads)"],
        ["decode speed-up (self-speculative)", _get(m, "speculative_speedup"), 1.0, "", "1.8x TPS (V3)"],
    ]
    out.append(
        ("2. Multi-token prediction", rows, "DeepSeek choice = MTP depth 1 (λ=0.3); conventional = next-token only.")
    )

    a, kv = r.get("attention"), r.get("kv")
    mla, mha = _arm(a, "label", "MLA"), _arm(a, "label", "MHA")
    gqa = next((x for x in (a or {}).get("arms", []) if str(x.get("label", "")).startswith("GQA")), {})
    v3 = {x["attention"]: x for x in (kv or {}).get("rows", []) if x["preset"] == "v3"}
    rel = (mla["val_loss"] - mha["val_loss"]) / mha["val_loss"] if mla and mha else None
    rows = [
        [
            "val loss at matched params (MLA vs MHA; GQA)",
            mla.get("val_loss"),
            mha.get("val_loss"),
            f"{fmt(rel)} relative; GQA {fmt(gqa.get('val_loss'))}",
            "MLA ≥ MHA at 16B-250B; ~1-2% worse expected here",
        ],
        [
            "KV bytes/token (bf16), bench model",
            mla.get("kv_bytes_per_token"),
            mha.get("kv_bytes_per_token"),
            f"GQA {fmt(gqa.get('kv_bytes_per_token'))}",
            "–",
        ],
        [
            "KV elements/token/layer at V3 size",
            _get(v3, "MLA", "elements_per_token_per_layer"),
            _get(v3, "MHA", "elements_per_token_per_layer"),
            f"GQA-8 {fmt(_get(v3, 'GQA-8', 'elements_per_token_per_layer'))}",
            "576 vs 32,768 (V3); V2 -93.3% vs 67B",
        ],
        [
            "decode tok/s, batch 1, long context",
            mla.get("decode_tok_s_b1"),
            mha.get("decode_tok_s_b1"),
            f"GQA {fmt(gqa.get('decode_tok_s_b1'))}",
            "5.76x max generation throughput (V2, GPU)",
        ],
        [
            "decode tok/s, batch 8, long context",
            mla.get("decode_tok_s_b8"),
            mha.get("decode_tok_s_b8"),
            f"GQA {fmt(gqa.get('decode_tok_s_b8'))}",
            "–",
        ],
    ]
    out.append(("3. Multi-head latent attention", rows, "Conventional = MHA (and GQA) at the same parameter count."))

    c = r.get("comm")
    bpt = _get(c, "bytes_per_token") or {}
    rows = [
        [
            "EP bytes/token/layer, bf16, node-limited (1 node) vs none",
            bpt.get("bf16_max_1_node"),
            bpt.get("bf16_no_limit"),
            "node-limited routing",
            "M = 4 nodes of 8 (V3)",
        ],
        [
            "EP bytes/token/layer, FP8 dispatch vs bf16 (no limit)",
            bpt.get("fp8_no_limit"),
            bpt.get("bf16_no_limit"),
            "FP8 dispatch, bf16 combine",
            "FP8 dispatch (V3 §3.3)",
        ],
        ["EP bytes/token/layer, bf16 vs fp32 (no limit)", bpt.get("bf16_no_limit"), bpt.get("fp32_no_limit"), "", "–"],
        [
            "compute/communication overlap: hidden fraction",
            _get(c, "hidden_fraction"),
            0.0,
            "",
            "≈ full overlap (DualPipe)",
        ],
        [
            "pipeline bubble (s): DualPipeV vs 1F1B, measured",
            _get(c, "bubble", "dualpipev", "measured_s"),
            _get(c, "bubble", "1f1b", "measured_s"),
            "",
            "(PP/2−1)(F&B+B−3W) vs (PP−1)(F+B)",
        ],
        [
            "pipeline bubble (s): DualPipeV vs 1F1B, simulated",
            _get(c, "bubble", "dualpipev", "simulated_s"),
            _get(c, "bubble", "1f1b", "simulated_s"),
            "",
            "PP=8: 6 (3 overlapped) vs 21",
        ],
    ]
    out.append(("4. Communication", rows, "Bytes are exact counts; times come from gloo ranks on one loaded machine."))

    mo, bal = r.get("moe"), r.get("balance")
    moe_arm = (mo or {}).get("arms", [{}])[0] if mo else {}
    act = _arm(mo, "label", "dense, same active")
    tot = _arm(mo, "label", "dense, same total")
    iso = _arm(mo, "label", "dense, same total, same FLOPs")
    lfs = [x for x in (bal or {}).get("arms", []) if x.get("balance") == "loss-free"]
    lf = lfs[0] if lfs else {}  # the bench lists V3's γ first
    others = "; ".join(f"{x['label']}: {fmt(x.get('maxvio_global'))}" for x in lfs[1:])
    others_loss = "; ".join(f"{x['label']}: {fmt(x.get('val_loss'))}" for x in lfs[1:])
    aux = _arm(bal, "alpha", 1e-3)
    aux2 = _arm(bal, "alpha", 1e-2)
    none = _arm(bal, "balance", "none")
    rows = [
        [
            "val loss, DeepSeekMoE vs dense with the same active params",
            moe_arm.get("val_loss"),
            act.get("val_loss"),
            "same FLOPs/token",
            "1.808 vs 2.060 (DeepSeekMoE 2B)",
        ],
        [
            "val loss vs dense with the same total params (same tokens)",
            moe_arm.get("val_loss"),
            tot.get("val_loss"),
            f"{fmt(tot.get('train_flops_per_token', 0) / max(moe_arm.get('train_flops_per_token', 1), 1))}x the FLOPs",
            "1.808 vs 1.806 (Dense x16)",
        ],
        [
            "val loss vs dense with the same total params at the same training FLOPs",
            moe_arm.get("val_loss"),
            iso.get("val_loss"),
            f"dense trained {fmt(iso.get('steps'))} steps vs {fmt(moe_arm.get('steps'))}",
            "–",
        ],
        [
            "train FLOPs/token vs dense-same-total",
            moe_arm.get("train_flops_per_token"),
            tot.get("train_flops_per_token"),
            "",
            "active 2x FFN vs 16x (DeepSeekMoE)",
        ],
        [
            "MaxVio_global, loss-free vs aux α=1e-3",
            lf.get("maxvio_global"),
            aux.get("maxvio_global"),
            f"{lf.get('label', '')}; {others}; aux α=1e-2: {fmt(aux2.get('maxvio_global'))}; "
            f"none: {fmt(none.get('maxvio_global'))}",
            "0.04 vs 0.72 (Wang et al. 1B)",
        ],
        [
            "val loss, loss-free vs aux α=1e-3",
            lf.get("val_loss"),
            aux.get("val_loss"),
            f"{others_loss}; aux α=1e-2: {fmt(aux2.get('val_loss'))}; none: {fmt(none.get('val_loss'))}",
            "PPL 9.50 vs 9.56",
        ],
    ]
    out.append(
        (
            "5. DeepSeekMoE and auxiliary-loss-free balancing",
            rows,
            "Conventional = dense FFN, and an auxiliary balance loss.",
        )
    )
    return out


def summary_figure(r: dict[str, dict], path: Path) -> Path | None:
    """One panel per design choice: DeepSeek's choice (blue) against the conventional one (gray)."""
    panels = []
    fp8 = r.get("fp8")
    if fp8:
        panels.append(
            (
                "FP8: saved activations",
                ["bf16", "FP8"],
                [1.0, fp8.get("activation_memory_ratio", 0)],
                "relative bytes",
                {1},
            )
        )
    m = r.get("mtp")
    if m:
        panels.append(
            ("MTP: decode", ["greedy", "speculative"], [1.0, m.get("speculative_speedup", 0)], "speed-up", {1})
        )
    a = r.get("attention")
    if a:
        arms = a.get("arms", [])
        panels.append(
            (
                "Attention: KV bytes/token",
                [x["label"] for x in arms],
                [x["kv_bytes_per_token"] for x in arms],
                "bytes (bf16)",
                {0},
            )
        )
    c = r.get("comm")
    if c and c.get("bytes_per_token"):
        b = c["bytes_per_token"]
        keys = [k for k in ("fp32_no_limit", "bf16_no_limit", "bf16_max_1_node", "fp8_max_1_node") if k in b]
        panels.append(
            (
                "EP bytes/token/layer",
                [k.replace("_", " ") for k in keys],
                [b[k] for k in keys],
                "bytes",
                {i for i, k in enumerate(keys) if "max" in k},
            )
        )
    mo = r.get("moe")
    if mo:
        arms = mo.get("arms", [])
        panels.append(
            (
                "MoE vs dense: val loss",
                [x["label"].replace(", ", "\n") for x in arms],
                [x["val_loss"] for x in arms],
                "nats",
                {0},
            )
        )
    bal = r.get("balance")
    if bal:
        arms = bal.get("arms", [])
        panels.append(
            (
                "Balance: MaxVio_global",
                [x["label"].replace(" ", "\n", 1) for x in arms],
                [x["maxvio_global"] for x in arms],
                "MaxVio",
                {i for i, x in enumerate(arms) if x.get("balance") == "loss-free"},
            )
        )
    if not panels:
        return None
    from .common import _plt, _save

    plt = _plt()
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, labels, vals, ylabel, ours) in zip(axes.flat, panels):
        vals = [v or 0 for v in vals]
        ax.bar(range(len(vals)), vals, color=["tab:blue" if i in ours else "tab:gray" for i in range(len(vals))])
        if ylabel == "nats" and vals:  # losses differ in the second decimal: do not start the axis at 0
            lo, hi = min(vals), max(vals)
            ax.set_ylim(lo - 0.5 * (hi - lo + 0.01), hi + 0.5 * (hi - lo + 0.01))
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return _save(fig, path)


def run(opts: BenchOptions, report: Report) -> dict:
    results, missing = collect(opts)
    quick = sorted(k for k, v in results.items() if v.get("quick"))
    now = code_version()
    # saved results of other code (or of unknown code: saved before results recorded it) are listed, not hidden
    older = sorted(k for k, v in results.items() if v.get("code") != now)
    root = Path(opts.out).parent
    report.text(
        "Each row compares DeepSeek's choice with the conventional alternative, measured by the benches of "
        "`nanoseek bench` on this machine (2 CPU cores; see each bench's own report for settings, seeds and "
        "load average). Small-scale reproductions: effects that need billions of parameters or tokens are "
        "not expected to show; the cost effects are exact or directly measured."
        + (f"\n\n**Smoke-run results (--quick, not measurements): {', '.join(quick)}.**" if quick else "")
        + (
            f"\n\n**Collected results of other code than this checkout ({now}): {', '.join(older)}** (their "
            "commit and date are in the Benches table; rerun a bench, or delete its result.json, to refresh it)."
            if older
            else ""
        )
    )
    for title, rows, note in sections(results):
        report.text(f"## {title}\n\n{note}")
        report.table(["metric", "DeepSeek choice (ours)", "conventional (ours)", "effect / note", "paper"], rows)
    fig = summary_figure(results, Path(opts.out) / "summary.png")
    report.text("## Summary figure")
    report.plot(fig, "cost effects")
    report.text("## Plots of the individual benches")
    for name in ORDER:
        for p in results.get(name, {}).get("plots", []):
            if Path(p).exists():
                report.plot(Path(p), f"{name}: {Path(p).stem}")
    status = [
        [
            n,
            "quick" if results[n].get("quick") else "full",
            results[n].get("code", "unknown"),
            str(_get(results[n], "machine", "date", default="–"))[:16],
            results[n].get("seconds"),
            os.path.relpath(results[n].get("report", ""), opts.out) if results[n].get("report") else "–",
        ]
        if n in results
        else [n, "unavailable", "–", "–", None, missing.get(n, "")]
        for n in ORDER
    ]
    report.text("## Benches\n\n" + table(["bench", "run", "code", "date", "seconds", "report / reason"], status))
    goals = [{"bench": n, **g} for n in ORDER for g in results.get(n, {}).get("goals", [])]
    if goals:
        report.text(
            "## Goals across the suite\n\n"
            + table(
                ["bench", "goal", "measured", "target", "status"],
                [
                    [
                        g["bench"],
                        g["goal"],
                        g["value"],
                        g["target"],
                        {True: "met", False: "NOT met", None: "n/a"}[g["met"]],
                    ]
                    for g in goals
                ],
            )
        )
    return {
        "benches": {
            n: {"quick": v.get("quick"), "code": v.get("code"), "result": str(root / n / "result.json")}
            for n, v in results.items()
        },
        "older_code": older,
        "missing": missing,
        "goals": goals,
        "sections": [{"title": t, "rows": rows} for t, rows, _ in sections(results)],
    }
