"""Discrete-event simulator of pipeline-parallel schedules: 1F1B, ZB1P, DualPipe and DualPipeV.

Why: DeepSeek-V3 Table 2 (= the DualPipe README table) gives closed-form bubbles. Rather than trust or
re-derive them, we build each schedule's per-rank operation order, play it out under its data dependencies,
and measure. `nanoseek bench comm` prints the result next to the formula (`table`).

Model.
  * A model copy is cut into `pp` stages. 1F1B and ZB1P put stage r on rank r. DualPipe runs two copies
    on `pp` ranks, with micro-batches fed from both ends: rank r holds stage r of copy 0 (stage id r) and
    stage pp-1-r of copy 1 (stage id pp + pp-1-r), and half the micro-batches flow each way. DualPipeV
    ("cut-in-half") uses pp/2 devices: device r holds stages r and pp-1-r of one copy, so a micro-batch
    goes down the devices and back up (a V).
  * Op kinds and durations: F (forward chunk, F), B (full backward = input-grad + weight-grad, B),
    Bi (input-grad only, B - W), W (weight-grad only, W), FB (a forward of one micro-batch overlapped
    with a full backward of another, F&B; default F + B, i.e. no overlap).
  * Dependencies: F(s, m) needs F of the previous stage of m; Bi(s, m) needs F(s, m) and Bi of the next
    stage of m; W(s, m) needs Bi(s, m). A rank runs one op at a time, in its fixed order, as early as its
    inputs allow; `comm` is added when an input comes from another rank. Every output of an op is ready
    at its end (in particular, both halves of an FB pair).
  * Activations: a (stage, micro-batch) activation is held from its F until its W (W needs the saved
    inputs); the peak count per rank is reported, in units of one stage's activations of one micro-batch.

Bubble (what we measure). Per rank: idle = makespan - busy, where busy sums the op durations (an FB pair
counts once, as F&B). The schedule's bubble is the largest per-rank idle (the worst rank), which is what
Table 2 tabulates: every rank does the same work, so the worst rank's idle is the time lost to the
pipeline. Idle at the start (waiting for the first input) and at the end (ranks that finish early) both
count. With comm = 0 it does not depend on the number of micro-batches (for ZB1P, once there are >= PP).

When the formulas are exact (checked by simulation: PP = 2..16, micro-batches 2PP..4PP, comm = 0):
  * 1F1B, (PP-1)(F+B): always.
  * ZB1P, (PP-1)(F+B-2W): with >= PP micro-batches and W <= min(F, B - W), i.e. the deferred W fits in
    the gaps it is meant to fill (the ZB-H1 assumption).
  * DualPipe / DualPipeV, (PP/2-1)(F&B+B-3W): when B - W = F (input-grad chunk as long as a forward
    chunk, the usual B = 2F, W = F split), W <= F and max(F, B) <= F&B <= F + B.
  Outside those regimes the table is an approximation and the simulation is the reference.

Paper check (PP=8, F=1, B=2, W=1): 1F1B 21, ZB1P 7, DualPipe 6 with F&B = F+B = 3 (no overlap) and 3
with perfect overlap. "Perfect overlap" means F&B = max(F, B): the shorter chunk hides entirely under the
longer one. Solving (8/2-1)(F&B + 2 - 3) = 3 gives F&B = 2 = max(1, 2), consistent with that reading.

Per-rank orders. 1F1B: PP-1-r warm-up forwards, then F/B alternation. ZB1P (ZB-H1): like 1F1B with B
split into Bi and W, rank r deferring its first r W's; that keeps PP activations per rank and lets the
deferred W's fill the cool-down bubble. DualPipe(V): the 8 steps of deepseek-ai/DualPipe, with step counts
from half_rank = min(r, PP-1-r): nF0, nF0F1, nB1W1F1, nF0B1F1B0, nB1F1B0, nB1B0, nWB0, nW (DualPipeV:
half_rank = r, with the device count in the role of PP/2 and the last device as the middle); the middle
rank's first F0/B1 of step 4 are not overlapped; the second half of step 6's backwards are split (Bi now,
W later, first-in first-out). Simplification: sends/receives are pure data dependencies; the real code
batches and waits on them around each compute op, which this model ignores.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from nanoseek.errors import NanoseekError

SCHEDULES = ("1F1B", "ZB1P", "DualPipe", "DualPipeV")

Part = tuple[str, int, int]  # ("F" | "Bi" | "W", stage id, micro-batch)


@dataclass(frozen=True)
class Event:
    """One op as it ran: `parts` are the (part, stage, micro-batch) results it produces."""

    rank: int
    kind: str  # "F", "B", "Bi", "W" or "FB"
    start: float
    end: float
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class SimResult:
    schedule: str
    pp: int  # pipeline stages (of one model copy), as in Table 2
    devices: int
    num_microbatches: int
    F: float
    B: float
    W: float
    FB: float
    comm: float
    timeline: tuple[tuple[Event, ...], ...]  # per rank, in execution order
    routes: tuple[tuple[int, ...], ...]  # per micro-batch, the stage ids its forward visits
    stage_rank: tuple[int, ...]  # stage id -> rank
    makespan: float
    busy: tuple[float, ...]
    idle: tuple[float, ...]  # makespan - busy, per rank
    bubble: float  # max(idle): see the module docstring
    peak_activations: tuple[int, ...]

    @property
    def params_per_device(self) -> int:
        """Stages held per device (1 = one stage's parameters, Table 2's "1×")."""
        return max(len({p[1] for e in evs for p in e.parts}) for evs in self.timeline)


def _parts(kind: str, s: int, m: int, s2: int = -1, m2: int = -1) -> tuple[Part, ...]:
    if kind == "F":
        return (("F", s, m),)
    if kind == "Bi":
        return (("Bi", s, m),)
    if kind == "W":
        return (("W", s, m),)
    if kind == "B":
        return (("Bi", s, m), ("W", s, m))
    return (("F", s, m), ("Bi", s2, m2), ("W", s2, m2))  # FB: forward (s, m), backward (s2, m2)


Op = tuple[str, tuple[Part, ...]]


def _order_1f1b(pp: int, n: int) -> list[list[Op]]:
    orders = []
    for r in range(pp):
        warm = min(pp - 1 - r, n)
        ops: list[Op] = [("F", _parts("F", r, m)) for m in range(warm)]
        for b in range(n):
            if warm + b < n:
                ops.append(("F", _parts("F", r, warm + b)))
            ops.append(("B", _parts("B", r, b)))
        orders.append(ops)
    return orders


def _order_zb1p(pp: int, n: int) -> list[list[Op]]:
    # ZB-H1: PP-r forwards before the first backward (as 1F1B), then Bi [W] F; rank r keeps r W's
    # pending, so the activations held stay at PP while the deferred W's fill the cool-down.
    orders = []
    for r in range(pp):
        warm = min(pp - r, n)
        ops: list[Op] = [("F", _parts("F", r, m)) for m in range(warm)]
        nxt_f, nxt_w = warm, 0
        for b in range(n):
            ops.append(("Bi", _parts("Bi", r, b)))
            if b - nxt_w >= r:
                ops.append(("W", _parts("W", r, nxt_w)))
                nxt_w += 1
            if nxt_f < n:
                ops.append(("F", _parts("F", r, nxt_f)))
                nxt_f += 1
        ops += [("W", _parts("W", r, w)) for w in range(nxt_w, n)]
        orders.append(ops)
    return orders


class _RankOps:
    """Builds one DualPipe(V) rank's op list. Phase 0/1 = the rank's first/second stage; each phase walks
    its micro-batches in order for forwards and, separately, for backwards. Split backwards queue their
    W first-in first-out, as DualPipe's WeightGradStore does."""

    def __init__(self, stages: tuple[int, int], mbs: tuple[list[int], list[int]]):
        self.stages, self.mbs = stages, mbs
        self.next_f, self.next_b = [0, 0], [0, 0]
        self.pending_w: deque[tuple[int, int]] = deque()
        self.ops: list[Op] = []

    def _take(self, p: int, counter: list[int]) -> tuple[int, int]:
        m = self.mbs[p][counter[p]]
        counter[p] += 1
        return self.stages[p], m

    def f(self, p: int) -> None:
        self.ops.append(("F", _parts("F", *self._take(p, self.next_f))))

    def b(self, p: int, split: bool = False) -> None:
        s, m = self._take(p, self.next_b)
        if split:
            self.pending_w.append((s, m))
        self.ops.append(("Bi" if split else "B", _parts("Bi" if split else "B", s, m)))

    def w(self) -> None:
        self.ops.append(("W", _parts("W", *self.pending_w.popleft())))

    def fb(self, pf: int, pb: int) -> None:
        (sf, mf), (sb, mb) = self._take(pf, self.next_f), self._take(pb, self.next_b)
        self.ops.append(("FB", _parts("FB", sf, mf, sb, mb)))


def _order_dualpipe(pp: int, n: int, v: bool) -> list[list[Op]]:
    """The 8 steps of DualPipe (v=False, pp ranks) or DualPipeV (v=True, pp/2 devices)."""
    devices = pp // 2 if v else pp
    orders = []
    for r in range(devices):
        if v:  # phase 0: stage r (going down), phase 1: stage pp-1-r (coming back up)
            half, n_half, middle = r, devices, r == devices - 1
            rank = _RankOps((r, pp - 1 - r), (list(range(n)), list(range(n))))
            step4 = n - 2 * devices + r + 1
        else:  # phase 0: the copy in which this rank is in the first half of the pipeline
            half, n_half = min(r, pp - 1 - r), pp // 2
            middle = half == n_half - 1
            fwd, rev = (r, list(range(n // 2))), (2 * pp - 1 - r, list(range(n // 2, n)))
            (s0, m0), (s1, m1) = (fwd, rev) if r < n_half else (rev, fwd)
            rank = _RankOps((s0, s1), (m0, m1))
            step4 = n // 2 - pp + half + 1
        rest = n_half - half - 1
        for _ in range(2 * rest):  # 1: nF0
            rank.f(0)
        for _ in range(half + 1):  # 2: nF0F1
            rank.f(0)
            rank.f(1)
        for _ in range(rest):  # 3: nB1W1F1
            rank.b(1, split=True)
            rank.w()
            rank.f(1)
        for i in range(step4):  # 4: nF0B1F1B0 (overlapped pairs)
            if i == 0 and middle:
                rank.f(0)
                rank.b(1)
            else:
                rank.fb(0, 1)
            rank.fb(1, 0)
        for _ in range(rest):  # 5: nB1F1B0
            rank.b(1)
            rank.fb(1, 0)
        split = False
        for i in range(half + 1):  # 6: nB1B0, second half split for zero bubble
            split = split or (i == (half + 1) // 2 and half % 2 == 1)
            rank.b(1, split)
            split = split or (i == (half + 1) // 2 and half % 2 == 0)
            rank.b(0, split)
        for _ in range(rest):  # 7: nWB0
            rank.w()
            rank.b(0, split=True)
        while rank.pending_w:  # 8: nW
            rank.w()
        orders.append(rank.ops)
    return orders


def _layout(schedule: str, pp: int, n: int) -> tuple[list[list[int]], list[int]]:
    """Routes (stage ids per micro-batch) and the stage -> rank map."""
    if schedule == "DualPipe":
        routes = [list(range(pp)) if m < n // 2 else list(range(pp, 2 * pp)) for m in range(n)]
        return routes, list(range(pp)) + list(range(pp - 1, -1, -1))
    ranks = [min(s, pp - 1 - s) for s in range(pp)] if schedule == "DualPipeV" else list(range(pp))
    return [list(range(pp)) for _ in range(n)], ranks


def _check_args(schedule: str, pp: int, n: int, F: float, B: float, W: float, FB: float, comm: float):
    if schedule not in SCHEDULES:
        raise NanoseekError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if pp < 1 or n < 1:
        raise NanoseekError(f"{schedule}: need pp >= 1 and num_microbatches >= 1 (got pp={pp}, {n})")
    if not (F > 0 and B > 0 and 0 <= W <= B and comm >= 0):
        raise NanoseekError(f"need F > 0, B > 0, 0 <= W <= B, comm >= 0 (got F={F}, B={B}, W={W})")
    if max(F, B) > FB:
        raise NanoseekError(f"F&B={FB} is shorter than max(F, B)={max(F, B)}: an overlap cannot be that fast")
    if schedule.startswith("DualPipe") and (pp < 2 or pp % 2):
        raise NanoseekError(f"{schedule} needs an even number of pipeline stages >= 2 (got pp={pp})")
    if schedule == "DualPipe" and (n % 2 or n < 2 * pp):
        raise NanoseekError(f"DualPipe needs an even num_microbatches >= 2*pp = {2 * pp} (got {n})")
    if schedule == "DualPipeV" and n < pp:
        raise NanoseekError(f"DualPipeV needs num_microbatches >= 2*devices = {pp} (got {n})")


def simulate(
    schedule: str,
    pp: int,
    num_microbatches: int,
    F: float,
    B: float,
    W: float,
    FB: float | None = None,
    comm: float = 0.0,
) -> SimResult:
    """Play out `schedule` and measure makespan, per-rank busy/idle, the bubble and peak activations.

    `pp` is the number of pipeline stages of one model copy (Table 2's PP): pp ranks for all schedules
    but DualPipeV, which uses pp/2. `FB` defaults to F + B (no overlap); `comm` is the latency of each
    cross-rank transfer.
    """
    FB = F + B if FB is None else FB
    n = num_microbatches
    _check_args(schedule, pp, n, F, B, W, FB, comm)
    if schedule == "1F1B":
        orders = _order_1f1b(pp, n)
    elif schedule == "ZB1P":
        orders = _order_zb1p(pp, n)
    else:
        orders = _order_dualpipe(pp, n, v=schedule == "DualPipeV")
    routes, stage_rank = _layout(schedule, pp, n)
    pos = {(s, m): k for m, route in enumerate(routes) for k, s in enumerate(route)}
    dur = {"F": F, "B": B, "Bi": B - W, "W": W, "FB": FB}

    def deps(part: Part) -> list[Part]:
        what, s, m = part
        if what == "W":
            return [("Bi", s, m)]
        k, route = pos[(s, m)], routes[m]
        if what == "F":
            return [("F", route[k - 1], m)] if k else []
        return [("F", s, m)] + ([("Bi", route[k + 1], m)] if k + 1 < len(route) else [])

    ready: dict[Part, tuple[float, int]] = {}  # part -> (end time, rank that produced it)
    timeline: list[list[Event]] = [[] for _ in orders]
    nxt, clock = [0] * len(orders), [0.0] * len(orders)
    left = sum(map(len, orders))
    while left:
        progressed = False
        for r, ops in enumerate(orders):  # run each rank as far as its inputs allow
            while nxt[r] < len(ops):
                kind, parts = ops[nxt[r]]
                needs = [d for p in parts for d in deps(p) if d not in parts]
                if any(d not in ready for d in needs):
                    break
                start = clock[r]
                for d in needs:
                    end, src = ready[d]
                    start = max(start, end + (comm if src != r else 0.0))
                end = start + dur[kind]
                for p in parts:
                    ready[p] = (end, r)
                timeline[r].append(Event(r, kind, start, end, parts))
                clock[r], nxt[r], left, progressed = end, nxt[r] + 1, left - 1, True
        if not progressed:  # a bug in an order builder, not a user error
            raise RuntimeError(f"{schedule}: schedule deadlocks at {[o[i][0] for o, i in zip(orders, nxt)]}")

    makespan = max(clock)
    busy = tuple(sum(e.end - e.start for e in evs) for evs in timeline)
    peaks = []
    for evs in timeline:
        held = peak = 0
        for e in evs:
            held += sum(p[0] == "F" for p in e.parts)
            peak = max(peak, held)
            held -= sum(p[0] == "W" for p in e.parts)
        peaks.append(peak)
    idle = tuple(makespan - b for b in busy)
    return SimResult(
        schedule=schedule,
        pp=pp,
        devices=len(orders),
        num_microbatches=n,
        F=F,
        B=B,
        W=W,
        FB=FB,
        comm=comm,
        timeline=tuple(tuple(evs) for evs in timeline),
        routes=tuple(tuple(r) for r in routes),
        stage_rank=tuple(stage_rank),
        makespan=makespan,
        busy=busy,
        idle=idle,
        bubble=max(idle),
        peak_activations=tuple(peaks),
    )


def bubble_formula(schedule: str, pp: int, F: float, B: float, W: float, FB: float | None = None) -> float:
    """The Table 2 bubble (exact in the regimes listed in the module docstring)."""
    FB = F + B if FB is None else FB
    if schedule == "1F1B":
        return (pp - 1) * (F + B)
    if schedule == "ZB1P":
        return (pp - 1) * (F + B - 2 * W)
    if schedule in ("DualPipe", "DualPipeV"):
        return (pp / 2 - 1) * (FB + B - 3 * W)
    raise NanoseekError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def formula_is_exact(schedule: str, F: float, B: float, W: float, FB: float | None = None) -> bool:
    """Whether `bubble_formula` should equal the simulated bubble (enough micro-batches assumed)."""
    FB = F + B if FB is None else FB
    tol = 1e-9 * max(F, B, 1.0)
    if schedule == "1F1B":
        return True
    if schedule == "ZB1P":
        return min(F, B - W) + tol >= W
    return abs(B - W - F) <= tol and F + tol >= W and max(F, B) - tol <= FB <= F + B + tol


_ACTIVATIONS_TABLE = {"1F1B": 0, "ZB1P": 0, "DualPipe": 1, "DualPipeV": 1}  # PP + this


def table(
    pp: int, F: float, B: float, W: float, FB: float | None = None, num_microbatches: int | None = None
) -> list[dict]:
    """One row per schedule: simulated vs Table 2 bubble, params and activations per device.

    Uses 2*pp micro-batches by default (the least DualPipe accepts; the bubble does not depend on it).
    """
    n = 2 * pp if num_microbatches is None else num_microbatches
    rows = []
    for name in SCHEDULES:
        res = simulate(name, pp, n, F, B, W, FB)
        rows.append(
            {
                "schedule": name,
                "devices": res.devices,
                "microbatches": n,
                "makespan": res.makespan,
                "bubble_sim": res.bubble,
                "bubble_formula": bubble_formula(name, pp, F, B, W, FB),
                "formula_exact": formula_is_exact(name, F, B, W, FB),
                "params_per_device": res.params_per_device,
                "activations_per_device": max(res.peak_activations),
                "activations_table": pp + _ACTIVATIONS_TABLE[name],
            }
        )
    return rows


_GLYPH = {"F": "F", "B": "B", "Bi": "b", "W": "W", "FB": "X"}


def render(result: SimResult, scale: float | None = None) -> str:
    """ASCII timeline, one line per rank: F forward, B full backward, b input-grad, W weight-grad,
    X overlapped F&B pair (labelled with the forward's micro-batch), '.' idle. `scale` = chars per time
    unit; by default the shortest op is just wide enough for its full label (kind + micro-batch id)."""
    if scale is None:
        shortest = min(e.end - e.start for evs in result.timeline for e in evs if e.end > e.start)
        scale = (1 + len(str(result.num_microbatches - 1))) / shortest
    width = math.ceil(result.makespan * scale - 1e-9)
    lines = [
        f"{result.schedule}: pp={result.pp} devices={result.devices} micro-batches={result.num_microbatches} "
        f"makespan={result.makespan:g} bubble={result.bubble:g}"
    ]
    for r, evs in enumerate(result.timeline):
        row = ["."] * width
        for e in evs:
            a, z = round(e.start * scale), round(e.end * scale)
            label = (_GLYPH[e.kind] + str(e.parts[0][2]))[: z - a].ljust(z - a, "-")
            row[a:z] = label
        lines.append(f"{r:>3} |{''.join(row)}| idle={result.idle[r]:g}")
    return "\n".join(lines)
