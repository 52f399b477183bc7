"""The benches' summary arithmetic on synthetic inputs (no training): which pair is "transformers' best", which
median is the GEMM peak, pooled tokens/s, goal thresholds, FLOPs/time curves and the report's table rows. The
quick bench runs in test_bench.py only check that these numbers are finite; here they are pinned exactly."""

from types import SimpleNamespace

import pytest
import torch

from nanoseek.bench.moe import curves_of, interp
from nanoseek.bench.report import sections
from nanoseek.bench.throughput import batched_mm_bytes, summarise
from nanoseek.bench_decode import Pooled, _best, _goal, agreement
from nanoseek.config import get_preset


def _pair(variant, ours, theirs, speedup, gemm):
    return {
        "variant": variant,
        "ours_tok_s": ours,
        "transformers_tok_s": theirs,
        "speedup": speedup,
        "gemm_bf16_gflops": gemm,
    }


def test_throughput_summarise_picks_median_and_transformers_best_pair():
    """ours = the median over pairs; transformers' best = the pair with the LOWEST speed-up (its best relative
    to ours); the same-precision best skips the fp32 variants in the bf16 pass; the GEMM peak is the median
    of the pass's probes, and the fraction of the run's max peak divides by that max. Error pairs are skipped."""
    case = {
        "preset": "tiny",
        "batch_size": 4,
        "seq_len": 64,
        "flops_per_token": 1e6,
        "passes": {
            "bf16": {
                "pairs": [
                    _pair("fp32/grouped_mm", 100.0, 50.0, 2.0, 100.0),
                    _pair("bf16-autocast", 110.0, 20.0, 5.5, 200.0),
                    _pair("bf16-weights/eager", 90.0, 30.0, 3.0, 300.0),
                    {"variant": "bf16-weights/grouped_mm", "error": "boom"},
                ],
                "first_step_loss": {"ours": 8.3, "transformers": 8.3},
            }
        },
    }
    (row,) = summarise(case, 1000.0)
    assert row["precision"] == "bf16" and row["preset"] == "tiny" and (row["batch_size"], row["seq_len"]) == (4, 64)
    assert row["ours_tok_s"] == 100.0  # median of 100, 110, 90
    assert row["transformers_best"] == "fp32/grouped_mm" and row["speedup"] == 2.0
    assert row["transformers_tok_s"] == 50.0 and row["ours_tok_s_in_pair"] == 100.0
    assert row["ours_tok_s_in_pair"] == row["speedup"] * row["transformers_tok_s"]
    assert row["speedup_same_precision"] == 3.0 and row["transformers_same_precision_tok_s"] == 30.0
    assert row["gemm_peak_gflops"] == 200.0 and row["gemm_peak_max_gflops"] == 1000.0
    assert row["achieved_gflops"] == pytest.approx(100 * 1e6 / 1e9)
    assert row["transformers_achieved_gflops"] == pytest.approx(50 * 1e6 / 1e9)
    assert row["gemm_peak_fraction"] == pytest.approx(100 * 1e6 / 1e9 / 200)
    assert row["gemm_peak_fraction_of_max"] == pytest.approx(100 * 1e6 / 1e9 / 1000)
    assert row["first_step_loss"] == {"ours": 8.3, "transformers": 8.3}


def test_batched_mm_bytes_tiny():
    """tiny: 3 MoE layers (of 4) x 2048 tokens x top-2 x 3 matrices x 128 x 256 x 2 bytes."""
    assert batched_mm_bytes(get_preset("tiny"), 2048, 2) == 3 * 2048 * 2 * 3 * 128 * 256 * 2 == 2415919104


def _gen(prefill_s=0.1, decode_s=0.4, **extra):
    return SimpleNamespace(
        tokens=[[1, 2, 3]], new_tokens=3, prefill_s=prefill_s, decode_s=decode_s, extra=extra, acceptance_rate=None
    )


def test_pooled_tokens_per_s_over_total_and_decode_time():
    """6 tokens over 2 x (0.1 + 0.4) s = 6/s; decode-only: the first token of each row comes from the prefill,
    so (6 - 2) tokens over 2 x 0.4 s = 5/s. Plain decoding has no acceptance."""
    p = Pooled([_gen(), _gen()])
    assert p.tokens_per_s == pytest.approx(6.0) and p.decode_tokens_per_s == pytest.approx(5.0)
    assert p.tokens == [[1, 2, 3], [1, 2, 3]] and p.acceptance_rate is None


def test_decode_best_and_goal():
    r = {}
    for v in (1.0, 3.0, 2.0):
        _best(r, "k", v)
    assert r["k"] == 3.0
    assert _goal("x", 1.5, 1.5)["met"] is True
    assert _goal("x", 1.49, 1.5)["met"] is False
    g = _goal("x", 2.0, 1.5, trained=False)
    assert g["met"] is None and "random model" in g["goal"]
    assert _goal("x", None, 1.5)["met"] is None


def test_moe_curves_of_cumulative_time_and_flops():
    """Seconds accumulate the time of each step's new tokens ((200 - 100) / 100 s at step 2); FLOPs = the
    tokens seen at the eval step x FLOPs per token."""
    arm = SimpleNamespace(
        steps=[{"step": 1, "tokens": 100, "tokens_per_s": 100.0}, {"step": 2, "tokens": 200, "tokens_per_s": 100.0}],
        evals=[{"step": 2, "val_loss": 3.0}],
    )
    assert curves_of(arm, 10.0) == ([2000.0], [2.0], [3.0])
    assert interp([0, 10], [1, 3], 2.5) == 1.5
    assert interp([10, 0], [3, 1], 7.5) == 2.5  # sorted by x first
    assert interp([0, 10], [1, 3], 11) is None


def fake_gen(decode_s=1.0, rate=None, steps=0):
    """A Generation-like result: 3 new tokens, 0.5 s of prefill; acceptance fields as a speculative run sets them."""
    return SimpleNamespace(
        tokens=[[1, 2, 3]],
        new_tokens=3,
        prefill_s=0.5,
        decode_s=decode_s,
        extra={"speculative_steps": steps} if steps else {},
        acceptance_rate=rate,
        acceptance_per_position=[rate],
        tokens_per_forward=None if rate is None else 1 + rate,
    )


def mtp_engine_bench(monkeypatch, queue: list) -> dict:
    """`engine_decode_bench` over two prompts with an engine that returns `queue`'s generations in order (two
    warm-up calls, then plain and speculative per prompt); all of them must be consumed."""
    import nanoseek.bench.mtp as mtp

    class FakeEngine:
        def __init__(self, *a, **k):
            pass

        def generate(self, *a, **k):
            return queue.pop(0)

    monkeypatch.setattr(mtp, "Engine", FakeEngine)
    r = mtp.engine_decode_bench(torch.nn.Linear(1, 1), [torch.tensor([[5, 6]]), torch.tensor([[7, 8]])], 3)
    assert not queue
    return r


def test_mtp_engine_bench_speedups_are_spec_over_plain(monkeypatch):
    """Speculative generations decode 4x faster (0.25 s vs 1.0 s, prefill 0.5 s each): the wall-time speed-up
    is (0.5 + 1.0) / (0.5 + 0.25) = 2, the decode-only one 1.0 / 0.25 = 4."""
    g = fake_gen
    r = mtp_engine_bench(monkeypatch, [g(1.0), g(0.25, 0.5, 1), g(1.0), g(0.25, 1.0, 1), g(1.0), g(0.25, 1.0, 1)])
    assert r["speedup"] == pytest.approx(2.0) and r["decode_only_speedup"] == pytest.approx(4.0)
    assert r["greedy_tok_s"] == pytest.approx(6 / 3.0) and r["speculative_tok_s"] == pytest.approx(6 / 1.5)


def test_mtp_bench_pools_acceptance_over_drafts_as_the_decode_bench(monkeypatch):
    """Two prompts, one with 1 speculative step (accepted), one with 3 (none accepted): pooled 1/4, not the
    per-prompt mean 1/2."""
    g = fake_gen
    r = mtp_engine_bench(monkeypatch, [g(), g(1.0, 0.5, 1), g(), g(1.0, 1.0, 1), g(), g(1.0, 0.0, 3)])
    assert r["acceptance_rate"] == 0.25 and r["tokens_per_forward"] == 1.25
    assert r["speedup"] == 1.0 and r["same_tokens_fraction"] == 1.0


def test_report_sections_put_each_value_in_its_column():
    """[metric, DeepSeek choice, conventional, ...]: block-wise FP8 is the DeepSeek choice, tensor-wise the
    conventional; node-limited bytes (800) sit beside the unlimited ones (2000)."""
    r = {
        "fp8": {"rel_loss_error_blockwise": 0.001, "rel_loss_error_tensorwise": 0.02},
        "comm": {"bytes_per_token": {"bf16_max_1_node": 800, "bf16_no_limit": 2000, "fp32_no_limit": 4000}},
    }
    secs = {title: rows for title, rows, _ in sections(r)}
    fp8_row = secs["1. Mixed precision and FP8"][0]
    assert fp8_row[:3] == ["rel. training-loss error vs bf16", 0.001, 0.02]
    comm = secs["4. Communication"]
    assert comm[0][1:3] == [800, 2000]
    assert comm[2][1:3] == [2000, 4000]


def mtp_bench_result(monkeypatch, tmp_path, val: tuple[float, float], eng: list[dict]) -> dict:
    """The mtp bench's `run` with training and decoding stubbed: val losses (no MTP, MTP) for every seed, one
    engine result per seed from `eng` (teacher-forced acceptance 0.5 + seed / 10; train tok/s 300 without MTP,
    200 with)."""
    import nanoseek.bench.mtp as mtp
    from nanoseek.bench.common import Arm, BenchOptions, Report

    def fake_train_arm(opts, slug, seed, keep=False, mtp_depth=0, **kw):
        model = torch.nn.Linear(1, 1)
        model.seed = seed
        trainer = SimpleNamespace(model=model, val=[torch.zeros(2, 9, dtype=torch.long)]) if keep else None
        summary = {"val_loss": val[mtp_depth], "tokens_per_s": 300.0 - 100 * mtp_depth, "tokens": 640}
        summary |= {"val_mtp_loss": 4.0} if mtp_depth else {}
        return Arm(slug, seed, summary, [{"step": 1, "loss": 5.0}], [{"step": 1, "val_loss": val[mtp_depth]}], trainer)

    pending = list(eng)
    monkeypatch.setattr(mtp, "train_arm", fake_train_arm)
    monkeypatch.setattr(mtp, "capture_router", lambda m, on: None)
    monkeypatch.setattr(mtp, "teacher_forced_acceptance", lambda m, b: 0.5 + m.seed / 10)
    monkeypatch.setattr(mtp, "engine_decode_bench", lambda m, p, n: pending.pop(0))
    monkeypatch.setattr(mtp, "plot_lines", lambda *a, **k: None)
    opts = BenchOptions(name="mtp", quick=True, seeds=len(eng), out=tmp_path)
    res = mtp.run(opts, Report("mtp", mtp.TITLE, opts))
    assert not pending
    return res


def _eng(rate, speedup, same, tok_s=100.0):
    return dict(
        acceptance_rate=rate,
        tokens_per_forward=None if rate is None else 1 + rate,
        greedy_tok_s=tok_s,
        speculative_tok_s=tok_s * speedup,
        speedup=speedup,
        decode_only_speedup=speedup + 0.5,
        same_tokens_fraction=same,
        prompts=2,
        new_tokens=8,
        dtype="bf16",
    )


def test_mtp_bench_averages_seeds_and_judges_goals_at_their_bounds(monkeypatch, tmp_path):
    """Two seeds: the engine figures are averaged over seeds (a seed without any speculative step has no
    acceptance and is left out of that mean only); the goals hold exactly at their bounds (Δ val loss 0.02,
    99% same tokens) and the speed-up must be strictly above 1."""
    r = mtp_bench_result(monkeypatch, tmp_path, (0.0, 0.02), [_eng(0.8, 1.2, 1.0), _eng(None, 0.8, 0.98)])
    assert r["acceptance_rate"] == 0.8 and r["tokens_per_forward"] == 1.8
    assert r["speculative_speedup"] == pytest.approx(1.0) and r["speculative_speedup_decode_only"] == 1.5
    assert r["same_tokens_fraction"] == pytest.approx(0.99)
    assert r["acceptance_rate_teacher_forced"] == pytest.approx(0.55)
    assert r["val_loss_delta"] == 0.02 and r["val_loss_no_mtp"] == 0.0 and r["val_loss_mtp"] == 0.02
    assert r["train_cost_ratio"] == 1.5 and r["seeds"] == 2
    met = {g["goal"]: g["met"] for g in r["goals"]}
    assert met["next-token val loss not worse by > 0.02 nats"]
    assert met["speculative decoding reproduces greedy tokens"]
    assert not met["speculative speed-up > 1"]
    r = mtp_bench_result(monkeypatch, tmp_path, (0.0, 0.0201), [_eng(0.5, 1.01, 0.985)])
    met = {g["goal"]: g["met"] for g in r["goals"]}
    assert met == {
        "next-token val loss not worse by > 0.02 nats": False,
        "speculative decoding reproduces greedy tokens": False,
        "speculative speed-up > 1": True,
    }


def test_greedy_agreement_counts_each_row_up_to_its_first_difference():
    """Row 1 differs at position 1 (the equal position 2 after it does not count), row 2 agrees fully, row 3 is
    one token short: (1 + 3 + 2) / 9."""
    a = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert agreement(a, [[1, 0, 3], [4, 5, 6], [7, 8]]) == round(6 / 9, 4)
    assert agreement(a, a) == 1.0 and agreement([], []) == 0.0
