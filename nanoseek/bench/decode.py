"""`nanoseek bench decode`: delegates to the decode engine's bench, `nanoseek.bench_decode.run(quick, out_dir, model)`
(ours vs transformers decode tokens/s, speculative decoding with the MTP head)."""

from __future__ import annotations

from .common import BenchOptions, Report
from .delegate import render

TITLE = "Decoding: ours vs transformers, speculative decoding"


def run(opts: BenchOptions, report: Report) -> dict:
    from .. import bench_decode as mod

    result = dict(mod.run(quick=opts.quick, out_dir=opts.out, model=opts.model))
    render(result, report, opts.out)
    return result
