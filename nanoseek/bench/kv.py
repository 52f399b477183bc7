"""`nanoseek bench kv`: KV cache per token of MHA, GQA, MQA and MLA (DeepSeek-V2 Table 1).

Elements per token per layer: MHA 2·n_h·d_h, GQA 2·n_g·d_h, MQA 2·d_h, MLA d_c + d_h^R; times the layers
for the total, times 2 bytes for bf16. d_h is the per-head (non-RoPE) dimension of the preset. Each formula
is cross-checked against what our attention modules actually allocate per token (`cache_spec()`, the
absorbed MLA path for MLA), built on the meta device so the v3 sizes cost nothing.
"""

from __future__ import annotations

import math

import torch

from ..config import get_preset
from ..model.attention import build_attention
from .common import BenchOptions, Report, goal, plot_bars

TITLE = "KV cache per token: MHA vs GQA vs MQA vs MLA"
PRESETS = ("v3", "v2-lite", "small")
# DeepSeek-V2 Table 9 (KV elements per token, whole model) for the paper column of the report
PAPER = {
    "V2 small (~16B), MHA → MLA": "110.6K → 15.6K elements (14%)",
    "V2 large (~250B), MHA → MLA": "860.2K → 34.6K elements (4%)",
    "V3 MLA per layer": "d_c + d_h^R = 512 + 64 = 576 elements",
    "MLA ≈ GQA with": "2.25 groups (d_c = 4·d_h, d_h^R = d_h/2)",
}


def gqa_groups(n_heads: int) -> int:
    """8 groups (the V2 Table 8 baseline), or half the heads when a preset has fewer than 16 heads."""
    return 8 if n_heads >= 16 else max(1, n_heads // 2)


def formula_rows(preset: str) -> list[dict]:
    cfg = get_preset(preset)
    n_h, d_h, L = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.num_hidden_layers
    d_c, d_r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    n_g = gqa_groups(n_h)
    variants = [
        ("MHA", n_h, "2·n_h·d_h", 2 * n_h * d_h, dict(attn_type="mha", head_dim=d_h)),
        (f"GQA-{n_g}", n_g, "2·n_g·d_h", 2 * n_g * d_h, dict(attn_type="gqa", num_key_value_heads=n_g, head_dim=d_h)),
        ("MQA", 1, "2·d_h", 2 * d_h, dict(attn_type="gqa", num_key_value_heads=1, head_dim=d_h)),
        ("MLA", None, "d_c + d_h^R", d_c + d_r, dict(attn_type="mla", attn_impl="absorb")),
    ]
    mha = 2 * n_h * d_h
    rows = []
    for label, groups, formula, per_layer, overrides in variants:
        with torch.device("meta"):
            attn = build_attention(get_preset(preset, **overrides))
        allocated = sum(math.prod(s) for s in attn.cache_spec().values())
        rows.append(
            {
                "preset": preset,
                "attention": label,
                "n_heads": n_h,
                "kv_groups": groups,
                "head_dim": d_h,
                "kv_lora_rank": d_c if label == "MLA" else None,
                "rope_head_dim": d_r if label == "MLA" else None,
                "layers": L,
                "formula": formula,
                "elements_per_token_per_layer": per_layer,
                "elements_per_token": per_layer * L,
                "bf16_bytes_per_token_per_layer": 2 * per_layer,
                "bf16_bytes_per_token": 2 * per_layer * L,
                "ratio_vs_mha": per_layer / mha,
                "equivalent_gqa_groups": per_layer / (2 * d_h),
                "model_cache_elements_per_token_per_layer": allocated,
                "model_matches_formula": allocated == per_layer,
            }
        )
    return rows


def run(opts: BenchOptions, report: Report) -> dict:
    rows = [r for p in PRESETS for r in formula_rows(p)]
    report.text(
        "Elements of KV cache per token, following DeepSeek-V2 Table 1: MHA 2·n_h·d_h·l, GQA 2·n_g·d_h·l, "
        "MQA 2·d_h·l, MLA (d_c + d_h^R)·l. Bytes assume bf16 (2 bytes per element). The last column is what "
        "our attention modules allocate per token per layer (`cache_spec()`; MLA on the absorbed path), "
        "which must equal the formula."
    )
    report.table(
        [
            "preset",
            "attention",
            "formula",
            "elem/token/layer",
            "elem/token",
            "bf16 B/token/layer",
            "bf16 KiB/token",
            "vs MHA",
            "≈ GQA groups",
            "model allocates",
        ],
        [
            [
                r["preset"],
                r["attention"],
                r["formula"],
                r["elements_per_token_per_layer"],
                r["elements_per_token"],
                r["bf16_bytes_per_token_per_layer"],
                r["bf16_bytes_per_token"] / 1024,
                r["ratio_vs_mha"],
                r["equivalent_gqa_groups"],
                r["model_cache_elements_per_token_per_layer"],
            ]
            for r in rows
        ],
        title="KV cache per token",
    )
    report.table(["paper (DeepSeek-V2/V3)", "figure"], list(PAPER.items()), title="Paper figures")
    v3 = {r["attention"]: r for r in rows if r["preset"] == "v3"}
    lite = {r["attention"]: r for r in rows if r["preset"] == "v2-lite"}
    goals = [
        goal(
            "V3 MLA elements/token/layer = 576",
            v3["MLA"]["elements_per_token_per_layer"],
            "576",
            v3["MLA"]["elements_per_token_per_layer"] == 576,
        ),
        goal(
            "V3 MHA elements/token/layer = 32768",
            v3["MHA"]["elements_per_token_per_layer"],
            "32768",
            v3["MHA"]["elements_per_token_per_layer"] == 32768,
        ),
        goal(
            "v2-lite MHA elements/token (V2 Table 9 small: 110.6K)",
            lite["MHA"]["elements_per_token"],
            "110.6K ±0.1K",
            abs(lite["MHA"]["elements_per_token"] - 110_600) <= 100,
        ),
        goal(
            "v2-lite MLA elements/token (V2 Table 9 small: 15.6K)",
            lite["MLA"]["elements_per_token"],
            "15.6K ±0.1K",
            abs(lite["MLA"]["elements_per_token"] - 15_600) <= 100,
        ),
        goal(
            "model caches match the formulas",
            sum(r["model_matches_formula"] for r in rows),
            f"{len(rows)}",
            all(r["model_matches_formula"] for r in rows),
        ),
    ]
    report.goals(goals)
    labels = ["MHA", "GQA", "MQA", "MLA"]
    bars = {
        lab: [
            next(r for r in rows if r["preset"] == p and r["attention"].startswith(lab))["bf16_bytes_per_token"] / 1024
            for p in PRESETS
        ]
        for lab in labels
    }
    report.plot(
        plot_bars(
            opts.out / "kv_bytes.png",
            list(PRESETS),
            bars,
            "KiB per token (bf16, all layers)",
            "KV cache per token",
            logy=True,
        ),
        "KV cache per token",
    )
    return {"rows": rows, "goals": goals}
