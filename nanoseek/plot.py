"""`nanoseek plot DIR`: PNGs of a run's loss curves, MaxVio and per-layer expert load."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import NanoseekError


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(per-step records, evaluation records) of a run's metrics.jsonl."""
    f = Path(run) / "metrics.jsonl"
    if not f.exists():
        raise NanoseekError(f"{run}: no metrics.jsonl (not a training run directory)")
    steps, evals = [], []
    lines = f.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            if i == len(lines):  # a line being written by a live run, or cut short by a kill (resume drops it)
                continue
            raise NanoseekError(f"{f}:{i}: not valid JSON") from None
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            continue  # not a record of ours (as `--resume` reads the file)
        (evals if "val_loss" in r else steps).append(r)
    return steps, evals


def plot_run(run: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    steps, evals = read_metrics(run)
    if not steps:
        raise NanoseekError(f"{run}: metrics.jsonl has no training steps yet")
    out: list[Path] = []
    ok = [r for r in steps if r.get("loss") is not None]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in ok], [r["loss"] for r in ok], label="train loss", lw=1)
    mtp = [r for r in ok if r.get("mtp_loss")]
    if mtp:
        ax.plot([r["step"] for r in mtp], [r["mtp_loss"] for r in mtp], label="MTP loss (depth mean)", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.set_title(f"{run.name}: loss")
    out.append(_save(fig, run / "loss.png"))

    vio = [r for r in ok if r.get("maxvio_batch") is not None]
    if vio:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in vio], [r["maxvio_batch"] for r in vio], label="MaxVio_batch (layer mean)", lw=1)
        ge = [r for r in evals if r.get("maxvio_global") is not None]
        if ge:
            ax.plot([r["step"] for r in ge], [r["maxvio_global"] for r in ge], "o-", label="MaxVio_global (validation)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio")
        ax.legend()
        ax.set_title(f"{run.name}: load imbalance")
        out.append(_save(fig, run / "maxvio.png"))

    load = next((r["val_expert_load"] for r in reversed(evals) if r.get("val_expert_load")), None)
    load = load or next((r["expert_load"] for r in reversed(ok) if r.get("expert_load")), None)
    if load:
        import numpy as np

        a = np.array(load, dtype=float)
        a = a / a.mean(axis=1, keepdims=True)  # 1.0 = the mean load
        fig, ax = plt.subplots(figsize=(max(6, a.shape[1] / 6), 1 + 0.5 * a.shape[0]))
        im = ax.imshow(a, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=ax, label="load / mean load")
        ax.set_title(f"{run.name}: expert load (last evaluation)")
        out.append(_save(fig, run / "expert_load.png"))
    return out


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:  # a read-only run directory, a full disk
        raise NanoseekError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path


def _cli(args) -> None:
    for p in plot_run(args.run):
        print(p)


def add_cli(sub) -> None:
    p = sub.add_parser("plot", help="render a run's loss, MaxVio and expert-load plots as PNGs")
    p.add_argument("run", help="a training run directory (--out of nanoseek train)")
    p.set_defaults(func=_cli)
