"""`nanoseek bench decode`: delegates to the decode engine's bench, `nanoseek.bench_decode.run(quick, out_dir, model)`
(ours vs transformers decode tokens/s, speculative decoding with the MTP head)."""

from __future__ import annotations

from .common import BenchOptions, Report, plot_bars
from .delegate import render

TITLE = "Decoding: ours vs transformers, speculative decoding"


def run(opts: BenchOptions, report: Report) -> dict:
    from .. import bench_decode as mod

    before = set(opts.out.iterdir())  # files already in --out are not this run's
    result = dict(mod.run(quick=opts.quick, out_dir=opts.out, model=opts.model))
    plots(result, opts.out)
    render(result, report, opts.out, before)
    return result


def plots(result: dict, out) -> None:
    """Decode tokens/s of every arm at batch 1 and 8 (speculative arms: batch 1 only)."""
    tps = result.get("tokens_per_s") or {}
    arms = list(dict.fromkeys(k.rsplit("_b", 1)[0] for k in tps))
    if arms:
        bars = {f"batch {b}": [tps.get(f"{a}_b{b}") for a in arms] for b in (1, 8)}
        labels = [a.replace("_speculative_", "\nspec. ").replace("_", " ") for a in arms]
        title = "Decoding tokens/s (wall time, prefill included)"
        plot_bars(out / "decode_tokens_per_s.png", labels, bars, "tokens/s", title)
