"""Communication/computation overlap for expert parallelism, and how much of it is real.

V3 (§3.2) hides the all-to-all behind computation by pairing chunks of different micro-batches. The
mechanism here is the simplest form of it, inside one MoE layer: `ExpertParallel(chunks=2)` splits the
tokens in two halves and issues every collective with `async_op=True`, so

    dispatch(A) dispatch(B) | experts(A) | combine(A) | experts(B) | combine(B)
                              ^ B's dispatch in flight   ^ A's combine in flight

(gloo runs the transfers on its own threads, NCCL on its own streams). The backward all-to-alls are
synchronous: only the forward is overlapped.

`measure_overlap` times, on identical inputs and all with the same two halves (so that cache effects of
the smaller halves do not count as overlap): the collectives alone (`t_comm`: count exchange, dispatches,
combines), the layer with the collectives skipped (`t_compute`), the halves one after the other with every
transfer waited at once (`t_serial`, ~ t_comm + t_compute), and the overlapped layer (`t_overlapped`). It
reports the hidden fraction (t_comm + t_compute - t_overlapped) / t_comm: 1 = communication fully hidden,
0 = none, < 0 = overlapping cost more than it hid.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .ep import CommStats, ExpertParallel, fp8_pack


def comm_only(ep: ExpertParallel, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, chunks: int = 1):
    """A closure running exactly the collectives of one forward with `chunks` halves (routing done
    beforehand): one count exchange, every dispatch in flight, then the combines."""
    N, g = x.shape[0], ep.group
    bounds = [(c * N // chunks, (c + 1) * N // chunks) for c in range(chunks)]
    routes = [ep._route(idx[a:b], weights[a:b]) for a, b in bounds]
    send_counts = torch.tensor([rt.send for rt in routes], dtype=torch.long).t().contiguous()
    got = torch.empty_like(send_counts)
    dist.all_to_all_single(got, send_counts, group=g)
    recv = got.t().tolist()
    bufs = []
    for (a, b), rt, rc in zip(bounds, routes, recv):
        xs = x[a:b].index_select(0, rt.tok)
        xs = fp8_pack(xs) if ep.fp8_dispatch else xs
        P, R = len(rt.tok), sum(rc)
        bufs.append(
            (
                xs,
                xs.new_empty(R, xs.shape[1]),
                rt.meta.new_empty(R, rt.meta.shape[1]),
                x.new_empty(R, x.shape[1]),
                x.new_empty(P, x.shape[1]),
            )
        )

    def run() -> None:
        dist.all_to_all_single(torch.empty_like(got), send_counts, group=g)
        works = []
        for (xs, xr, mr, _, _), rt, rc in zip(bufs, routes, recv):
            works.append(dist.all_to_all_single(xr, xs, rc, rt.send, group=g, async_op=True))
            works.append(dist.all_to_all_single(mr, rt.meta, rc, rt.send, group=g, async_op=True))
        back = []
        for i, ((_, _, _, yr, yb), rt, rc) in enumerate(zip(bufs, routes, recv)):
            works[2 * i].wait()
            works[2 * i + 1].wait()
            back.append(dist.all_to_all_single(yb, yr, rt.send, rc, group=g, async_op=True))
        for w in back:
            w.wait()

    return run


def _once(fn, group) -> float:
    """The slowest rank's wall time of one call (ranks start together after a barrier)."""
    dist.barrier(group=group)
    t0 = time.perf_counter()
    fn()
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


@torch.no_grad()
def measure_overlap(
    ep: ExpertParallel, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, repeats: int = 5
) -> dict:
    """Forward-only timings of one EP layer on fixed inputs; collective over the EP group. The four variants
    run round-robin `repeats` times (after one warm-up round) and each reports its median, so that drifting
    machine load affects them alike."""
    saved = (ep.chunks, ep.bench_mode, ep.stats)

    def variant(mode):
        def run():
            ep.chunks, ep.bench_mode = 2, mode
            ep(x, idx, weights)

        return run

    try:
        g, ep.stats = ep.group, CommStats()
        fns = {
            "comm": comm_only(ep, x, idx, weights, chunks=2),
            "compute": variant("compute"),
            "serial": variant("serial"),
            "overlapped": variant(None),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(repeats + 1):
            for k, fn in fns.items():
                t = _once(fn, g)
                if i:
                    times[k].append(t)
    finally:
        ep.chunks, ep.bench_mode, ep.stats = saved
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}

    def hidden(t):
        return (t["comm"] + t["compute"] - t["overlapped"]) / t["comm"]

    return {
        "t_comm_s": med["comm"],
        "t_compute_s": med["compute"],
        "t_serial_s": med["serial"],
        "t_overlapped_s": med["overlapped"],
        "hidden_fraction": hidden(med),
        # the serial baseline hides nothing by construction: its value shows the measurement's error
        "hidden_fraction_serial": (med["comm"] + med["compute"] - med["serial"]) / med["comm"],
        "saved_vs_serial_fraction_of_comm": (med["serial"] - med["overlapped"]) / med["comm"],
        "hidden_fraction_min": hidden(low),  # from each variant's fastest repeat (less load noise)
        "repeats": repeats,
    }
