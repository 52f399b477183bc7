"""`nanoseek bench comm`: delegates to `nanoseek.parallel.bench.run_comm_bench(quick)` (expert-parallel
dispatch/combine bytes per token with and without node-limited routing and FP8 dispatch, computation /
communication overlap, pipeline bubbles of 1F1B vs DualPipeV measured against the simulator)."""

from __future__ import annotations

from .common import BenchOptions, Report, plot_bars
from .delegate import render

TITLE = "Communication: expert-parallel traffic, overlap, pipeline bubbles"


def run(opts: BenchOptions, report: Report) -> dict:
    from ..parallel import bench as mod

    before = set(opts.out.iterdir())  # files already in --out are not this run's
    result = dict(mod.run_comm_bench(quick=opts.quick))
    plots(result, opts.out)
    render(result, report, opts.out, before)
    return result


def plots(result: dict, out) -> None:
    """Bytes per token by dispatch format and node limit; pipeline bubbles measured vs simulated."""
    bpt = result.get("bytes_per_token") or {}
    limits = [k.split("_", 1)[1] for k in bpt if k.startswith("bf16_")]
    if limits:
        bars = {f: [bpt.get(f"{f}_{lim}") for lim in limits] for f in ("bf16", "fp8") if f"{f}_{limits[0]}" in bpt}
        plot_bars(out / "comm_bytes_per_token.png", [lim.replace("_", " ") for lim in limits], bars,
                  "all-to-all bytes per token", "Expert-parallel traffic: node limit and FP8 dispatch")  # fmt: skip
    bubble = result.get("bubble") or {}
    if bubble:
        names = list(bubble)
        bars = {k: [bubble[n].get(f"{k}_s") for n in names] for k in ("measured", "simulated")}
        title = "Pipeline bubbles: measured vs simulated"
        plot_bars(out / "comm_bubbles.png", names, bars, "pipeline bubble (s)", title)
