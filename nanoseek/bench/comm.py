"""`nanoseek bench comm`: delegates to `nanoseek.parallel.bench.run_comm_bench(quick)` (expert-parallel
dispatch/combine bytes per token with and without node-limited routing and FP8 dispatch, computation /
communication overlap, pipeline bubbles of 1F1B vs DualPipeV measured against the simulator)."""

from __future__ import annotations

from .common import BenchOptions, Report
from .delegate import render

TITLE = "Communication: expert-parallel traffic, overlap, pipeline bubbles"


def run(opts: BenchOptions, report: Report) -> dict:
    from ..parallel import bench as mod

    result = dict(mod.run_comm_bench(quick=opts.quick))
    render(result, report, opts.out)
    return result
