"""`nanoseek bench`: every bench's --quick path runs in-process and returns the documented JSON keys with sane
values; the KV numbers equal the DeepSeek-V2 formulas exactly; the report collects saved results; the CLI
prints one JSON object as its last stdout line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek import NanoseekError
from nanoseek.bench import BENCHES, run
from nanoseek.bench.common import BenchOptions, code_version

TRAINING_BENCHES = ("balance", "mtp", "train", "attention", "moe", "fp8")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="session")
def suite(tmp_path_factory, session_corpus_dir):
    """Quick runs of the training benches on a small synthetic corpus, shared by the tests below."""
    root = tmp_path_factory.mktemp("bench")
    corpus = session_corpus_dir
    results = {}
    for name in TRAINING_BENCHES:
        results[name] = run(name, BenchOptions(quick=True, out=root / name, data=str(corpus), threads=1))
    return root, results


def test_registry_covers_the_suite():
    assert set(BENCHES) == {"kv", "balance", "mtp", "train", "attention", "moe", "decode", "fp8", "comm", "report"}


def test_kv_numbers_equal_the_formulas(tmp_path):
    r = run("kv", BenchOptions(out=tmp_path))
    rows = {(x["preset"], x["attention"]): x for x in r["rows"]}
    v3 = {k[1]: v for k, v in rows.items() if k[0] == "v3"}
    assert v3["MLA"]["elements_per_token_per_layer"] == 576  # d_c + d_h^R = 512 + 64
    assert v3["MHA"]["elements_per_token_per_layer"] == 32768  # 2 * 128 heads * 128
    assert v3["GQA-8"]["elements_per_token_per_layer"] == 2 * 8 * 128
    assert v3["MQA"]["elements_per_token_per_layer"] == 2 * 128
    assert v3["MLA"]["bf16_bytes_per_token"] == 576 * 61 * 2
    assert v3["MLA"]["equivalent_gqa_groups"] == 2.25
    lite = {k[1]: v for k, v in rows.items() if k[0] == "v2-lite"}
    assert lite["MHA"]["elements_per_token"] == 2 * 16 * 128 * 27  # 110.6K, V2 Table 9
    assert lite["MLA"]["elements_per_token"] == 576 * 27  # 15.6K
    small = {k[1]: v for k, v in rows.items() if k[0] == "small"}
    assert (
        small["MLA"]["elements_per_token_per_layer"] == 128 + 32
        and small["MHA"]["elements_per_token_per_layer"] == 1024
    )
    for x in r["rows"]:
        assert x["elements_per_token"] == x["elements_per_token_per_layer"] * x["layers"]
        assert x["bf16_bytes_per_token"] == 2 * x["elements_per_token"]
        assert x["model_matches_formula"], x  # what our attention modules allocate
    assert all(g["met"] for g in r["goals"])
    assert (tmp_path / "kv.md").exists() and (tmp_path / "kv_bytes.png").exists()
    assert json.loads((tmp_path / "result.json").read_text())["rows"] == json.loads(json.dumps(r["rows"]))


def test_balance_quick(suite):
    root, res = suite
    arms = res["balance"]["arms"]
    assert {a["balance"] for a in arms} == {"loss-free", "aux", "none"}
    assert sorted(a["alpha"] for a in arms if a["balance"] == "aux") == [1e-3, 1e-2]
    rules = [(a["gamma"], a["bias_update"], a["bias_update_schedule"]) for a in arms if a["balance"] == "loss-free"]
    assert rules == [
        (1e-3, "sign", "constant"),
        (1e-2, "sign", "constant"),
        (1e-2, "proportional", "constant"),
        (1e-2, "sign", "lr"),
    ]
    for a in arms:
        assert {"balance", "alpha", "maxvio_global", "val_loss", "seeds", "tokens"} <= set(a)
        assert finite(a["val_loss"]) and 0 < a["val_loss"] < 20
        for k in ("maxvio_global", "maxvio_global_train"):  # at most N/K - 1
            assert finite(a[k]) and 0 <= a[k] <= 16 / 2 - 1, k
        assert finite(a["val_split_floor"]) and a["val_split_floor"] >= 0
        assert finite(a["train_sample_floor"]) and a["train_sample_floor"] >= 0 and a["train_sample_tokens"] > 0
        assert a["seeds"] == 1 and a["tokens"] > 0
    for f in ("balance.md", "maxvio_batch.png", "maxvio_global.png", "val_loss.png", "result.json"):
        assert (root / "balance" / f).exists(), f


def test_balance_arms_trained_what_they_report(suite):
    """Each reported arm's balancing settings are those its run was trained with (its saved train_config.json),
    not only the arm's label: e.g. the proportional arm really trained with the proportional rule."""
    root, res = suite

    def key(balance, alpha=None, gamma=None, rule=None, schedule=None):
        return {"loss-free": (balance, gamma, rule, schedule), "aux": (balance, alpha)}.get(balance, (balance,))

    reported = sorted(
        key(a["balance"], a["alpha"], a["gamma"], a["bias_update"], a["bias_update_schedule"])
        for a in res["balance"]["arms"]
    )
    trained = []
    for path in sorted((root / "balance" / "runs").glob("*/train_config.json")):
        c = json.loads(path.read_text())
        trained.append(
            key(c["balance"], c["aux_alpha"], c["bias_update_rate"], c["bias_update"], c["bias_update_schedule"])
        )
    assert len(trained) == len(reported) == 7 and sorted(trained) == reported


def test_mtp_quick(suite):
    r = suite[1]["mtp"]
    for k in ("val_loss_mtp", "val_loss_no_mtp", "speculative_speedup", "greedy_tok_s", "speculative_tok_s"):
        assert finite(r[k]) and r[k] > 0, k
    assert 0 <= r["acceptance_rate"] <= 1 and 0 <= r["acceptance_rate_teacher_forced"] <= 1
    assert 1 <= r["tokens_per_forward"] <= 2
    assert r["same_tokens_fraction"] == 1.0  # speculative decoding is lossless under greedy
    assert finite(r["speculative_speedup_decode_only"])  # beside the wall-time one, which includes the prefill


def test_train_quick(suite):
    r = suite[1]["train"]
    assert {x["precision"] for x in r["results"]} == {"fp32", "bf16"}
    for x in r["results"]:
        for k in ("ours_tok_s", "transformers_tok_s", "speedup", "gemm_peak_fraction"):
            assert finite(x[k]) and x[k] > 0, k
        assert abs(x["ours_tok_s_in_pair"] / x["transformers_tok_s"] / x["speedup"] - 1) < 1e-6  # one pair's ratio
        assert x["preset"] == "tiny" and x["gemm_peak_fraction"] < 1.5
    # the like-for-like check: same weights, config and batch give the same fp32 loss in both libraries
    first = r["results"][0]["first_step_loss"]
    assert abs(first["ours"] - first["transformers"]) < 1e-3


def test_attention_quick(suite):
    r = suite[1]["attention"]
    arms = {a["label"]: a for a in r["arms"]}
    assert set(arms) == {"MLA", "MHA", "GQA-2"}
    params = [a["params"] for a in arms.values()]
    assert max(params) / min(params) < 1.03  # matched within 3%
    assert arms["MLA"]["kv_bytes_per_token"] < arms["GQA-2"]["kv_bytes_per_token"] < arms["MHA"]["kv_bytes_per_token"]
    for a in arms.values():
        assert finite(a["val_loss"]) and finite(a["decode_tok_s_b1"]) and a["decode_tok_s_b1"] > 0


def test_moe_quick(suite):
    arms = suite[1]["moe"]["arms"]
    moe, act, tot, iso = arms
    assert moe["label"] == "DeepSeekMoE" and iso["label"] == "dense, same total, same FLOPs"
    assert iso["steps"] < tot["steps"] and abs(iso["train_flops"] / moe["train_flops"] - 1) < 0.3
    assert abs(act["params_active"] - moe["params_active"]) / moe["params_active"] < 0.02
    assert abs(tot["params_total"] - moe["params_total"]) / moe["params_total"] < 0.02
    assert tot["train_flops_per_token"] > moe["train_flops_per_token"]
    for a in arms:
        assert finite(a["val_loss"]) and a["train_flops"] > 0 and a["train_seconds"] > 0


def test_fp8_quick(suite):
    r = suite[1]["fp8"]
    for k in ("rel_loss_error_blockwise", "rel_loss_error_tensorwise", "rel_loss_error_fp32_control"):
        assert finite(r[k]) and 0 <= r[k] < 0.05, k
    assert set(r["mean_rel_loss_error"]) == {"fp8 block-wise", "fp8 tensor-wise", "fp32 (control)"}
    # one signed error per seed; the headline error is |their mean|
    per = r["rel_loss_error_per_seed"]["fp8 block-wise"]
    assert len(per) == r["seeds"] and r["rel_loss_error_blockwise"] == pytest.approx(abs(sum(per) / len(per)))
    # the verdict uses |mean| + 2 s.e. over seeds (one seed: no error bar, the point estimate)
    sem = r["rel_loss_error_sem"]["fp8 block-wise"]
    assert r["rel_loss_error_blockwise_bound"] == pytest.approx(r["rel_loss_error_blockwise"] + 2 * (sem or 0))
    assert r["goals"][0]["met"] == (r["rel_loss_error_blockwise_bound"] < 0.0025)
    assert 0.3 < r["activation_memory_ratio"] < 1  # FP8-cached activations are smaller
    for k in ("tokens_per_s_bf16", "tokens_per_s_fp8_blockwise", "tokens_per_s_fp8_tensorwise", "tokens_per_s_fp32"):
        assert finite(r[k]) and r[k] > 0


@pytest.mark.parametrize(
    "name,module,func",
    [("decode", "nanoseek.bench_decode", "run"), ("comm", "nanoseek.parallel.bench", "run_comm_bench")],
)
def test_delegated_benches(name, module, func, tmp_path, monkeypatch):
    """decode and comm call other parts' bench functions with quick=True, and their dict becomes the result
    (their own tests run them for real)."""
    import importlib

    mod = importlib.import_module(module)
    calls = []

    # the keys each bench plots from (shaped like the real results)
    plotted = {
        "decode": ({"tokens_per_s": {"ours_fp32_b1": 500.0, "ours_fp32_b8": 1500.0, "transformers_fp32_b1": 300.0}},
                   ["decode_tokens_per_s.png"]),
        "comm": ({"bytes_per_token": {"bf16_no_limit": 2300.0, "bf16_max_1_node": 800.0, "fp8_no_limit": 1700.0,
                                      "fp8_max_1_node": 600.0},
                  "bubble": {"1f1b": {"measured_s": 0.18, "simulated_s": 0.07}}},
                 ["comm_bubbles.png", "comm_bytes_per_token.png"]),
    }  # fmt: skip
    data, pngs = plotted[name]

    def fake(quick, out_dir=None, model=None):
        calls.append((quick, model))
        return {"speedup": 1.5, "rows": [{"a": 1, "b": 2.5}], "nested": {"x": 3}, **data}

    monkeypatch.setattr(mod, func, fake, raising=False)
    r = run(name, BenchOptions(quick=True, out=tmp_path))
    assert calls == [(True, None)] and r["speedup"] == 1.5 and r["bench"] == name
    report = (tmp_path / f"{name}.md").read_text()
    assert "| a " in report and sorted(p.name for p in tmp_path.glob("*.png")) == pngs
    assert all(f"]({png})" in report for png in pngs)
    if name == "decode":  # `nanoseek bench decode --model DIR` measures that model
        run(name, BenchOptions(quick=True, out=tmp_path, model="runs/some-model"))
        assert calls[-1] == (True, "runs/some-model")
    else:  # the other benches train their own arms: --model is a one-line error, not ignored
        with pytest.raises(
            NanoseekError, match=rf"the {name} bench does not use --model \(--model applies to: decode\)"
        ):
            run(name, BenchOptions(quick=True, out=tmp_path, model="runs/some-model"))


def test_report_collects_saved_results(suite, monkeypatch):
    root, _ = suite
    # stand-ins for the delegated benches, so the report has nothing left to run
    (root / "kv").mkdir(exist_ok=True)
    run("kv", BenchOptions(out=root / "kv"))
    for name, extra in (
        ("comm", {"bytes_per_token": {"bf16_no_limit": 2000.0, "bf16_max_1_node": 800.0}}),
        ("decode", {}),
    ):
        (root / name).mkdir(exist_ok=True)
        (root / name / "result.json").write_text(json.dumps({"bench": name, "quick": True, "goals": [], **extra}))
    monkeypatch.setattr("nanoseek.bench.run", lambda *a, **k: pytest.fail("the report re-ran a saved bench"))
    r = run("report", BenchOptions(quick=True, out=root / "report"))
    assert set(r["benches"]) == {"kv", "balance", "mtp", "train", "attention", "moe", "decode", "fp8", "comm"}
    assert not r["missing"]
    text = (root / "report" / "report.md").read_text()
    for title in ("Mixed precision", "Multi-token prediction", "latent attention", "Communication", "DeepSeekMoE"):
        assert title in text
    assert "576" in text and "0.72" in text  # ours beside the papers' figures
    assert (root / "report" / "summary.png").exists()
    assert len(r["sections"]) == 5 and r["goals"]
    # results saved by other code (here: the stand-ins, which record none) are named, with their commit
    assert r["benches"]["kv"]["code"] == code_version() and r["older_code"] == ["comm", "decode"]
    assert "Collected results of other code than this checkout" in text and "comm, decode" in text


def test_cli_prints_one_json_object_last(tmp_path, capsys):
    from nanoseek.cli import main

    # the real command line: with --json, stdout is exactly one JSON line
    p = subprocess.run(
        [sys.executable, "-m", "nanoseek", "bench", "kv", "--json", "--out", str(tmp_path / "kv")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["bench"] == "kv"
    # without --json the tables come first and the JSON object is still the last line
    assert main(["bench", "kv", "--out", str(tmp_path / "kv2")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("| v3") for line in lines) and json.loads(lines[-1])["bench"] == "kv"
    # a user error is one line on stderr and exit code 2
    assert main(["bench", "balance", "--steps", "0", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--steps" in err[0]


def test_bad_out_and_options_a_bench_does_not_use_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """--out that cannot be written fails before the bench runs (it failed with a traceback from the first plot);
    an option the bench does not read is refused rather than ignored, and nothing is created for a refusal."""
    from nanoseek.cli import main

    (tmp_path / "afile").write_text("x")
    cases = [
        (["kv", "--out", str(tmp_path / "afile")], f"error: --out {tmp_path / 'afile'} is a file, not a directory"),
        (["kv", "--out", str(tmp_path / "afile" / "sub")], "error: cannot write --out"),
        (["kv", "--steps", "3"], "error: the kv bench does not use --steps (--steps applies to: balance, mtp,"),
        (["train", "--seeds", "2"], "error: the train bench does not use --seeds"),
        (["comm", "--reuse", "--data", "x"], "error: the comm bench does not use --data, --reuse (--data applies"),
        (["balance", "--seeds", "0"], "error: --seeds must be >= 1, got 0"),
    ]
    for argv, needle in cases:
        out = tmp_path / "never"
        args = argv if "--out" in argv else [*argv, "--out", str(out)]
        assert main(["bench", *args, "--quick"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(needle) and err.count("\n") == 1, (argv, err)
        assert not out.exists(), argv
    assert main(["bench", "list", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(BENCHES)


def test_report_reruns_a_result_of_another_shape_and_finds_plots_from_elsewhere(suite, tmp_path, monkeypatch):
    """A result.json that parses but is not this bench's (a list, another bench's) or lacks a field the report
    reads (train rows without "precision") is run again, with one log line saying why; saved plot paths relative
    to another working directory are found in the bench's folder; the training options reach only the benches
    that read them."""
    import shutil

    from nanoseek.bench import report as rep

    root, _ = suite
    copy = tmp_path / "bench"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("runs"))
    shutil.rmtree(copy / "decode", ignore_errors=True)  # another test may have saved a stand-in there
    (copy / "kv").mkdir(exist_ok=True)
    (copy / "kv" / "result.json").write_text("[]")
    (copy / "comm").mkdir(exist_ok=True)
    (copy / "comm" / "result.json").write_text(json.dumps({"bench": "kv"}))
    train = json.loads((copy / "train" / "result.json").read_text())  # rows without a field the report reads
    train["results"] = [{k: v for k, v in row.items() if k != "precision"} for row in train["results"]]
    (copy / "train" / "result.json").write_text(json.dumps(train))
    saved = json.loads((copy / "balance" / "result.json").read_text())  # as `cd elsewhere; nanoseek bench` saves
    saved["plots"] = [f"runs/bench/balance/{Path(p).name}" for p in saved["plots"]]
    (copy / "balance" / "result.json").write_text(json.dumps(saved))
    reran = []

    def fake_run(name, sub):
        reran.append((name, sub.steps, sub.reuse))
        return {"bench": name, "quick": True, "goals": []}

    monkeypatch.setattr("nanoseek.bench.run", fake_run)
    monkeypatch.chdir(tmp_path)  # the saved plot paths were written relative to another directory
    results, missing = rep.collect(BenchOptions(quick=True, out=copy / "report", steps=3, reuse=True))
    assert sorted(reran) == [(n, None, False) for n in ("comm", "decode", "kv", "train")]  # no --steps, --reuse
    assert not missing
    plots = results["balance"]["plots"]
    assert plots and all(Path(p).exists() and Path(p).parent == copy / "balance" for p in plots)


def test_tables_escape_pipes_and_delegated_reports_show_only_their_own_files(tmp_path):
    from nanoseek.bench.common import Report, table
    from nanoseek.bench.delegate import render

    assert table(["goal"], [["|mean| + 2 s.e."]]).splitlines()[-1] == "| \\|mean\\| + 2 s.e. |"
    (tmp_path / "old.png").write_bytes(b"")
    before = set(tmp_path.iterdir())
    (tmp_path / "new.png").write_bytes(b"")
    report = Report("comm", "t", BenchOptions(out=tmp_path))
    render({"x": 1}, report, tmp_path, before)
    assert report.plots == [str(tmp_path / "new.png")]


def test_code_version_tells_uncommitted_states_apart(monkeypatch):
    import nanoseek.bench.common as common

    outputs = {"rev-parse": "abc123\n", "diff": "", "ls-files": ""}

    def fake(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 0, stdout=outputs[cmd[1]])

    monkeypatch.setattr(common.subprocess, "run", fake)
    assert common.code_version() == "abc123"
    outputs["diff"] = "+a change\n"
    one = common.code_version()
    outputs["diff"] = "+another change\n"
    two = common.code_version()
    assert one.startswith("abc123-dirty-") and two.startswith("abc123-dirty-") and one != two


def test_report_files_are_relative(suite):
    root, _ = suite
    text = (root / "balance" / "balance.md").read_text()
    assert "](maxvio_batch.png)" in text and f"]({root}" not in text


def test_reuse_keeps_a_finished_arm_and_retrains_a_changed_one(tmp_path, session_corpus_dir):
    """`--reuse` returns a finished arm whose settings match, also when it was recorded in another directory or
    before an option with a default existed; a changed setting retrains it (and drops the stale record first)."""
    from nanoseek.bench.common import ARM_FILE, base_settings, train_arm

    opts = BenchOptions(quick=True, out=tmp_path, data=str(session_corpus_dir), threads=1, reuse=True)
    s = base_settings(opts, mtp_depth=0, steps=2)
    first = train_arm(opts, "arm", 0, **s)
    record = tmp_path / "runs" / "arm-s0" / ARM_FILE
    saved = json.loads(record.read_text())
    del saved["train_config"]["bias_update_schedule"]  # as if recorded before that option existed
    saved["train_config"]["out"] = "/elsewhere/arm-s0"  # and in another directory
    record.write_text(json.dumps(saved))
    again = train_arm(opts, "arm", 0, **s)
    assert again.summary == first.summary  # the very same record: not retrained
    changed = train_arm(opts, "arm", 0, **{**s, "lr": 1e-3})
    assert changed.summary["wall_seconds"] != first.summary["wall_seconds"]
    assert json.loads(record.read_text())["train_config"]["lr"] == 1e-3


# --- added by the mutation audit ----------------------------------------------------------------------------------
def test_balance_arms_train_without_the_sequence_wise_loss(suite):
    """Every balance arm sets seq_aux_alpha = 0 (the trainer's default adds 1e-4 to loss-free runs): the
    loss-free arms are the pure method, and no arm carries a balance loss it does not report."""
    root, _ = suite
    configs = [json.loads(p.read_text()) for p in (root / "balance" / "runs").glob("*/train_config.json")]
    assert len(configs) == 7 and all(c["seq_aux_alpha"] == 0.0 for c in configs)


def test_reuse_ignores_threads_and_a_failed_retrain_leaves_no_stale_record(tmp_path, session_corpus_dir, monkeypatch):
    """--threads does not change an arm's result, so another --threads reuses it; a retrain with changed
    settings that fails must not leave the old record in place (it would vouch for the half-written run)."""
    import dataclasses

    import nanoseek.train
    from nanoseek.bench.common import ARM_FILE, base_settings, train_arm

    opts = BenchOptions(quick=True, out=tmp_path, data=str(session_corpus_dir), threads=1, reuse=True)
    s = base_settings(opts, mtp_depth=0, steps=2)
    first = train_arm(opts, "arm", 0, **s)
    record = tmp_path / "runs" / "arm-s0" / ARM_FILE

    def boom(self):
        raise RuntimeError("training failed")

    monkeypatch.setattr(nanoseek.train.Trainer, "fit", boom)  # any retrain now fails
    again = train_arm(dataclasses.replace(opts, threads=2), "arm", 0, **s)
    assert again.summary == first.summary
    with pytest.raises(RuntimeError, match="training failed"):
        train_arm(opts, "arm", 0, **{**s, "lr": 1e-3})
    assert not record.exists()
