"""Shared helpers of the bench suite: options, machine facts, timing, GEMM peak, training arms, tables,
markdown reports and plots.

Every comparison a bench makes is measured inside one process run, back to back or interleaved, because
other jobs share the machine and absolute speeds drift; reports therefore lead with ratios and record the
load average at the start and end of each bench.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NanoseekError

# A model small enough that every --quick training arm takes well under a second per step.
MICRO = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "moe_intermediate_size": 32,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "init_std": 0.02,
}


@dataclass
class BenchOptions:
    """What `nanoseek bench NAME` was asked for. `seeds`/`steps` of None mean the bench's own defaults."""

    name: str = ""
    quick: bool = False
    out: Path | None = None  # default runs/bench/NAME
    seeds: int | None = None
    steps: int | None = None
    data: str | None = None
    threads: int | None = None
    reuse: bool = False  # reuse arms already trained with identical settings in OUT/runs (re-render reports)
    model: str | None = None  # a trained model directory, for the benches that measure one (MODEL_BENCHES)
    argv: list[str] = field(default_factory=list)  # the command line, for the report

    def n_seeds(self, full: int, quick: int = 1) -> int:
        n = self.seeds if self.seeds is not None else (quick if self.quick else full)
        if n < 1:
            raise NanoseekError(f"--seeds must be >= 1, got {n}")
        return n

    def n_steps(self, full: int, quick: int) -> int:
        n = self.steps if self.steps is not None else (quick if self.quick else full)
        if n < 1:
            raise NanoseekError(f"--steps must be >= 1, got {n}")
        return n

    def eval_every(self, steps: int, evals: int) -> int:
        """Evaluate `evals` times over a full run; only at the end of a quick one."""
        return steps if self.quick else max(1, steps // evals)

    def command(self) -> str:
        return "nanoseek bench " + " ".join(self.argv) if self.argv else f"nanoseek bench {self.name}"


# --- machine -------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2")))


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def code_version() -> str:
    """The git commit of the nanoseek checkout that runs (+"-dirty" with uncommitted changes), else the package
    version: saved with every result, so that `bench report` can tell results of older code from current ones."""
    from .. import __version__

    repo = Path(__file__).resolve().parents[2]
    try:
        run = dict(cwd=repo, capture_output=True, text=True, timeout=10, check=True)
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], **run).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "nanoseek"], **run).stdout
        new = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "nanoseek"], **run).stdout
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not (diff or new):
        return head
    # two different uncommitted states must not look alike: the diff (and new files' contents) hashed
    h = hashlib.sha256(diff.encode("utf-8", "surrogateescape"))
    for f in new.split():
        with contextlib.suppress(OSError):
            h.update(f.encode() + (repo / f).read_bytes())
    return f"{head}-dirty-{h.hexdigest()[:8]}"


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "flags": cpu_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg": load_average(),
    }


# --- timing --------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for the deviation of a single value, None for no values)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return float(statistics.fmean(xs)), float(statistics.stdev(xs)) if len(xs) > 1 else None


def gemm_gflops(n: int = 2048, dtype: torch.dtype = torch.bfloat16, reps: int = 5) -> float:
    """Median GFLOP/s of an n x n x n matmul (the machine's practical GEMM peak in that dtype)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up: thread pool, kernel selection
    times = [timed(lambda: a @ b) for _ in range(reps)]
    return 2 * n**3 / median(times) / 1e9


# --- training arms -------------------------------------------------------------------------------------------
@dataclass
class Arm:
    name: str
    seed: int
    summary: dict
    steps: list[dict]
    evals: list[dict]
    trainer: object | None = None  # the live Trainer (model included) when kept


ARM_FILE = "bench_arm.json"  # written next to a finished arm's metrics: its settings and summary (for --reuse)


def _comparable(settings: dict) -> dict:
    """Training settings that determine an arm's result (threads, progress display and the directory do not)."""
    return {k: v for k, v in settings.items() if k not in ("threads", "progress", "resume", "out")}


def _finished_run(run: Path, record: dict) -> dict | None:
    """The summary of a finished arm in `run` trained with exactly these settings, else None."""
    try:
        saved = json.loads((run / ARM_FILE).read_text())
    except (OSError, ValueError):
        return None
    # an option added since the arm was trained counts as its default (defaults keep the old behaviour)
    from ..train_config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    if "train_config" in saved:
        saved["train_config"] = _comparable({**json.loads(json.dumps(defaults)), **saved["train_config"]})
    if {k: saved.get(k) for k in record} != json.loads(json.dumps(record)):
        return None
    return saved.get("summary")


def train_arm(
    opts: BenchOptions, name: str, seed: int, keep: bool = False, shuffle_rows: int | None = None, **settings
) -> Arm:
    """Train one arm with `nanoseek.train` into OUT/runs/NAME-sSEED; returns its summary and metrics.

    Checkpoints are written once, at the end. `keep=True` returns the live trainer (its model) too.
    `shuffle_rows` is the trainer's `--shuffle-rows` (batches drawn from shuffled windows of that many rows);
    the default is the trainer's (~8M-token windows) for full runs and 8 rows for --quick ones.
    """
    if shuffle_rows is None and opts.quick:
        shuffle_rows = 8
    from ..plot import read_metrics
    from ..train import Trainer
    from ..train_config import TrainConfig

    steps = settings.pop("steps")
    run = Path(opts.out) / "runs" / f"{name}-s{seed}"
    base = dict(
        steps=steps,
        seed=seed,
        out=str(run),
        data=opts.data,
        progress=False,
        save_every=steps,
        keep_last=1,
        threads=opts.threads,
        shuffle_rows=shuffle_rows,
    )
    tc = TrainConfig(**{**base, **settings})
    record = {"train_config": _comparable(tc.to_dict())}
    summary = _finished_run(run, record) if opts.reuse else None
    if summary is not None:
        log(f"  {name} seed {seed}: reusing the finished run in {run}")
        trainer = Trainer(dataclasses.replace(tc, resume="latest")) if keep else None
    else:
        (run / ARM_FILE).unlink(missing_ok=True)  # a stale record must not vouch for the run that replaces it
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the trainer refuses to mix runs in one directory
        trainer = Trainer(tc)
        t0 = time.perf_counter()
        summary = trainer.fit()
        summary["wall_seconds"] = time.perf_counter() - t0
        (run / ARM_FILE).write_text(json.dumps({**record, "summary": summary}, indent=1) + "\n")
    steps_rec, evals = read_metrics(run)
    log(
        f"  {name} seed {seed}: val loss {summary['val_loss']:.4f}"
        + (f", MaxVio_global {summary['maxvio_global']:.3f}" if summary.get("maxvio_global") is not None else "")
        + f", {summary['tokens_per_s']:.0f} tok/s, {summary['seconds']:.0f}s"
    )
    return Arm(name, seed, summary, steps_rec, evals, trainer if keep else None)


def log(msg: str) -> None:
    """Progress lines go to stderr so stdout stays tables + the final JSON line."""
    print(msg, file=sys.stderr, flush=True)


def smooth_tail(values: Sequence[float], frac: float = 0.1) -> float:
    """Mean of the last `frac` of a curve (at least one point): the V3 report's smoothed final loss."""
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan")
    n = max(1, round(len(vals) * frac))
    return float(statistics.fmean(vals[-n:]))


def ema(values: Sequence[float], decay: float = 0.9) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else decay * m + (1 - decay) * v
        out.append(m)
    return out


# --- tables and reports --------------------------------------------------------------------------------------
def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 10 ** -(digits - 1)):
            return f"{v:.{max(digits - 2, 1)}e}"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def table(headers: Sequence[str], rows: Iterable[Sequence], digits: int = 4) -> str:
    """A GitHub markdown table (also readable as plain text on a terminal)."""
    cells = [[fmt(c, digits).replace("|", "\\|") for c in r] for r in rows]  # a "|" in a cell splits it
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def goal(text: str, value: float | None, target: str, met: bool | None) -> dict:
    return {"goal": text, "value": value, "target": target, "met": met}


def goals_table(goals: Sequence[dict]) -> str:
    met = {True: "met", False: "NOT met", None: "n/a"}
    return table(
        ["goal", "measured", "target", "status"], [[g["goal"], g["value"], g["target"], met[g["met"]]] for g in goals]
    )


@dataclass
class Report:
    """The markdown report of one bench: title, settings, then sections of text, tables and plots."""

    name: str
    title: str
    opts: BenchOptions
    parts: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)

    def text(self, s: str) -> None:
        self.parts.append(s.strip() + "\n")

    def table(self, headers, rows, title: str | None = None, echo: bool = True, digits: int = 4) -> str:
        t = table(headers, rows, digits)
        if title:
            self.parts.append(f"**{title}**\n")
        self.parts.append(t + "\n")
        if echo:
            print((f"\n{title}\n" if title else "\n") + t, flush=True)
        return t

    def goals(self, goals: Sequence[dict]) -> None:
        """The "Goals" section (`goal(...)` rows), also printed."""
        t = goals_table(goals)
        self.parts.append("## Goals\n\n" + t + "\n")
        print("\n" + t, flush=True)

    def plot(self, path: Path | None, caption: str = "") -> None:
        if path is None:
            return
        rel = os.path.relpath(path, self.opts.out)
        self.plots.append(str(path))
        self.parts.append(f"![{caption or Path(path).stem}]({rel})\n")

    def write(self, machine: dict, seconds: float) -> Path:
        head = [
            f"# {self.title}\n",
            f"- command: `{self.opts.command()}`"
            + (" (quick smoke run: tiny configs, not a measurement)" if self.opts.quick else ""),
            f"- machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['threads']}, "
            f"torch {machine['torch']}, {machine['date']}",
            f"- load average (1/5/15 min) at start: {machine['loadavg']}, at end: {load_average()}",
            f"- wall time: {seconds:.0f} s"
            + (
                " (--reuse: arms already trained with identical settings were reused, not re-trained)"
                if self.opts.reuse
                else ""
            )
            + "\n",
        ]
        path = Path(self.opts.out) / f"{self.name}.md"
        path.write_text("\n".join(head) + "\n" + "\n".join(self.parts))
        return path


# --- plots ---------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(
    path: Path,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    logx: bool = False,
    hlines: Sequence[tuple[float, str]] = (),
    markers: bool = False,
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, xs, ys in series:
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and x is not None]
        if pts:
            ax.plot(*zip(*pts), "o-" if markers else "-", label=label, lw=1.2, ms=3)
    for y, label in hlines:
        ax.axhline(y, ls="--", lw=0.8, color="gray")
        ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, color="gray", va="bottom")
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(
    path: Path,
    groups: Sequence[str],
    bars: dict[str, Sequence[float]],
    ylabel: str,
    title: str,
    logy: bool = False,
) -> Path:
    """Grouped bars: `bars[label][i]` is the value of that label in group `groups[i]`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) * max(1, len(bars)) / 2), 4.2))
    width = 0.8 / max(1, len(bars))
    for j, (label, vals) in enumerate(bars.items()):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if len(bars) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- results -------------------------------------------------------------------------------------------------
def save_json(path: Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj: dict) -> str:
    return json.dumps(obj, default=_json_default)


# --- training-bench settings ---------------------------------------------------------------------------------
def overrides(d: dict) -> list[str]:
    """ModelConfig fields as `--override KEY=VALUE` strings (the form TrainConfig takes)."""
    out = []
    for k, v in d.items():
        out.append(f"{k}={json.dumps(v) if isinstance(v, bool) else v}")
    return out


def base_settings(opts: BenchOptions, model: dict | None = None, **full) -> dict:
    """TrainConfig fields shared by the training benches: `tiny` at B=8, T=256, bf16 for full runs (kwargs
    override), the MICRO model at B=2, T=32 with a few hundred validation tokens for --quick."""
    model = dict(model or {})
    if opts.quick:
        model = {**MICRO, **model}
        s = dict(preset="tiny", batch_size=2, seq_len=32, eval_tokens=4 * 33, precision="bf16")
        s.update({k: v for k, v in full.items() if k not in ("batch_size", "seq_len", "eval_tokens")})
    else:
        s = dict(preset="tiny", batch_size=8, seq_len=256, eval_tokens=65536, precision="bf16")
        s.update(full)
    s["override"] = overrides(model)
    return s
