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


def _bf16_case(pairs, first_step_loss):
    """A `tiny` throughput result with one bf16 pass (4 x 64 tokens, 1 MFLOP per token), as bench_preset saves."""
    return {
        "preset": "tiny",
        "batch_size": 4,
        "seq_len": 64,
        "flops_per_token": 1e6,
        "passes": {"bf16": {"pairs": pairs, "first_step_loss": first_step_loss}},
    }


def test_throughput_summarise_picks_median_and_transformers_best_pair():
    """ours = the median over pairs; transformers' best = the pair with the LOWEST speed-up (its best relative
    to ours); the same-precision best skips the fp32 variants in the bf16 pass; the GEMM peak is the median
    of the pass's probes, and the fraction of the run's max peak divides by that max. Error pairs are skipped."""
    pairs = [
        _pair("fp32/grouped_mm", 100.0, 50.0, 2.0, 100.0),
        _pair("bf16-autocast", 110.0, 20.0, 5.5, 200.0),
        _pair("bf16-weights/eager", 90.0, 30.0, 3.0, 300.0),
        {"variant": "bf16-weights/grouped_mm", "error": "boom"},
    ]
    case = _bf16_case(pairs, {"ours": 8.3, "transformers": 8.3})
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


# --- added by the mutation audit: pairing, goals and the report's columns -------------------------------------
def test_timed_pair_times_each_library_separately(monkeypatch):
    """A fake clock: ours' step takes 1 s, transformers' 3 s; the probe is not timed. Each list holds its own
    library's times, one per round, after one warm-up step of each."""
    import nanoseek.bench.throughput as tp

    clock = [0.0]
    calls = []

    def ours():
        calls.append("ours")
        clock[0] += 1.0

    def hf(batch):
        calls.append("hf")
        clock[0] += 3.0

    monkeypatch.setattr(tp, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    t_ours, t_hf, peaks = tp.timed_pair(ours, hf, None, 2, lambda: 7.0)
    assert t_ours == [1.0, 1.0] and t_hf == [3.0, 3.0] and peaks == [7.0, 7.0]
    assert calls == ["ours", "hf"] * 3


def test_bench_preset_pairs_tokens_per_s_speedup_and_batched_mm_skip(monkeypatch, tmp_path):
    """tiny at B=8, T=256 (full run), with the steps, timing and transformers stubbed: ours takes 2 s per step,
    transformers 4 s (fp32 weights) / 3 s (autocast) / 1 s (bf16 weights). tok/s = B·T / median time, speed-up
    = transformers' time / ours; batched_mm is skipped where it gathers > 3 GiB (fp32 elements: 4.5 GiB), run
    with bf16 weights (2.25 GiB)."""
    import transformers

    import nanoseek.bench.throughput as tp
    import nanoseek.hf
    from nanoseek.bench.common import BenchOptions

    class Ours:
        def __init__(self, *a, **k):
            self.trainer = SimpleNamespace(stream=SimpleNamespace(next_batch=lambda n: torch.zeros(n, 257)), model=None)

        def set_batch(self, b):
            pass

        def __call__(self):
            return 8.25

    class Model:
        def to(self, dtype):
            return self

        def set_experts_implementation(self, impl):
            self.impl = impl

    class HF:
        def __init__(self, m, mode):
            self.mode = mode

        def __call__(self, batch):
            return 8.5

    secs = {"fp32": 4.0, "autocast": 3.0, "bf16-weights": 1.0}
    monkeypatch.setattr(tp, "OursStep", Ours)
    monkeypatch.setattr(tp, "HFStep", HF)
    monkeypatch.setattr(tp, "GemmProbe", lambda n: None)
    monkeypatch.setattr(tp, "gemm_gflops", lambda *a: 500.0)
    monkeypatch.setattr(tp, "timed_pair", lambda o, h, b, r, p: ([2.0] * r, [secs[h.mode]] * r, [100.0] * r))
    monkeypatch.setattr(nanoseek.hf, "save_pretrained", lambda *a, **k: None)
    # (the lazy `transformers` module ignores a patched attribute: patch the class's loader)
    monkeypatch.setattr(transformers.DeepseekV3ForCausalLM, "from_pretrained", staticmethod(lambda *a, **k: Model()))
    out = tp.bench_preset(BenchOptions(quick=False, out=tmp_path), "tiny", 8, 256, 3, "tok.json", tmp_path)
    assert out["passes"]["fp32"]["first_step_loss"] == {"ours": 8.25, "transformers": 8.5}
    pairs = {p["variant"]: p for p in out["passes"]["bf16"]["pairs"]}
    assert "error" in pairs["fp32/batched_mm"] and "error" in pairs["autocast/batched_mm"]
    assert "error" not in pairs["bf16-weights/batched_mm"]
    p = pairs["autocast/grouped_mm"]
    assert p["ours_tok_s"] == 8 * 256 / 2.0 and p["transformers_tok_s"] == 8 * 256 / 3.0
    assert p["speedup"] == 1.5 and p["gemm_bf16_gflops"] == 100.0


def _case(preset, speedup, ours_tok_s, probe):
    pair = {"variant": "bf16-weights/grouped_mm", "ours_tok_s": ours_tok_s, "transformers_tok_s": ours_tok_s / speedup}
    pair |= {"speedup": speedup, "gemm_bf16_gflops": probe}
    return {
        "preset": preset,
        "batch_size": 4,
        "seq_len": 64,
        "flops_per_token": 1e9,
        "params": 1,
        "gemm_bf16_gflops": 1.0,
        "passes": {
            "fp32": {"pairs": [{**pair, "variant": "fp32/grouped_mm"}], "first_step_loss": {}},
            "bf16": {"pairs": [pair], "first_step_loss": {}},
        },
    }


def test_train_goals_come_from_small_bf16_at_their_bounds(monkeypatch, tmp_path):
    """A full run: the goals are small bf16's (tiny's 2x speed-up is not judged); a speed-up of exactly 3 and
    exactly 35% of the same-load GEMM peak (0.35 GFLOP/s of 1) both meet "≥"; the run's best peak is the
    highest probe (4 GFLOP/s, tiny's pass)."""
    import nanoseek.bench.throughput as tp
    import nanoseek.data
    import nanoseek.tokenizer
    from nanoseek.bench.common import BenchOptions, Report

    cases = {"tiny": _case("tiny", 2.0, 0.35, 4.0), "small": _case("small", 3.0, 0.35, 1.0)}
    monkeypatch.setattr(tp, "bench_preset", lambda opts, p, *a: cases[p])
    monkeypatch.setattr(tp, "plot_bars", lambda *a, **k: None)
    monkeypatch.setattr(nanoseek.data, "default_corpus", lambda: None)
    monkeypatch.setattr(nanoseek.tokenizer, "get_tokenizer", lambda c, v: SimpleNamespace(save=lambda p: None))
    opts = BenchOptions(name="train", out=tmp_path)
    r = tp.run(opts, Report("train", tp.TITLE, opts))
    assert r["gemm_bf16_peak_gflops"] == 4.0
    assert [(g["goal"], g["value"], g["met"]) for g in r["goals"]] == [
        ("small bf16 ≥ 3x transformers' best", 3.0, True),
        ("small bf16 ≥ 35% of the bf16 GEMM peak", 0.35, True),
    ]


def _full_results():
    return {
        "fp8": {"tokens_per_s_fp8_blockwise": 50.0, "tokens_per_s_bf16": 80.0},
        "mtp": {"val_loss_mtp": 3.1, "val_loss_no_mtp": 3.0},
        "attention": {"arms": [{"label": "MLA", "val_loss": 3.3}, {"label": "MHA", "val_loss": 3.0}]},
        "moe": {
            "arms": [
                {"label": "DeepSeekMoE", "val_loss": 3.0, "train_flops_per_token": 1e6},
                {"label": "dense, same total", "val_loss": 2.9, "train_flops_per_token": 4e6},
            ]
        },
        "balance": {
            "arms": [
                {"label": "loss-free γ=0.001", "balance": "loss-free", "alpha": 0.0, "maxvio_global": 0.04},
                {"label": "loss-free γ=0.01", "balance": "loss-free", "alpha": 0.0, "maxvio_global": 0.06},
                {"label": "aux α=0.001", "balance": "aux", "alpha": 1e-3, "maxvio_global": 0.72},
                {"label": "aux α=0.01", "balance": "aux", "alpha": 1e-2, "maxvio_global": 0.5},
            ]
        },
    }


def test_report_sections_columns_of_every_choice():
    """DeepSeek's choice in column 1, the conventional one in column 2: FP8 vs bf16 tok/s, MTP vs none,
    MLA's loss relative to MHA's ((3.3 - 3) / 3 = 0.1), dense-same-total FLOPs / MoE's (4x), V3's γ first
    against aux α=1e-3."""
    secs = {title: rows for title, rows, _ in sections(_full_results())}
    assert secs["1. Mixed precision and FP8"][2][1:3] == [50.0, 80.0]
    assert secs["2. Multi-token prediction"][0][1:3] == [3.1, 3.0]
    assert secs["3. Multi-head latent attention"][0][3].startswith("0.1 relative")
    moe = secs["5. DeepSeekMoE and auxiliary-loss-free balancing"]
    assert moe[1][3] == "4x the FLOPs"
    assert moe[4][1:3] == [0.04, 0.72] and moe[4][3].startswith("loss-free γ=0.001; loss-free γ=0.01: 0.06")


def test_report_text_lists_smoke_runs_and_unmet_goals(monkeypatch, tmp_path):
    from nanoseek.bench import report as rep
    from nanoseek.bench.common import BenchOptions, Report, goal

    results = {
        "kv": {"bench": "kv", "quick": True, "code": "v1", "goals": [goal("kv goal", 1.0, "= 2", False)]},
        "comm": {"bench": "comm", "quick": False, "code": "v1", "goals": [goal("comm goal", 2.0, "= 2", True)]},
    }
    monkeypatch.setattr(rep, "collect", lambda opts: (results, {}))
    monkeypatch.setattr(rep, "code_version", lambda: "v1")
    monkeypatch.setattr(rep, "summary_figure", lambda r, p: None)
    opts = BenchOptions(name="report", quick=True, out=tmp_path / "report")
    report = Report("report", rep.TITLE, opts)
    r = rep.run(opts, report)
    text = "\n".join(report.parts)
    assert "**Smoke-run results (--quick, not measurements): kv.**" in text and not r["older_code"]
    rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("| kv ") or line.startswith("| comm ")
    }
    assert "NOT met" in rows["kv"] and "NOT met" not in rows["comm"]


def test_report_collect_passes_each_bench_only_its_options(monkeypatch, tmp_path):
    from nanoseek.bench import report as rep
    from nanoseek.bench.common import BenchOptions

    seen = {}

    def fake_run(name, sub):
        seen[name] = (sub.seeds, sub.steps, sub.data, sub.reuse)
        return {"bench": name, "goals": []}

    monkeypatch.setattr("nanoseek.bench.run", fake_run)
    rep.collect(BenchOptions(quick=True, out=tmp_path / "report", seeds=2, steps=3, data="d", reuse=True))
    assert seen["kv"] == seen["comm"] == seen["decode"] == (None, None, None, False)
    assert seen["balance"] == (2, 3, "d", True) and seen["train"] == (None, None, "d", False)


def test_summary_figure_bars_and_colours(monkeypatch, tmp_path):
    """Greedy (gray, 1.0) then speculative (blue, its speed-up); FP8's saved bytes beside bf16's 1.0."""
    import matplotlib.axes

    from nanoseek.bench.report import summary_figure

    bars = []
    real = matplotlib.axes.Axes.bar

    def bar(self, x, h, *a, **k):
        bars.append((list(h), list(k.get("color"))))
        return real(self, x, h, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    summary_figure({"fp8": {"activation_memory_ratio": 0.5}, "mtp": {"speculative_speedup": 1.5}}, tmp_path / "s.png")
    assert bars == [([1.0, 0.5], ["tab:gray", "tab:blue"]), ([1.0, 1.5], ["tab:gray", "tab:blue"])]


def test_throughput_in_pair_tokens_per_s_is_the_closest_pairs_own():
    """Ours' tok/s beside transformers' best is that pair's (120), not the median over pairs (100)."""
    pairs = [
        _pair("fp32/grouped_mm", 120.0, 60.0, 2.0, 100.0),
        _pair("bf16-autocast", 100.0, 20.0, 5.0, 100.0),
        _pair("bf16-weights/eager", 90.0, 30.0, 3.0, 100.0),
    ]
    case = _bf16_case(pairs, {})
    (row,) = summarise(case, 100.0)
    assert row["ours_tok_s"] == 100.0 and row["ours_tok_s_in_pair"] == 120.0
    assert row["ours_tok_s_in_pair"] == row["speedup"] * row["transformers_tok_s"]
