"""`nanoseek bench NAME`: benchmarks and ablations that reproduce the DeepSeek papers' effects at small scale.

Each bench lives in its own module with `TITLE` and `run(opts, report) -> dict`. It prints its tables,
writes PNG plots and `NAME.md` into `--out` (default `runs/bench/NAME`), saves the result as
`result.json` there, and the command prints that result as ONE JSON object on the last stdout line
(`--json`: that line only; progress goes to stderr). `--quick` is a seconds-long smoke run on tiny configs.

    kv         KV cache per token of MHA / GQA / MQA / MLA at v3, v2-lite, small (V2 Table 1 formulas)
    balance    loss-free balancing vs auxiliary loss (two alphas) vs none: MaxVio and validation loss
    mtp        with vs without multi-token prediction: val loss, MTP acceptance, speculative speed-up
    train      training tokens/s, ours vs transformers' DeepseekV3ForCausalLM, and % of the bf16 GEMM peak
    attention  MLA vs MHA vs GQA at matched parameters: val loss, KV bytes, long-context decode speed
    moe        DeepSeekMoE vs dense (same active / same total parameters): loss vs FLOPs and wall time
    decode     the decode engine's bench (nanoseek.bench_decode)
    fp8        bf16 vs FP8 fine-grained vs FP8 per-tensor training: relative loss error, activation memory
    comm       the communication bench (nanoseek.parallel.bench)
    report     one markdown report over all benches (collects runs/bench/*/result.json, runs what is missing)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from pathlib import Path

from ..cli import set_threads
from ..errors import NanoseekError
from .common import BenchOptions, Report, code_version, dumps, log, machine_info, save_json

# name -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "kv": ("nanoseek.bench.kv", "KV cache per token: MHA / GQA / MQA / MLA (V2 Table 1)"),
    "balance": ("nanoseek.bench.balance", "loss-free balancing vs aux loss vs none: MaxVio, val loss"),
    "mtp": ("nanoseek.bench.mtp", "with vs without MTP: val loss, acceptance rate, speculative speed-up"),
    "train": ("nanoseek.bench.throughput", "training tokens/s vs transformers, fraction of the bf16 GEMM peak"),
    "attention": ("nanoseek.bench.attention", "MLA vs MHA vs GQA at matched params: loss, KV bytes, decode"),
    "moe": ("nanoseek.bench.moe", "DeepSeekMoE vs dense (same active / total params): loss vs FLOPs, time"),
    "decode": ("nanoseek.bench.decode", "decode engine: ours vs transformers, speculative decoding"),
    "fp8": ("nanoseek.bench.fp8", "bf16 vs FP8 block-wise vs FP8 tensor-wise: loss error, activation memory"),
    "comm": ("nanoseek.bench.comm", "communication: all-to-all / all-reduce volumes and times"),
    "report": ("nanoseek.bench.report", "one markdown report over all benches"),
}


MODEL_BENCHES = ("decode",)  # the benches that take `--model DIR` (the others train their own arms)
TRAINING = frozenset({"seeds", "steps", "data", "reuse"})
# the options each bench reads; any other one given is refused rather than silently ignored
OPTIONS: dict[str, frozenset[str]] = {
    "kv": frozenset(),
    "balance": TRAINING,
    "mtp": TRAINING,
    "train": frozenset({"data"}),
    "attention": TRAINING,
    "moe": TRAINING,
    "decode": frozenset({"model"}),
    "fp8": TRAINING,
    "comm": frozenset(),
    "report": TRAINING,
}


def bench_module(name: str):
    if name not in BENCHES:
        raise NanoseekError(f"unknown bench {name!r}; choose one of: {', '.join(BENCHES)}")
    return importlib.import_module(BENCHES[name][0])


def run(name: str, opts: BenchOptions | None = None, **kw) -> dict:
    """Run bench `name` (options as keywords or a BenchOptions); returns its JSON result (also saved as
    OUT/result.json, with the markdown report OUT/NAME.md next to it)."""
    opts = opts or BenchOptions(**kw)
    opts.name = name
    mod = bench_module(name)
    check_options(name, opts)
    import torch

    threads = torch.get_num_threads()
    set_threads(opts.threads)  # before anything is written
    try:
        opts.out = Path(opts.out) if opts.out is not None else Path("runs/bench") / name
        writable_dir(opts.out)
        machine = machine_info()
        report = Report(name, mod.TITLE, opts)
        t0 = time.perf_counter()
        result = mod.run(opts, report)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)  # the trainer sets it too; leave the process as we found it
    path = report.write(machine, seconds)
    result = {
        "bench": name,
        "quick": opts.quick,
        "code": code_version(),
        **result,
        "seconds": round(seconds, 1),
        "machine": {**machine, "loadavg_end": machine_info()["loadavg"]},
        "report": str(path),
        "plots": report.plots,
    }
    save_json(opts.out / "result.json", result)
    log(f"{name}: report {path}")
    return result


def check_options(name: str, opts: BenchOptions) -> None:
    """Refuse options the bench does not read (a `--steps` given to kv would be ignored without a word) and
    bad values, before anything is written."""
    given = {k for k in ("seeds", "steps", "data", "model") if getattr(opts, k) is not None}
    given |= {"reuse"} if opts.reuse else set()
    extra = sorted(given - OPTIONS.get(name, frozenset()))
    if extra:
        flags = ", ".join(f"--{k}" for k in extra)
        takers = [b for b, o in OPTIONS.items() if extra[0] in o]
        raise NanoseekError(f"the {name} bench does not use {flags} (--{extra[0]} applies to: {', '.join(takers)})")
    for k in ("seeds", "steps"):
        if getattr(opts, k) is not None and getattr(opts, k) < 1:
            raise NanoseekError(f"--{k} must be >= 1, got {getattr(opts, k)}")


def writable_dir(out: Path) -> None:
    """Create `out` and check a file can be written there, so a bad --out fails in one line before the bench
    runs (not with a traceback from the first plot, minutes later)."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise NanoseekError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise NanoseekError(f"cannot write --out {out}: {e.strerror or e}") from None


def _cli(args) -> None:
    if args.name == "list":
        if args.json:
            print(json.dumps({k: h for k, (_, h) in BENCHES.items()}))
            return
        for k, (_, h) in BENCHES.items():
            print(f"{k:10s} {h}")
        return
    opts = BenchOptions(
        quick=args.quick,
        out=Path(args.out) if args.out else Path("runs/bench") / args.name,
        seeds=args.seeds,
        steps=args.steps,
        data=args.data,
        threads=args.threads,
        reuse=args.reuse,
        model=args.model,
        argv=sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "bench" else [args.name],
    )
    # with --json, everything but the final JSON line goes to stderr
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with redirect:
        result = run(args.name, opts)
    print(dumps(result), flush=True)


def add_cli(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks and paper ablations (kv, balance, mtp, train, attention, moe, decode, fp8, comm, report)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=[*BENCHES, "list"], metavar="NAME", help=", ".join([*BENCHES, "list"]))
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run on tiny configs (for tests)")
    p.add_argument("--json", action="store_true", help="print only the result JSON on stdout")
    p.add_argument("--out", default=None, help="output directory (default runs/bench/NAME)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the bench's own)")
    p.add_argument("--steps", type=int, default=None, help="training steps per arm (default: the bench's own)")
    p.add_argument("--data", default=None, help="training corpus for the training benches (default: the stdlib)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse arms already trained with identical settings under OUT/runs (re-render a report)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="decode: the model directory to measure (run, checkpoint or HF dir; default: train or reuse tiny)",
    )
    p.set_defaults(func=_cli)
