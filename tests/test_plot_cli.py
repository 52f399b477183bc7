"""`nanoseek plot` and the CLI plumbing around it: the PNGs of a run and the data each one draws; the parser's
subcommands, `--threads`, and the bench runner leaving torch's thread count as it found it."""

import json

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere
import matplotlib.axes
import matplotlib.figure
import numpy as np
import pytest
import torch

import nanoseek.plot
from nanoseek import NanoseekError
from nanoseek.cli import build_parser, main, set_threads


@pytest.fixture
def keep_threads():
    """Tests that change torch's thread count give it back."""
    n = torch.get_num_threads()
    yield n
    torch.set_num_threads(n)


def other_than(n: int) -> int:
    return 3 if n != 3 else 2


# --- CLI plumbing ---------------------------------------------------------------------------------------------
def test_set_threads_sets_torchs_intra_op_threads(keep_threads):
    n = other_than(keep_threads)
    set_threads(n)
    assert torch.get_num_threads() == n
    set_threads(None)  # unset: torch's choice stays
    assert torch.get_num_threads() == n
    with pytest.raises(NanoseekError, match="--threads must be >= 1, got 0"):
        set_threads(0)


def test_parser_routes_plot_to_its_handler():
    args = build_parser().parse_args(["plot", "some/run"])
    assert args.command == "plot" and args.run == "some/run" and args.func is nanoseek.plot._cli


def test_info_rejects_a_zero_context(capsys):
    assert main(["info", "--seq-len", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --seq-len must be >= 1, got 0"]


def test_bench_restores_the_thread_count(tmp_path, keep_threads):
    """A bench run with --threads 1 inside a longer process (tests, notebooks) leaves torch as it found it."""
    from nanoseek.bench import BenchOptions, run

    torch.set_num_threads(3)
    run("kv", BenchOptions(out=tmp_path, threads=1))
    assert torch.get_num_threads() == 3


# --- plot_run -------------------------------------------------------------------------------------------------
def write_run(run, evals_load=((1, 3), (4, 4))):
    run.mkdir()
    recs = [
        dict(step=1, loss=5.0, mtp_loss=5.5, maxvio_batch=0.9, expert_load=[[9, 1], [1, 9]]),
        dict(step=2, loss=4.0, mtp_loss=None, maxvio_batch=0.5, expert_load=[[9, 1], [1, 9]]),
        dict(step=3, loss=3.0, mtp_loss=3.5, maxvio_batch=0.25),
        dict(step=2, val_loss=4.2, maxvio_global=0.7, val_expert_load=[[5, 5], [5, 5]]),
        dict(step=4, loss=None),  # a skipped (non-finite) step: not drawn
        dict(step=4, val_loss=3.1, maxvio_global=0.3, val_expert_load=[list(r) for r in evals_load]),
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    return run


def test_plot_run_writes_the_pngs(tmp_path, capsys):
    run = write_run(tmp_path / "r")
    assert main(["plot", str(run)]) == 0
    names = ["loss.png", "maxvio.png", "expert_load.png"]
    assert capsys.readouterr().out.split() == [str(run / n) for n in names]
    for n in names:
        assert (run / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_run_draws_the_right_series(tmp_path, monkeypatch):
    """Each line is the metric its label says: MTP loss from the steps' mtp_loss (skipping steps without one),
    validation loss and MaxVio_global from the evaluation records; the heat map is the last evaluation's
    per-layer expert loads over each layer's own mean load (rows 1,3 and 4,4: 0.5,1.5 and 1,1)."""
    lines, images = {}, []
    plot, imshow = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.imshow

    def rec_plot(self, x, y, *a, label=None, **kw):
        lines[label] = (list(x), list(y))
        return plot(self, x, y, *a, label=label, **kw)

    def rec_imshow(self, a, *args, **kw):
        images.append(np.array(a))
        return imshow(self, a, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", rec_plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", rec_imshow)
    nanoseek.plot.plot_run(write_run(tmp_path / "r"))
    assert lines == {
        "train loss": ([1, 2, 3], [5.0, 4.0, 3.0]),
        "MTP loss (depth mean)": ([1, 3], [5.5, 3.5]),
        "validation loss": ([2, 4], [4.2, 3.1]),
        "MaxVio_batch (layer mean)": ([1, 2, 3], [0.9, 0.5, 0.25]),
        "MaxVio_global (validation)": ([2, 4], [0.7, 0.3]),
    }
    assert len(images) == 1 and np.allclose(images[0], [[0.5, 1.5], [1.0, 1.0]])


def test_plot_run_errors(tmp_path):
    with pytest.raises(NanoseekError, match=r"no metrics\.jsonl"):
        nanoseek.plot.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(step=1, val_loss=3.0)) + "\n")
    with pytest.raises(NanoseekError, match="has no training steps yet"):
        nanoseek.plot.plot_run(tmp_path)


def test_plot_reads_a_live_or_killed_run_and_reports_write_errors(tmp_path, monkeypatch):
    """A last line cut short (a run being written, or killed mid-write) and records that are not ours are
    skipped, as `--resume` skips them; a bad line before the end is still an error; a PNG that cannot be written
    is one error line."""
    run = write_run(tmp_path / "r")
    good = (run / "metrics.jsonl").read_text().rstrip("\n")
    (run / "metrics.jsonl").write_text(good + '\n[1, 2]\n{"note": "x"}\n{"step": 5, "loss": 2.')
    steps, evals = nanoseek.plot.read_metrics(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.\n' + good + "\n")
    with pytest.raises(NanoseekError, match=r"metrics\.jsonl:1: not valid JSON"):
        nanoseek.plot.read_metrics(run)
    (run / "metrics.jsonl").write_text(good + "\n")

    def no_space(self, path, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    with pytest.raises(NanoseekError, match=r"cannot write .*loss\.png: No space left on device"):
        nanoseek.plot.plot_run(run)


def test_errors_off_rank_0_are_printed_once_the_ranks_have_connected(monkeypatch, capsys):
    """Under torchrun every rank validates the same flags: only rank 0 prints such an error. Once the ranks have
    joined, an error may be one rank's own (a file it cannot read): then it is printed, naming the rank."""
    import nanoseek.parallel.launch as launch

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(launch, "RANKS_CONNECTED", False)
    assert main(["info", "--seq-len", "0"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(launch, "RANKS_CONNECTED", True)
    assert main(["info", "--seq-len", "0"]) == 2
    assert capsys.readouterr().err == "error: [rank 1] --seq-len must be >= 1, got 0\n"

    def echo(args):
        raise NanoseekError("rank 0 could not write the checkpoint x", echo=True)

    monkeypatch.setattr(nanoseek.plot, "plot_run", echo)
    assert main(["plot", "x"]) == 2 and capsys.readouterr().err == ""  # rank 0 reports the cause itself
    monkeypatch.setenv("RANK", "0")
    assert main(["info", "--seq-len", "0"]) == 2
    assert capsys.readouterr().err == "error: --seq-len must be >= 1, got 0\n"


def test_entry_point_under_torchrun_skips_the_interpreter_teardown(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) the process leaves with os._exit and main's code: gloo's threads sometimes
    abort the interpreter's teardown, failing a finished run (4 of 36 two-rank runs before, 0 of 36 after)."""
    import nanoseek.cli as cli

    exits = []

    def fake_exit(code):  # os._exit never returns
        exits.append(code)
        raise KeyError("os._exit")

    monkeypatch.setattr(cli, "main", lambda: 2)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KeyError, match=r"os\._exit"):
        cli.run()
    assert exits == [2]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        cli.run()
    assert e.value.code == 2 and exits == [2]


# --- mutation-audit additions --------------------------------------------------------------------------------
def test_plot_skips_blank_lines_anywhere_and_falls_back_to_the_last_training_load(tmp_path, monkeypatch):
    """A blank line mid-file is skipped like a trailing one; with no evaluation load the heat map is the last
    training step's load (rows 3,1 and 2,2 over their means: 1.5,0.5 and 1,1), not the first one's."""
    run = tmp_path / "r"
    run.mkdir()
    recs = [dict(step=1, loss=5.0, expert_load=[[1, 3], [4, 4]]), dict(step=2, loss=4.0, expert_load=[[3, 1], [2, 2]])]
    (run / "metrics.jsonl").write_text(json.dumps(recs[0]) + "\n\n" + json.dumps(recs[1]) + "\n")
    steps, evals = nanoseek.plot.read_metrics(run)
    assert [r["step"] for r in steps] == [1, 2] and evals == []
    images = []
    imshow = matplotlib.axes.Axes.imshow

    def rec_imshow(self, a, *args, **kw):
        images.append(np.array(a))
        return imshow(self, a, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", rec_imshow)
    assert [p.name for p in nanoseek.plot.plot_run(run)] == ["loss.png", "expert_load.png"]
    assert len(images) == 1 and np.allclose(images[0], [[1.5, 0.5], [1.0, 1.0]])


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupt(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(nanoseek.plot, "plot_run", interrupt)
    assert main(["plot", "x"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
