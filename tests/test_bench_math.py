"""The arithmetic of the benches on small synthetic inputs, no training: the fp8 bench's seed statistics and
verdicts (with `train_arm` and `activation_bytes` stubbed), MaxVio, the smoothing / statistics helpers, the
options and settings helpers, the KV formulas and the balance bench's floors. The --quick runs in
test_bench.py use one seed and tiny numbers, so none of this is pinned there."""

import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from nanoseek import NanoseekError
from nanoseek.balance import maxvio
from nanoseek.bench import balance as bench_balance
from nanoseek.bench import common, fp8, kv
from nanoseek.bench.common import BenchOptions, Report

# --- fp8 bench: seed statistics with stubbed arms --------------------------------------------------------------
BF16 = 400.0  # a loss whose relative errors 1/400 etc. are exactly the float literals the verdicts compare with
ACT_BYTES = {None: 1000, "block": 400, "tensor": 500}


def fp8_result(monkeypatch, tmp_path, final: dict[str, list[float]]) -> dict:
    """Run the fp8 bench with 2 seeds of 10 steps whose losses are BF16 except the last step of the arms named
    in `final` (one final loss per seed): smooth_tail over 10 steps is the last loss."""

    def fake_train_arm(opts, slug, seed, keep=False, **kw):
        label = {"fp8_block-wise": "block", "fp8_tensor-wise": "tensor"}.get(slug)
        losses = [BF16] * 10
        if label in final:
            losses[-1] = final[label][seed]
        trainer = SimpleNamespace(stream=SimpleNamespace(next_batch=lambda b: torch.zeros(b, 33, dtype=torch.long)))
        return common.Arm(
            slug,
            seed,
            {"tokens_per_s": 100.0 + seed, "val_loss": 3.0 + seed, "tokens": 640},
            [{"step": i + 1, "loss": v} for i, v in enumerate(losses)],
            [],
            trainer if keep else None,
        )

    monkeypatch.setattr(fp8, "train_arm", fake_train_arm)
    monkeypatch.setattr(fp8, "activation_bytes", lambda s, g, b: {"bytes": ACT_BYTES[g], "by_dtype": {}})
    monkeypatch.setattr(fp8, "plot_lines", lambda *a, **k: None)
    opts = BenchOptions(name="fp8", quick=True, seeds=2, out=tmp_path)
    return fp8.run(opts, Report("fp8", fp8.TITLE, opts))


def test_fp8_seed_statistics_and_verdicts(monkeypatch, tmp_path):
    """Signed per-seed errors +1% and -0.5%: |mean| 0.25%, mean |error| 0.75%, s.e. stdev/√n 0.75%, bound
    |mean| + 2 s.e. = 1.75% (goal not met); tensor-wise 5% is visibly worse than block-wise."""
    r = fp8_result(monkeypatch, tmp_path, {"block": [404.0, 398.0], "tensor": [420.0, 420.0]})
    blk, ten = "fp8 block-wise", "fp8 tensor-wise"
    assert r["seeds"] == 2
    assert r["rel_loss_error_per_seed"][blk] == pytest.approx([0.01, -0.005])  # each seed its own error
    assert r["rel_loss_error_per_seed"]["fp32 (control)"] == [0.0, 0.0]
    assert r["rel_loss_error_blockwise"] == pytest.approx(0.0025)
    assert r["rel_loss_error_blockwise_abs_mean"] == pytest.approx(0.0075)
    assert r["rel_loss_error_sem"][blk] == pytest.approx(statistics.stdev([0.01, -0.005]) / math.sqrt(2))
    assert r["rel_loss_error_sem"][blk] == pytest.approx(0.0075)
    assert r["rel_loss_error_blockwise_bound"] == pytest.approx(0.0175)
    assert r["rel_loss_error_tensorwise"] == pytest.approx(0.05) and r["rel_loss_error_sem"][ten] == 0
    assert r["activation_memory_ratio"] == pytest.approx(0.4)
    assert r["activation_memory_ratio_tensorwise"] == pytest.approx(0.5)
    assert r["tokens_per_s_bf16"] == 100.5 and r["val_loss"]["bf16"] == 3.5
    met = [g["met"] for g in r["goals"]]
    assert met == [False, True, True]  # bound 1.75% > 0.25%; 5% - 0.25% > 2 s.e. = 1.5%; 0.4 <= 0.7


def test_fp8_goal_is_strictly_below_the_limit(monkeypatch, tmp_path):
    """An error of exactly 0.25% on both seeds (no spread) does not meet "< 0.25%"; and a tensor-wise error
    below block-wise is not "visibly worse"."""
    r = fp8_result(monkeypatch, tmp_path, {"block": [401.0, 401.0], "tensor": [400.4, 400.4]})
    assert r["rel_loss_error_blockwise_bound"] == 0.0025  # 1/400 exactly, s.e. 0
    assert [g["met"] for g in r["goals"]][:2] == [False, False]


# --- MaxVio and the stats helpers ------------------------------------------------------------------------------
def test_maxvio_is_relative_to_the_mean():
    assert maxvio(torch.tensor([3, 1, 1, 3])) == 0.5  # (3 - 2) / 2; torch's (lower) median 1 would give 2.0
    assert maxvio(torch.tensor([3, 1, 1, 1])) == 1.0  # (3 - 1.5) / 1.5; the median 1 would give 2.0
    assert maxvio(torch.tensor([0, 0])) == 0.0


def test_ema_smooth_tail_mean_std_median():
    assert common.ema([1.0, 2.0], 0.9) == pytest.approx([1.0, 1.1])  # m = 0.9 m + 0.1 v
    assert common.smooth_tail(list(range(1, 21))) == 19.5  # mean of the last 10%: 19, 20
    assert common.smooth_tail([5.0, None, 7.0]) == 7.0  # at least one point, Nones dropped
    assert common.mean_std([1, 2, 3]) == (2.0, 1.0)  # sample standard deviation
    assert common.mean_std([1, None, float("nan"), 3]) == (2.0, pytest.approx(2**0.5))
    assert common.mean_std([4]) == (4.0, None) and common.mean_std([]) == (None, None)
    assert common.median([1, 2, 10]) == 2
    assert math.isnan(common.median([]))


def test_goal_and_goals_table():
    assert common.goal("x", 1, "t", None)["met"] is None
    t = common.goals_table([common.goal("a", 1.0, "t", False), common.goal("b", 2.0, "t", True)])
    rows = t.splitlines()[2:]
    assert "NOT met" in rows[0] and "NOT met" not in rows[1] and "met" in rows[1]
    assert "n/a" in common.goals_table([common.goal("c", None, "t", None)])


def test_bench_options_and_base_settings():
    with pytest.raises(NanoseekError):
        BenchOptions(seeds=0).n_seeds(1)
    assert BenchOptions().n_seeds(3) == 3 and BenchOptions(quick=True).n_seeds(3) == 1
    assert BenchOptions().eval_every(1000, 5) == 200  # five evaluations over a full run
    assert BenchOptions(quick=True).eval_every(1000, 5) == 1000  # only at the end of a quick one
    s = common.base_settings(BenchOptions(quick=True), {"intermediate_size": 999})
    assert "intermediate_size=999" in s["override"]  # the caller's model wins over MICRO
    assert "intermediate_size=128" not in s["override"] and "hidden_size=64" in s["override"]


# --- kv bench --------------------------------------------------------------------------------------------------
def test_kv_rows_ratios_bytes_and_groups():
    v3 = {r["attention"]: r for r in kv.formula_rows("v3")}
    assert v3["MLA"]["ratio_vs_mha"] == 576 / 32768
    assert v3["MHA"]["ratio_vs_mha"] == 1.0
    for r in v3.values():
        assert r["bf16_bytes_per_token_per_layer"] == 2 * r["elements_per_token_per_layer"]
        assert (r["kv_lora_rank"] is None) == (r["attention"] != "MLA")
    assert v3["MLA"]["kv_lora_rank"] == 512
    small = {r["attention"]: r for r in kv.formula_rows("small")}  # 8 heads: GQA with half of them
    assert list(small) == ["MHA", "GQA-4", "MQA", "MLA"]
    assert small["GQA-4"]["kv_groups"] == 4 and small["GQA-4"]["elements_per_token_per_layer"] == 2 * 4 * 64
    assert small["MHA"]["kv_lora_rank"] is None and small["MLA"]["kv_lora_rank"] == 128


# --- balance bench ---------------------------------------------------------------------------------------------
def test_balance_ratio_maxvio_and_sampling_floor():
    # layer 1: shares [.75,.25] / [.25,.75] = [3, 1/3] -> MaxVio 0.8; layer 2: 0 -> layer mean 0.4
    assert bench_balance._ratio_maxvio([[3, 1], [2, 2]], [[1, 3], [2, 2]]) == pytest.approx(0.4)
    # 1.8 * sqrt((1 - K/N) / (T K/N)) at T = 512, N = 16, K = 2
    assert bench_balance.sampling_floor(512, 16, 2) == pytest.approx(1.8 * math.sqrt(0.875 / 64))
    assert bench_balance.sampling_floor(512, 16, 2) == pytest.approx(0.2105, abs=1e-4)


def balance_goals(monkeypatch, tmp_path, values: dict[str, tuple[float, float, float]]) -> dict[str, bool]:
    """Run the balance bench with `train_one` stubbed: each arm's (MaxVio_global, val loss, MaxVio on training
    rows) from `values` by balance kind ("loss-free" / the aux label / "none"); returns goal text -> met."""

    def fake_train_one(opts, arm, seed, settings):
        key = arm["label"] if arm["balance"] == "aux" else arm["balance"]
        vg, vl, vt = values[key]
        summary = dict(val_loss=vl, maxvio_global=vg, maxvio_global_train=vt, val_split_floor=0.03)
        summary |= dict(train_sample_floor=0.01, train_sample_tokens=256, tokens=640, tokens_per_s=1.0)
        evals = [{"step": 4, "maxvio_global": vg, "val_loss": vl, "val_tokens": 100}]
        return common.Arm(arm["label"], seed, summary, [{"step": 4, "maxvio_batch": 0.5}], evals)

    monkeypatch.setattr(bench_balance, "train_one", fake_train_one)
    monkeypatch.setattr(bench_balance, "plot_lines", lambda *a, **k: None)
    opts = BenchOptions(name="balance", quick=True, out=tmp_path)
    res = bench_balance.run(opts, Report("balance", bench_balance.TITLE, opts))
    return {g["goal"].split(" (")[0]: g["met"] for g in res["goals"]}


# (MaxVio_global, val loss, MaxVio on training rows) per arm: every goal exactly at its bound
AT_BOUNDS = {
    "loss-free": (0.05, 3.0, 0.05),
    "aux α=0.001": (0.2, 3.0, 0.1),
    "aux α=0.01": (0.5, 3.1, 0.1),
    "none": (1, 3, 1),
}


def test_balance_goals_at_their_bounds(monkeypatch, tmp_path):
    """Each goal holds exactly at its bound (MaxVio 0.05, aux / loss-free = 4, equal val loss) and fails just past
    it; every loss-free arm is judged against every aux arm."""
    met = balance_goals(
        monkeypatch,
        tmp_path,
        AT_BOUNDS,
    )
    lf = "loss-free γ=0.001"
    assert len(met) == 4 * 5  # 4 loss-free arms x (global, training rows, 2 ratios, val loss)
    assert met[f"{lf}: MaxVio_global ≤ 0.05"] and met[f"aux α=0.001 MaxVio_global / {lf}'s"]
    assert met[f"{lf}: val loss ≤ every aux arm's"] and all(met.values())
    met = balance_goals(
        monkeypatch,
        tmp_path,
        {**AT_BOUNDS, "loss-free": (0.051, 3.0, 0.06), "aux α=0.001": (0.2, 2.99, 0.1), "aux α=0.01": (1, 3.1, 1)},
    )
    assert not met[f"{lf}: MaxVio_global ≤ 0.05"] and not met[f"aux α=0.001 MaxVio_global / {lf}'s"]  # 3.92
    assert met[f"aux α=0.01 MaxVio_global / {lf}'s"]  # 19.6
    assert not met[f"{lf}: val loss ≤ every aux arm's"]  # one aux arm lower is enough to fail
    assert not any(v for k, v in met.items() if k.startswith(f"{lf}: MaxVio on"))
    met = balance_goals(
        monkeypatch,
        tmp_path,
        {**AT_BOUNDS, "loss-free": (0.0, 3.0, 0.0)},
    )
    assert met[f"aux α=0.001 MaxVio_global / {lf}'s"]  # a perfectly balanced arm: the ratio is infinite, not an error


# --- added by the mutation audit: numbers and verdicts the quick runs do not pin --------------------------------
def test_n_steps_refuses_zero_and_gemm_gflops_counts_2n3_flops(monkeypatch):
    """BenchOptions.n_steps refuses 0 like n_seeds; gemm_gflops is 2·n³ FLOPs over the median time."""
    with pytest.raises(NanoseekError, match="--steps must be >= 1, got 0"):
        BenchOptions(steps=0).n_steps(5, 1)
    times = iter([1.0, 4.0, 2.0])
    monkeypatch.setattr(common, "timed", lambda fn: next(times))
    assert common.gemm_gflops(8, torch.float32, reps=3) == pytest.approx(2 * 8**3 / 2.0 / 1e9)


def test_code_version_counts_untracked_files_and_their_contents(monkeypatch, tmp_path):
    """A new (untracked) file under nanoseek/ makes the checkout dirty even with an empty diff, and two contents
    of that file give two versions."""
    outputs = {"rev-parse": "abc123\n", "diff": "", "ls-files": "nanoseek/new.py\n"}
    monkeypatch.setattr(
        common.subprocess, "run", lambda cmd, **kw: SimpleNamespace(stdout=outputs[cmd[1]], returncode=0)
    )
    monkeypatch.setattr(common, "__file__", str(tmp_path / "nanoseek" / "bench" / "common.py"))  # repo = tmp_path
    (tmp_path / "nanoseek").mkdir()
    (tmp_path / "nanoseek" / "new.py").write_text("x = 1\n")
    one = common.code_version()
    (tmp_path / "nanoseek" / "new.py").write_text("x = 2\n")
    two = common.code_version()
    assert one.startswith("abc123-dirty-") and two.startswith("abc123-dirty-") and one != two


def test_fp8_negative_error_counts_by_its_size(monkeypatch, tmp_path):
    """FP8 0.5% *below* bf16 on both seeds: the reported error is |mean| = 0.5% and the < 0.25% goal fails;
    the EMA-curve error is |.|-averaged: only the last step differs, EMA 399.8 vs 400 -> 0.05% / 10 steps."""
    r = fp8_result(monkeypatch, tmp_path, {"block": [398.0, 398.0], "tensor": [398.0, 398.0]})
    assert r["rel_loss_error_blockwise"] == pytest.approx(0.005)
    assert r["rel_loss_error_per_seed"]["fp8 block-wise"] == pytest.approx([-0.005, -0.005])
    assert r["goals"][0]["met"] is False
    assert r["mean_rel_loss_error"]["fp8 block-wise"] == pytest.approx(0.2 / 400 / 10)


def test_fp8_difference_error_bar_is_root_sum_square(monkeypatch, tmp_path):
    """block-wise +1%/-0.5% (s.e. 0.75%), tensor-wise +4%/+2% (mean 3%, s.e. 1%): the difference 2.75% beats
    2·√(0.75%² + 1%²) = 2.5% (not 2·(0.75% + 1%) = 3.5%)."""
    r = fp8_result(monkeypatch, tmp_path, {"block": [404.0, 398.0], "tensor": [416.0, 408.0]})
    g = r["goals"][1]
    assert g["value"] == pytest.approx(0.0275) and g["target"] == "> 2.5000%" and g["met"] is True
    # the table's smoothed final loss is over the seed-averaged curve: (404 + 398) / 2
    assert r["final_loss_smoothed"]["fp8 block-wise"] == pytest.approx(401.0)


def test_fp8_goal_boundaries(monkeypatch, tmp_path):
    """Activations at exactly 0.70 of bf16 meet "≤ 0.70"; tensor-wise equal to block-wise (one point estimate,
    no error bar) is not "visibly worse"."""
    monkeypatch.setitem(ACT_BYTES, "block", 700)
    r = fp8_result(monkeypatch, tmp_path, {"block": [401.0, 401.0], "tensor": [401.0, 401.0]})
    assert r["activation_memory_ratio"] == 0.7 and r["goals"][2]["met"] is True
    assert r["goals"][1]["value"] == 0 and r["goals"][1]["met"] is False


def test_kv_gqa_groups_and_a_cache_that_differs_from_its_formula(monkeypatch):
    assert [kv.gqa_groups(n) for n in (1, 2, 8, 16, 128)] == [1, 1, 4, 8, 8]
    real = kv.build_attention

    def bigger(cfg):  # a module that allocates one element more per token than the formula
        a = real(cfg)
        spec = a.cache_spec()
        a.cache_spec = lambda: {**spec, "extra": (1,)}
        return a

    monkeypatch.setattr(kv, "build_attention", bigger)
    assert not any(r["model_matches_formula"] for r in kv.formula_rows("small"))


class _FakeStream:
    def __init__(self, *a, **k):
        pass

    def next_batch(self, n):
        return torch.zeros(n, 9, dtype=torch.long)  # T = 8


def test_train_sample_maxvio_floors(monkeypatch):
    """Halves with loads [3,2,1] and [1,1,1] (one layer), validation loads [1,1,1]:
    training-row MaxVio over the total [4,3,2] = 1/3; its floor = half the MaxVio of the share ratio
    [1.5,1,0.5] = 0.25; the validation-split floor = MaxVio of [3/9,3/9,3/9] / [4/9,3/9,2/9] = [.75,1,1.5]
    = (1.5 - 13/12) / (13/12) = 5/13. 64 tokens = 8 rows of 8 in 4 batches of 2."""
    import nanoseek.data

    monkeypatch.setattr(nanoseek.data, "TokenStream", _FakeStream)
    halves = iter([[[3, 2, 1]], [[1, 1, 1]]])
    seen = []

    def evaluate(batches):
        seen.append(len(batches))
        return {"val_expert_load": next(halves)}

    tc = SimpleNamespace(seq_len=8, batch_size=2, window_rows=lambda: 4)
    trainer = SimpleNamespace(tc=tc, corpus=None, tok=None, evaluate=evaluate)
    r = bench_balance.train_sample_maxvio(trainer, 0, {"val_expert_load": [[1, 1, 1]]}, 64)
    assert seen == [2, 2]
    assert r["maxvio_global_train"] == pytest.approx(1 / 3)
    assert r["train_sample_floor"] == pytest.approx(0.25)
    assert r["val_split_floor"] == pytest.approx(5 / 13)
    assert r["train_sample_tokens"] == 64


def test_balance_mean_curve_is_on_common_steps():
    assert bench_balance.mean_curve([[(1, 1.0), (2, 3.0)], [(2, 5.0), (3, 7.0)]]) == ([2], [4.0])


def balance_result(monkeypatch, tmp_path, seeds=1) -> dict:
    """The balance bench with `train_one` stubbed: seed k has val loss 3 + k (aux arms + 0.1 for α=1e-3, + 0.2
    for α=1e-2), MaxVio_global 0.04 (loss-free) / 0.5 (others), and MaxVio_batch 1.0 for 18 steps then
    0.2, 0.4 (the last 10% of 20 steps)."""

    def fake_train_one(opts, arm, seed, settings):
        vl = 3.0 + seed + {"aux α=0.001": 0.1, "aux α=0.01": 0.2}.get(arm["label"], 0.0)
        vg = 0.04 if arm["balance"] == "loss-free" else 0.5
        summary = dict(val_loss=vl, maxvio_global=vg, maxvio_global_train=vg, val_split_floor=0.03)
        summary |= dict(train_sample_floor=0.01, train_sample_tokens=256, tokens=640, tokens_per_s=1.0)
        steps = [{"step": i + 1, "maxvio_batch": v} for i, v in enumerate([1.0] * 18 + [0.2, 0.4])]
        evals = [{"step": 20, "maxvio_global": vg, "val_loss": vl, "val_tokens": 100}]
        return common.Arm(arm["label"], seed, summary, steps, evals)

    monkeypatch.setattr(bench_balance, "train_one", fake_train_one)
    monkeypatch.setattr(bench_balance, "plot_lines", lambda *a, **k: None)
    opts = BenchOptions(name="balance", quick=True, seeds=seeds, out=tmp_path)
    return bench_balance.run(opts, Report("balance", bench_balance.TITLE, opts))


def test_balance_seed_means_smoothed_batch_maxvio_floor_and_loss_delta(monkeypatch, tmp_path):
    r = balance_result(monkeypatch, tmp_path, seeds=2)
    lf = r["arms"][0]
    assert lf["val_loss"] == 3.5 and lf["val_loss_std"] == pytest.approx(2**-0.5)  # over seeds 0 and 1
    assert lf["maxvio_batch_final"] == pytest.approx(0.3)  # mean of the last 10%, not the last step
    assert r["settings"]["sampling_floor"] == pytest.approx(bench_balance.sampling_floor(2 * 32, 16, 2))
    delta = next(g for g in r["goals"] if g["goal"].startswith("loss-free γ=0.001: val loss"))
    assert delta["value"] == pytest.approx(-0.1) and delta["met"]  # Δ to the *best* aux arm (3.6)
