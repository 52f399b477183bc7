"""Pipeline-schedule simulator: Table 2 bubbles, dependency validity, DualPipe constraints."""

import itertools
from collections import Counter

import pytest

from nanoseek.errors import NanoseekError
from nanoseek.parallel.schedule_sim import (
    SCHEDULES,
    bubble_formula,
    formula_is_exact,
    render,
    simulate,
    table,
)

DUALPIPES = ("DualPipe", "DualPipeV")


def _fb_values(F, B):
    """No overlap, perfect overlap (F&B = max(F, B)) and halfway between."""
    return (F + B, max(F, B), (F + B + max(F, B)) / 2)


@pytest.mark.parametrize(
    ("schedule", "FB", "expected"),
    [("1F1B", None, 21), ("ZB1P", None, 7)]
    + [(s, fb, want) for s in DUALPIPES for fb, want in ((None, 6), (3.0, 6), (2.0, 3))],
)
@pytest.mark.parametrize("n", [16, 24, 40])
def test_paper_check_pp8(schedule, FB, expected, n):
    """DeepSeek-V3 Table 2 at PP=8, F=1, B=2, W=1: 21, 7, 6 (no overlap) and 3 (perfect overlap)."""
    res = simulate(schedule, 8, n, 1.0, 2.0, 1.0, FB)
    assert res.bubble == pytest.approx(expected)
    assert bubble_formula(schedule, 8, 1.0, 2.0, 1.0, FB) == pytest.approx(expected)
    assert res.devices == (4 if schedule == "DualPipeV" else 8)


# (F, B, W) points: inside and outside each formula's exact regime.
_TIMES = [
    (1, 2, 1),
    (2, 3, 1),
    (1, 1.5, 0.5),
    (1, 1, 0),
    (0.5, 1, 0.5),
    (1, 3, 1),
    (3, 4, 1),
    (1.5, 2.5, 0.75),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("pp", [2, 4, 6, 8])
def test_bubble_matches_formula_on_grid(schedule, pp):
    checked = 0
    for (F, B, W), k in itertools.product(_TIMES, (2, 3, 5)):
        n = k * pp
        for FB in _fb_values(F, B) if schedule in DUALPIPES else (None,):
            if not formula_is_exact(schedule, F, B, W, FB):
                continue
            res = simulate(schedule, pp, n, F, B, W, FB)
            assert res.bubble == pytest.approx(bubble_formula(schedule, pp, F, B, W, FB), abs=1e-9), (
                F,
                B,
                W,
                FB,
            )
            checked += 1
    assert checked >= 9


def test_exact_regimes():
    assert formula_is_exact("1F1B", 1, 5, 3)
    assert formula_is_exact("ZB1P", 1, 2, 1) and not formula_is_exact("ZB1P", 1, 3, 2)
    assert formula_is_exact("DualPipe", 1, 2, 1, 2) and not formula_is_exact("DualPipe", 1, 3, 1)
    # Outside the regime the simulation differs from the table (W > F: the deferred W cannot hide).
    assert simulate("ZB1P", 8, 16, 1, 3, 2).bubble > bubble_formula("ZB1P", 8, 1, 3, 2)


def _deps(part, route):
    what, s, m = part
    if what == "W":
        return [("Bi", s, m)]
    k = route.index(s)
    if what == "F":
        return [("F", route[k - 1], m)] if k else []
    return [("F", s, m)] + ([("Bi", route[k + 1], m)] if k + 1 < len(route) else [])


def _check_valid(res):
    """Independent check of a simulated timeline: ordering, ownership, durations, coverage, deps."""
    dur = {"F": res.F, "B": res.B, "Bi": res.B - res.W, "W": res.W, "FB": res.FB}
    parts_of = {"F": ["F"], "B": ["Bi", "W"], "Bi": ["Bi"], "W": ["W"], "FB": ["F", "Bi", "W"]}
    done = {}
    for r, evs in enumerate(res.timeline):
        for prev, e in itertools.pairwise(evs):
            assert prev.end <= e.start + 1e-9, "two ops at once on one rank"
        for e in evs:
            assert e.rank == r and e.end - e.start == pytest.approx(dur[e.kind])
            assert [p[0] for p in e.parts] == parts_of[e.kind]
            for p in e.parts:
                assert res.stage_rank[p[1]] == r, "op on a rank that does not hold its stage"
                assert p not in done, f"{p} computed twice"
                done[p] = e
    # Each part appears once (asserted above); now each (stage, micro-batch) on the route has all three.
    expected = Counter((w, s, m) for m, rt in enumerate(res.routes) for s in rt for w in ("F", "Bi", "W"))
    assert max(expected.values()) == 1 and set(done) == set(expected), "missing or extra F/Bi/W"
    for p, e in done.items():
        for d in _deps(p, list(res.routes[p[2]])):
            if d in e.parts:
                continue
            src = done[d]
            lag = res.comm if src.rank != e.rank else 0.0
            assert src.end + lag <= e.start + 1e-9, f"{p} starts before its input {d} is ready"


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("pp", "k"), [(2, 2), (4, 2), (4, 3), (6, 2), (8, 2), (8, 4)])
@pytest.mark.parametrize(("F", "B", "W", "comm"), [(1, 2, 1, 0.0), (1, 3, 0.5, 0.0), (2, 3, 1, 0.3)])
def test_schedules_are_valid(schedule, pp, k, F, B, W, comm):
    res = simulate(schedule, pp, k * pp, F, B, W, max(F, B), comm=comm)
    _check_valid(res)
    assert res.makespan == pytest.approx(max(e.end for evs in res.timeline for e in evs))
    assert all(i >= -1e-9 for i in res.idle) and res.bubble == pytest.approx(max(res.idle))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("F", "B", "W", "FB"), [(1, 2, 1, 3), (1, 2, 1, 2), (1, 3, 0.5, 3.5), (2, 3, 1, 4)])
def test_bubble_does_not_grow_with_microbatches(schedule, F, B, W, FB):
    pp = 8
    bubbles = [simulate(schedule, pp, k * pp, F, B, W, FB).bubble for k in (2, 3, 4, 6)]
    assert bubbles == pytest.approx([bubbles[0]] * len(bubbles))


@pytest.mark.parametrize("pp", [4, 6, 8])
def test_table(pp):
    rows = table(pp, 1.0, 2.0, 1.0, 2.0)
    assert [r["schedule"] for r in rows] == list(SCHEDULES)
    for r in rows:
        assert r["bubble_sim"] == pytest.approx(r["bubble_formula"]) and r["formula_exact"]
        assert r["activations_per_device"] == r["activations_table"]
    assert [r["params_per_device"] for r in rows] == [1, 1, 2, 2]
    assert [r["activations_table"] for r in rows] == [pp, pp, pp + 1, pp + 1]
    assert [r["devices"] for r in rows] == [pp, pp, pp, pp // 2]


@pytest.mark.parametrize(
    ("schedule", "pp", "n"),
    [
        ("DualPipe", 5, 20),  # odd PP
        ("DualPipeV", 7, 20),
        ("DualPipe", 1, 4),
        ("DualPipe", 8, 15),  # odd number of micro-batches
        ("DualPipe", 8, 14),  # fewer than 2*PP
        ("DualPipeV", 8, 7),  # fewer than 2*devices
        ("1F1B", 4, 0),
        ("GPipe", 4, 8),
    ],
)
def test_bad_arguments(schedule, pp, n):
    with pytest.raises(NanoseekError):
        simulate(schedule, pp, n, 1.0, 2.0, 1.0)


def test_bad_times():
    with pytest.raises(NanoseekError, match="F&B"):
        simulate("DualPipe", 4, 8, 1.0, 2.0, 1.0, FB=1.5)
    with pytest.raises(NanoseekError):
        simulate("ZB1P", 4, 8, 1.0, 2.0, 3.0)
    with pytest.raises(NanoseekError):
        table(5, 1.0, 2.0, 1.0)


def test_render():
    res = simulate("DualPipe", 4, 8, 1.0, 2.0, 1.0, 2.0)
    text = render(res)
    lines = text.splitlines()
    assert len(lines) == 1 + res.devices and "bubble=1" in lines[0]
    assert len({len(line.split("|")[1]) for line in lines[1:]}) == 1
    assert "X" in text and "W" in text and "." in text


@pytest.mark.parametrize(
    ("schedule", "peaks"),
    [("1F1B", (4, 3, 2, 1)), ("ZB1P", (4, 4, 4, 4)), ("DualPipe", (5, 5, 5, 5)), ("DualPipeV", (5, 5))],
)
def test_peak_activations_per_stage(schedule, peaks):
    """PP=4, 8 micro-batches, (F, B, W) = (1, 2, 1): a micro-batch's activations are held from its F until its
    W (the weight gradient still needs them), so ZB1P's deferred W keeps every stage at PP while 1F1B's later
    stages free early; `test_table` only sees the maximum."""
    assert simulate(schedule, 4, 8, 1.0, 2.0, 1.0, 2.0).peak_activations == peaks


def test_comm_delay_only_between_ranks():
    """1F1B, PP=2, 4 micro-batches, (F, B, W) = (1, 2, 1): comm = 0.5 delays only the cross-rank hops (F 0->1,
    B 1->0), making 17 instead of 15; charging it on a stage's own F -> B dependency too would give 18.5."""
    assert simulate("1F1B", 2, 4, 1.0, 2.0, 1.0, comm=0.5).makespan == pytest.approx(17.0)
    assert simulate("1F1B", 2, 4, 1.0, 2.0, 1.0).makespan == pytest.approx(15.0)


def test_zb1p_exact_regime_needs_input_grad_at_least_w():
    """ZB1P's formula needs min(F, B - W) >= W: with (F, B, W) = (2, 3, 2) F >= W holds but B - W = 1 < W, and
    the simulated PP=8 bubble (14) is twice the formula's 7."""
    assert not formula_is_exact("ZB1P", 2, 3, 2)
    assert simulate("ZB1P", 8, 16, 2, 3, 2).bubble == pytest.approx(14.0)
    assert bubble_formula("ZB1P", 8, 2, 3, 2) == pytest.approx(7.0)
