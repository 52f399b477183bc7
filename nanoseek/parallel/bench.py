"""The communication benchmark behind `nanoseek bench comm`: `run_comm_bench(quick) -> dict`.

All figures come from gloo ranks forked on this machine (one thread each):
  * traffic (4 EP ranks): bytes per token per MoE layer moved off-rank (dispatch + combine, actual dtype
    sizes), without a node limit and with node-limited routing (1 or 2 ranks per node, M = 1 or 2), with
    fp32, bf16 (autocast) and FP8 dispatch; plus the most nodes any token reached. Untrained model, so
    routing is close to uniform.
  * overlap (2 EP ranks): one MoE expert layer timed with communication alone, computation alone,
    sequential and two-half overlapped (`overlap.measure_overlap`); the hidden fraction.
  * pipeline (2 ranks): one training step under 1F1B (2 stages) and DualPipeV (4 stages in a V), with every
    forward / backward / weight-grad chunk timestamped. Measured bubble = max over ranks of (makespan - busy);
    simulated bubble = `schedule_sim.simulate` fed with the measured mean chunk times.
On a loaded 2-core machine all timings are noisy; the byte counts are exact.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from ..config import get_preset
from ..model import Transformer
from ..model.moe import Experts
from . import schedule_sim
from .ep import ExpertParallel
from .launch import ParallelPlan, run_local
from .overlap import measure_overlap


def _dump(out: str, rank: int, obj) -> None:
    if rank == 0:
        with open(out, "w") as f:
            json.dump(obj, f)


# ------------------------------------------------------------------------------------------- traffic
def _traffic(rank: int, world: int, out: str, quick: bool) -> None:
    # plain top-4 of 16 experts (no groups), 1 dense + 1 MoE layer + the MoE MTP layer
    cfg = get_preset("tiny", num_hidden_layers=2, n_group=1, topk_group=1, num_experts_per_tok=4)
    torch.manual_seed(0)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, cfg.vocab_size, (2 if quick else 8, 64), generator=g)
    rows = []
    for rpn, m in [(1, None), (1, 2), (1, 1), (2, None), (2, 1)]:
        for dispatch in ("fp32", "bf16", "fp8"):
            plan = ParallelPlan(ep=world, ranks_per_node=rpn, max_nodes_per_token=m, fp8_dispatch=dispatch == "fp8")
            w = plan.wrap(copy.deepcopy(model))
            amp = torch.autocast("cpu", torch.bfloat16) if dispatch != "fp32" else nullcontext()
            with torch.no_grad(), amp:
                w.forward_mtp(tokens)
            r = plan.comm_report(w)
            rows.append(
                {
                    "ranks_per_node": rpn,
                    "nodes": world // rpn,
                    "max_nodes_limit": m,
                    "dispatch": dispatch,
                    "combine": "fp32" if dispatch == "fp32" else "bf16",
                    **r,
                }
            )
    _dump(
        out,
        rank,
        {
            "ep": world,
            "hidden": cfg.hidden_size,
            "experts": cfg.n_routed_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "rows": rows,
        },
    )


# ------------------------------------------------------------------------------------------- overlap
def _overlap(rank: int, world: int, out: str, quick: bool) -> None:
    # narrow experts, so that on loopback gloo the transfers are not negligible next to the GEMMs
    E, d, inter, K = 8, 1024, 16, 2
    N = 2048 if quick else 4096
    torch.manual_seed(0)
    experts = Experts(E, d, inter)
    torch.nn.init.normal_(experts.w13, 0, 0.02)
    torch.nn.init.normal_(experts.w2, 0, 0.02)
    plan = ParallelPlan(ep=world)
    ep = ExpertParallel(experts, plan.ep_group)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(N, d, generator=g)
    idx = torch.rand(N, E, generator=g).topk(K, dim=-1).indices
    wts = torch.rand(N, K, generator=g)
    res = measure_overlap(ep, x, idx, wts, repeats=5 if quick else 15)
    _dump(
        out,
        rank,
        {
            "ep": world,
            "tokens_per_rank": N,
            "hidden": d,
            "experts": E,
            "experts_per_token": K,
            "expert_width": inter,
            **res,
        },
    )


# ------------------------------------------------------------------------------------------ pipeline
def _instrument(pipe, trace: list) -> None:
    """Record (kind, start, end) of every compute chunk of this rank's stages (and of the loss)."""

    def timed(fn, kind):
        def run(*a, **kw):
            t0 = time.perf_counter()
            r = fn(*a, **kw)
            k = kind if kind != "B" or kw.get("full_backward", True) else "I"
            trace.append((k, t0, time.perf_counter()))
            return r

        return run

    for st in pipe.pstages:
        st.forward_one_chunk = timed(st.forward_one_chunk, "F")
        st.backward_one_chunk = timed(st.backward_one_chunk, "B")
        st.backward_weight_one_chunk = timed(st.backward_weight_one_chunk, "W")
    pipe.loss_fn = timed(pipe.loss_fn, "L")


def _pipeline(rank: int, world: int, out: str, quick: bool) -> None:
    cfg = get_preset("tiny", num_hidden_layers=7, vocab_size=1024)  # 7 layers + head: 8 units
    torch.manual_seed(0)
    model = Transformer(cfg)
    n_mb, mb, T = 8, 1, (64 if quick else 128)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg.vocab_size, (n_mb * mb, T + 1), generator=g)
    x, y = tok[:, :-1], tok[:, 1:]
    # one-way latency of an activation transfer (ping-pong), the simulator's `comm`
    act = torch.randn(mb, T, cfg.hidden_size)
    lat = []
    for _ in range(11):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(act, 1)
            dist.recv(act, 1)
        elif rank == 1:
            dist.recv(act, 0)
            dist.send(act, 0)
        lat.append((time.perf_counter() - t0) / 2)
    comm = statistics.median(lat[1:])
    result = {"p2p_latency_s": comm}
    pipes, traces, runs = {}, {}, {}
    for schedule in ("1f1b", "dualpipev"):
        plan = ParallelPlan(pp=world, pp_schedule=schedule, microbatches=n_mb)
        pipes[schedule] = plan.wrap(copy.deepcopy(model))
        pipes[schedule].step(x, y)  # warm-up: shape inference, first-touch allocations
        traces[schedule], runs[schedule] = [], []
        _instrument(pipes[schedule], traces[schedule])
    for _ in range(1 if quick else 5):  # the schedules take turns, so that drifting load hits both alike
        for schedule, pipe in pipes.items():
            trace = traces[schedule]
            pipe.zero_grad(set_to_none=True)
            trace.clear()
            dist.barrier()
            t0 = time.perf_counter()
            pipe.step(x, y)
            t1 = time.perf_counter()
            box = [None] * world
            dist.all_gather_object(box, (t0, t1, list(trace)))
            runs[schedule].append(box)
    for schedule in pipes:
        # the run with the median makespan
        spans = [max(b[1] for b in box) - min(b[0] for b in box) for box in runs[schedule]]
        box = runs[schedule][spans.index(statistics.median_low(spans))]
        start, end = min(b[0] for b in box), max(b[1] for b in box)
        busy = [sum(e - s for _, s, e in b[2]) for b in box]
        idle = [(end - start) - bz for bz in busy]
        ops = [op for b in box for op in b[2]]

        n_units = n_mb * (2 * world if schedule == "dualpipev" else world)
        F = (sum(e - s for k, s, e in ops if k in ("F", "L"))) / n_units  # the loss counts as forward
        B = sum(e - s for k, s, e in ops if k in ("B", "I", "W")) / n_units
        ws = [e - s for k, s, e in ops if k == "W"]
        W = statistics.mean(ws) if ws else B / 2  # 1F1B has no separate weight-grad chunks
        stages = 2 * world if schedule == "dualpipev" else world
        name = "DualPipeV" if schedule == "dualpipev" else "1F1B"
        sim = schedule_sim.simulate(name, stages, n_mb, F, B, min(W, B))
        sim_c = schedule_sim.simulate(name, stages, n_mb, F, B, min(W, B), comm=comm)
        result[schedule] = {
            "stages": stages,
            "ranks": world,
            "microbatches": n_mb,
            "makespan_s": end - start,
            "busy_s": busy,
            "idle_s": idle,
            "bubble_measured_s": max(idle),
            "F_s": F,
            "B_s": B,
            "W_s": W,
            "bubble_simulated_s": sim.bubble,
            "makespan_simulated_s": sim.makespan,
            "bubble_simulated_with_comm_s": sim_c.bubble,
            "makespan_simulated_with_comm_s": sim_c.makespan,
            "bubble_formula_s": schedule_sim.bubble_formula(sim.schedule, stages, F, B, min(W, B)),
        }
    _dump(out, rank, result)


# ------------------------------------------------------------------------------------------- driver
def _run(fn, world: int, quick: bool) -> dict:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        run_local(fn, world, path, quick)
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def run_comm_bench(quick: bool = True) -> dict:
    """Run the three measurements on local gloo ranks; returns one JSON-serialisable dict.

    Headline keys: `bytes_per_token` (off-rank bytes per token per MoE layer; fp32 / bf16 / fp8 dispatch,
    without a node limit and with M = 2 or 1 nodes, 4 ranks of 1 per node), `internode_bytes_per_token`
    (2 nodes of 2 ranks), `hidden_fraction`, and `bubble` (measured vs simulated, per schedule); details
    under `traffic`, `overlap`, `pipeline`."""
    t0 = time.perf_counter()
    traffic = _run(_traffic, 4, quick)
    overlap = _run(_overlap, 2, quick)
    pipeline = _run(_pipeline, 2, quick)
    latency = pipeline.pop("p2p_latency_s")

    def row(rpn, m, dispatch):
        for r in traffic["rows"]:
            if (r["ranks_per_node"], r["max_nodes_limit"], r["dispatch"]) == (rpn, m, dispatch):
                return r
        raise KeyError((rpn, m, dispatch))

    def bpt(rpn, m, dispatch):
        return row(rpn, m, dispatch)["bytes_per_token"]

    def ibpt(rpn, m, dispatch):
        return row(rpn, m, dispatch)["internode_bytes_per_token"]

    return {
        "bench": "comm",
        "quick": quick,
        "bytes_per_token": {
            "fp32_no_limit": bpt(1, None, "fp32"),
            "bf16_no_limit": bpt(1, None, "bf16"),
            "bf16_max_2_nodes": bpt(1, 2, "bf16"),
            "bf16_max_1_node": bpt(1, 1, "bf16"),
            "fp8_no_limit": bpt(1, None, "fp8"),
            "fp8_max_2_nodes": bpt(1, 2, "fp8"),
            "fp8_max_1_node": bpt(1, 1, "fp8"),
        },
        "internode_bytes_per_token": {  # 2 nodes of 2 ranks: the traffic that crosses nodes
            "bf16_no_limit": ibpt(2, None, "bf16"),
            "bf16_max_1_node": ibpt(2, 1, "bf16"),
            "fp8_max_1_node": ibpt(2, 1, "fp8"),
        },
        "hidden_fraction": overlap["hidden_fraction"],
        "bubble": {
            s: {
                "measured_s": p["bubble_measured_s"],
                "simulated_s": p["bubble_simulated_s"],
                "simulated_with_comm_s": p["bubble_simulated_with_comm_s"],
                "makespan_measured_s": p["makespan_s"],
            }
            for s, p in pipeline.items()
        },
        "p2p_latency_s": latency,
        "traffic": traffic,
        "overlap": overlap,
        "pipeline": pipeline,
        "seconds": time.perf_counter() - t0,
    }
