"""nanoseek.parallel on spawned gloo ranks (CPU, 1 thread per rank): EP, node-limited routing, PP, DP.

Each distributed test spawns its ranks once and checks several things inside them against a single-process
reference computed in the same process (same seed, same batch). Run: python -m pytest -q tests/test_parallel.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from conftest import micro_config

from nanoseek.errors import NanoseekError
from nanoseek.fp8 import TILE_1x128, fake_quant
from nanoseek.model import Transformer
from nanoseek.model.moe import Experts, Gate
from nanoseek.parallel import ParallelPlan
from nanoseek.parallel.ep import ExpertParallel, ep_modules, gather_experts, node_limit_config, nodes_per_token
from nanoseek.parallel.launch import run_local
from nanoseek.parallel.pipeline import lm_loss, split_layers

RTOL, ATOL = 1e-5, 1e-7
MTP_WEIGHT = 0.3


def small_cfg(**kw):
    return micro_config(**{"vocab_size": 256, **kw})


def build_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(small_cfg(**kw))
    with torch.no_grad():  # a non-zero routing bias, as after some training
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


def batch(n: int, T: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 256, (n, T + 1), generator=g)
    return tok[:, :-1], tok[:, 1:]


def mtp_loss(model, x, y):
    main, mtps = model(x, mtp=True)  # through forward, so that a DDP wrapper sees it
    return lm_loss((main, *mtps), y, MTP_WEIGHT)[0]


def reference(model, x, y, max_norm=0.05):
    """Single-process loss, clipped gradients, grad norm and the weights after one SGD step."""
    ref = copy.deepcopy(model)
    loss = mtp_loss(ref, x, y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    return loss.detach(), grads, norm, ref.state_dict()


def close(a, b, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def spawn(fn, world: int = 2, *args):
    """fn(rank, world, *args) on `world` forked gloo ranks, 1 thread each; a rank's failure fails the test."""
    run_local(fn, world, *args)


# ---------------------------------------------------------------------------------- expert parallel
def _ep_run(model, plan, x, y, max_norm=0.05, ddp=False):
    """ddp: run forward/backward through `plan.data_parallel` (DDP + async expert hooks), as training does;
    else the bucketed all-reduce after backward (the pipeline's path)."""
    w = plan.wrap(copy.deepcopy(model))
    run = plan.data_parallel(w) if ddp else w
    assert isinstance(run, torch.nn.parallel.DistributedDataParallel) == (ddp and plan.data_world > 1)
    xs, ys = plan.shard_batch(x), plan.shard_batch(y)
    loss = mtp_loss(run, xs, ys)
    loss.backward()
    plan.sync_grads(w)
    loss = plan.mean_over_data(loss)
    norm = plan.clip_grad_norm_(w, max_norm)
    # clipping again to a bound above the (now clipped) norm scales nothing: the grads below stay the reference's
    again = plan.clip_grad_norm_(w, 1e3)
    assert abs(float(again) - min(float(norm), max_norm)) < 1e-6, (float(again), float(norm))
    grads = gather_experts(w, {n: p.grad for n, p in w.named_parameters()}, grads=True)
    torch.optim.SGD(w.parameters(), lr=0.1).step()
    return w, loss, grads, norm


def _ep_worker(rank, world):
    model = build_model()
    x, y = batch(4)
    ref_loss, ref_grads, ref_norm, ref_state = reference(model, x, y)
    assert ref_norm > 0.05  # clipping is active, so the global norm matters

    for overlap in (False, True):
        plan = ParallelPlan(ep=2, overlap=overlap)
        w, loss, grads, norm = _ep_run(model, plan, x, y)
        tag = f"ep=2 overlap={overlap}"
        assert all(m.n_experts == 4 and m.w13.shape[0] == 4 for m in ep_modules(w))  # half the experts here
        assert all(m.chunks == (2 if overlap else 1) for m in ep_modules(w))
        close(torch.tensor(loss, dtype=torch.float64), ref_loss.double(), f"{tag} loss")
        close(norm, ref_norm, f"{tag} grad norm")
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            close(g, ref_grads[n], f"{tag} grad {n}")
        state = plan.full_state_dict(w)  # a checkpoint from EP ranks == the single-process layout
        assert state.keys() == ref_state.keys()
        for n, v in state.items():
            close(v, ref_state[n], f"{tag} weight {n} after SGD")
        if not overlap:  # and loading it back into a freshly sharded model is exact
            w2 = plan.wrap(copy.deepcopy(model))
            plan.load_full_state_dict(w2, ref_state)
            for n, v in plan.full_state_dict(w2).items():
                assert torch.equal(v, ref_state[n]), n

    # FP8 dispatch: close to, but not equal to, the fp32 result
    plan = ParallelPlan(ep=2, fp8_dispatch=True)
    _, loss, grads, _ = _ep_run(model, plan, x, y)
    rel = abs(loss - float(ref_loss)) / float(ref_loss)
    assert 0 < rel < 2e-3, rel
    num = sum((g - ref_grads[n]).pow(2).sum() for n, g in grads.items()).sqrt()
    den = sum(g.pow(2).sum() for g in ref_grads.values()).sqrt()
    assert 0 < num / den < 5e-2, float(num / den)


def test_expert_parallel_matches_single_process():
    """EP=2 (plain and two-half overlap): loss, clipped grads (experts gathered), grad norm and the gathered
    weights after one SGD step equal the single-process run; FP8 dispatch stays within tolerance."""
    spawn(_ep_worker, 2)


def _traffic_worker(rank, world):
    # fixed routing, hand count: 8 experts over 2 ranks (rank 0: experts 0-3), d = 64, K = 2
    model = build_model()
    plan = ParallelPlan(ep=2, ranks_per_node=1)
    w = plan.wrap(copy.deepcopy(model))
    ep = ep_modules(w)[0]
    idx = torch.tensor([[0, 1], [0, 5], [4, 6], [7, 2], [3, 3]]) if rank == 0 else torch.tensor([[4, 1], [5, 6]])
    wts = torch.full(idx.shape, 0.5)
    x = torch.randn(idx.shape[0], 64)
    for fp8, chunks in ((False, 1), (True, 1), (False, 2)):
        ep.fp8_dispatch, ep.chunks = fp8, chunks
        ep.stats.reset()
        with torch.no_grad():
            ep(x, idx, wts)
        # remote pairs: rank 0 -> rank 1: tokens 1, 2 (experts 4 and 6 sent once), 3; rank 1 -> rank 0: token 0
        remote = 3 if rank == 0 else 1
        row = (64 + 1) if fp8 else 64 * 4  # fp8: E4M3 bytes + one int8 exponent per 128 channels
        meta = 2 * 2 * 4  # K fp32 weights + K expert ids (fp32)
        s = ep.stats
        assert (s.tokens, s.remote_pairs) == (idx.shape[0], remote)
        assert s.dispatch_bytes == remote * (row + meta)
        assert s.combine_bytes == remote * 64 * 4  # the combine stays fp32
        assert s.internode_bytes == s.dispatch_bytes + s.combine_bytes  # 1 rank per node: off-rank = off-node
        assert s.max_nodes == 2
    # the global report: 4 remote pairs over 7 tokens
    ep.fp8_dispatch, ep.chunks = False, 1
    ep.stats.reset()
    with torch.no_grad():
        ep(x, idx, wts)
    rep = plan.comm_report(w)
    assert rep["tokens"] == 7
    assert rep["bytes_per_token"] == pytest.approx(4 * (256 + 16 + 256) / 7)

    # skewed routing: every token of both ranks goes to rank 1's experts, rank 0 receives nothing (its
    # dispatch backward must still run); outputs and gradients equal the single-process experts. With FP8
    # dispatch, they equal the single-process experts on the FP8-rounded inputs: only the dispatched rows are
    # quantised (1x128 tiles, power-of-two scales; gradients pass straight through), the combine stays fp32
    # (an FP8 combine would be off by the output's own rounding, ~1e-2 relative).
    torch.manual_seed(0)
    full = Experts(8, 64, 16)
    torch.nn.init.normal_(full.w13, 0, 0.1)
    torch.nn.init.normal_(full.w2, 0, 0.1)
    for chunks, fp8 in ((1, False), (2, False), (1, True)):
        tag = f"skewed EP chunks={chunks} fp8={fp8}"
        ep = ExpertParallel(full, plan.ep_group, chunks=chunks, fp8_dispatch=fp8)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(6, 64, generator=g, requires_grad=True)
        idx = torch.randint(4, 8, (6, 1), generator=g).repeat(1, 2)
        idx[:, 1] = (idx[:, 0] - 3) % 4 + 4  # two distinct experts, both on rank 1
        wts = torch.rand(6, 2, generator=g, requires_grad=True)
        y = ep(x, idx, wts)
        probe = torch.randn(64, generator=torch.Generator().manual_seed(7))
        (y * probe).sum().backward()
        ref = copy.deepcopy(full)
        xr = fake_quant(x.detach(), TILE_1x128, pow2_scale=True) if fp8 else x.detach().clone()
        assert fp8 == (not torch.equal(xr, x))  # the rounding is real
        xr, wr = xr.requires_grad_(), wts.detach().clone().requires_grad_()
        yr = ref(xr, idx, wr)
        (yr * probe).sum().backward()
        close(y, yr, f"{tag} output")
        close(x.grad, xr.grad, f"{tag} input grad", atol=1e-6)
        close(wts.grad, wr.grad, f"{tag} routing-weight grad")
        grads = gather_experts(ep, {}, grads=True)
        for n in ("w13", "w2"):  # the expert grads hold both ranks' contributions: compare with their sum
            total = getattr(ref, n).grad.clone()
            dist.all_reduce(total)
            close(grads[n], total, f"{tag} {n} grad", atol=1e-6)  # other summation order

    # node-limited routing on a real forward: 2 nodes of 1 rank, at most 1 node per token
    x, _ = batch(8, seed=rank + 5)
    reports = {}
    for m in (None, 1):
        plan = ParallelPlan(ep=2, ranks_per_node=1, max_nodes_per_token=m)
        w = plan.wrap(copy.deepcopy(model))
        with torch.no_grad():
            w.forward_mtp(x)
        reports[m] = plan.comm_report(w)
    assert reports[None]["max_nodes_per_token"] == 2
    assert reports[1]["max_nodes_per_token"] == 1
    assert reports[1]["bytes_per_token"] < reports[None]["bytes_per_token"]


def test_traffic_accounting_and_node_limit_on_ranks():
    """Bytes per token (fp32 and FP8 dispatch) match a hand count on a fixed routing; with 1 rank per node
    and max 1 node per token, no token reaches two nodes (without the limit some do) and bytes drop."""
    spawn(_traffic_worker, 2)


@pytest.mark.parametrize(
    "n_group,topk_group,max_nodes,changed",
    [
        (8, 4, 2, True),
        (8, 2, 2, False),
        (4, 4, 1, True),
        (2, 1, 3, False),
        (2, 1, 2, False),
        (1, 1, 4, False),  # max_nodes == n_nodes: nothing to limit, whatever the groups
        (8, 6, 4, False),
    ],
)
def test_node_limited_gate(n_group, topk_group, max_nodes, changed):
    """32 experts on 8 simulated EP ranks of 2 per node (4 nodes): every token's experts span <= M nodes."""
    cfg = small_cfg(n_routed_experts=32, num_experts_per_tok=4, n_group=n_group, topk_group=topk_group)
    limited = node_limit_config(cfg, n_nodes=4, max_nodes=max_nodes)
    assert (limited is not cfg) == changed
    torch.manual_seed(0)
    gate, free = Gate(limited), Gate(cfg.replace(n_group=1, topk_group=1))
    torch.nn.init.normal_(gate.weight, 0, 0.5)
    free.weight.data.copy_(gate.weight)
    gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(2000, cfg.hidden_size)
    nodes = nodes_per_token(gate(x)[1], 32, 4)
    assert int(nodes.max()) <= min(max_nodes, 4)
    assert int(nodes_per_token(free(x)[1], 32, 4).max()) > max_nodes or max_nodes >= 3


def test_fp8_dispatch_keeps_nonfinite_tiles_nonfinite():
    """FP8 dispatch packs one exponent per 1x128 tile: a tile holding inf (or NaN) arrives as NaN throughout,
    so the receiving rank sees the overflow instead of finite numbers; the other tiles are the FP8 rounding."""
    from nanoseek.parallel.ep import fp8_pack, fp8_unpack

    x = torch.randn(3, 256)
    x[1, 5], x[2, 200] = float("inf"), float("nan")
    packed = fp8_pack(x)
    assert packed.shape == (3, 256 + 2) and packed.dtype == torch.uint8
    y = fp8_unpack(packed, 256, torch.float32)
    bad = torch.zeros(3, 2, dtype=torch.bool)
    bad[1, 0] = bad[2, 1] = True
    assert torch.equal(y.view(3, 2, 128).isnan().all(-1), bad)  # each bad tile is NaN in all 128 columns
    ok = ~bad.repeat_interleave(128, dim=1)
    assert y[ok].isfinite().all()
    assert torch.equal(y[ok], fake_quant(x.nan_to_num(posinf=0.0), TILE_1x128, pow2_scale=True)[ok])


def test_measure_overlap_reports_medians_of_timed_rounds(monkeypatch):
    """`measure_overlap`'s arithmetic on fixed timings (collectives and the EP layer stubbed): the warm-up round
    is dropped, each variant reports its median, hidden = (comm + compute - overlapped) / comm, and the layer's
    chunks, mode and traffic counters are back as they were (its own forwards counted elsewhere)."""
    from types import SimpleNamespace

    from nanoseek.parallel import overlap
    from nanoseek.parallel.ep import CommStats

    class FakeEP(SimpleNamespace):
        def __call__(self, x, idx, weights):
            assert self.chunks == 2
            self.ran = self.bench_mode or "overlapped"
            self.stats.tokens += 1  # counted in the measurement's own stats, not the layer's

    stats = CommStats(tokens=7, dispatch_bytes=100)
    ep = FakeEP(chunks=1, bench_mode=None, stats=stats, group=None, ran=None)
    monkeypatch.setattr(overlap, "comm_only", lambda ep, *a, **k: lambda: setattr(ep, "ran", "comm"))
    base = {"comm": 2.0, "compute": 3.0, "serial": 5.0, "overlapped": 4.0}
    rounds = {k: 0 for k in base}

    def once(fn, group):  # the warm-up round takes 100 s, then 1x, 2x, 3x each variant's base time
        fn()
        r = rounds[ep.ran]
        rounds[ep.ran] += 1
        return 100.0 if r == 0 else base[ep.ran] * r

    monkeypatch.setattr(overlap, "_once", once)
    out = overlap.measure_overlap(ep, torch.zeros(4, 8), torch.zeros(4, 2), torch.zeros(4, 2), repeats=3)
    assert rounds == {k: 4 for k in base}
    assert (out["t_comm_s"], out["t_compute_s"], out["t_serial_s"], out["t_overlapped_s"]) == (4.0, 6.0, 10.0, 8.0)
    assert out["hidden_fraction"] == pytest.approx((4 + 6 - 8) / 4)  # 0.5
    assert out["hidden_fraction_serial"] == pytest.approx(0.0)  # (4 + 6 - 10) / 4
    assert out["saved_vs_serial_fraction_of_comm"] == pytest.approx((10 - 8) / 4)
    assert out["hidden_fraction_min"] == pytest.approx((2 + 3 - 4) / 2)  # the fastest rounds: 1x
    assert out["repeats"] == 3
    assert (ep.chunks, ep.bench_mode) == (1, None)
    assert ep.stats is stats and (stats.tokens, stats.dispatch_bytes) == (7, 100)


# --------------------------------------------------------------------------------- pipeline parallel
def _pp_worker(rank, world, ep, schedules):
    model = build_model()
    x, y = batch(4 * ep)
    ref_loss, ref_grads, ref_norm, ref_state = reference(model, x, y)
    x7, y7 = batch(7, seed=3)  # a short last validation batch: 4 micro-batches of 2, 2, 2 and 1 rows
    with torch.no_grad():
        ref7 = mtp_loss(copy.deepcopy(model), x7, y7)
    for schedule in schedules:
        plan = ParallelPlan(pp=2, ep=ep, pp_schedule=schedule, microbatches=4, mtp_weight=MTP_WEIGHT, overlap=ep > 1)
        w = plan.wrap(copy.deepcopy(model))
        xs, ys = plan.shard_batch(x), plan.shard_batch(y)  # ep > 1: each EP rank of a stage has its own rows
        tag = f"pp=2 ep={ep} {schedule}"
        assert len(w.stages) == (2 if schedule == "dualpipev" else 1)
        ev = plan.mean_over_data(plan.eval_step(w, xs, ys))  # forward only, then a training step
        close(torch.tensor(ev, dtype=torch.float64), ref_loss.double(), f"{tag} eval loss")
        if ep == 1:  # uneven chunks count by their rows (the 1-row chunk weighs 1/7, not 1/4)
            ev7 = plan.eval_step(w, x7, y7)
            close(torch.tensor(float(ev7), dtype=torch.float64), ref7.double(), f"{tag} eval loss on 7 rows")
        assert all(p.grad is None for p in w.parameters())
        loss = plan.train_step(w, xs, ys)
        parts = w.last_parts  # the MTP term is in the loss
        assert parts["mtp_loss"] > 1 and abs(parts["loss"] + MTP_WEIGHT * parts["mtp_loss"] - float(loss)) < 1e-5
        close(torch.tensor(plan.mean_over_data(loss), dtype=torch.float64), ref_loss.double(), f"{tag} loss")
        plan.sync_grads(w)
        norm = plan.clip_grad_norm_(w, 0.05)
        close(norm, ref_norm, f"{tag} grad norm")
        checked = set()
        for s in w.stages:
            grads = gather_experts(s.model, {n: p.grad for n, p in s.model.named_parameters()}, grads=True)
            for n, g in grads.items():
                key = "embed_tokens.weight" if n.endswith("embed_tokens.weight") else n
                close(g, ref_grads[key], f"{tag} rank {rank} grad {n}")
                checked.add(key)
        everyone = [None] * world
        dist.all_gather_object(everyone, checked)
        assert set().union(*everyone) == set(ref_grads), "every parameter lives on some stage"
        torch.optim.SGD(w.parameters(), lr=0.1).step()
        state = plan.full_state_dict(w)
        assert state.keys() == ref_state.keys()
        for n, v in state.items():
            close(v, ref_state[n], f"{tag} weight {n} after SGD")
        w2 = plan.wrap(copy.deepcopy(model))
        plan.load_full_state_dict(w2, ref_state)
        for n, v in plan.full_state_dict(w2).items():
            assert torch.equal(v, ref_state[n]), n
        if w2.mirror is not None:  # the last stage's embedding copy is loaded too
            assert torch.equal(w2.mirror.weight, ref_state["embed_tokens.weight"])
    if ep > 1:  # FP8 dispatch under PP x EP (1F1B): close to, not equal to, the fp32 result, as without PP
        plan = ParallelPlan(pp=2, ep=ep, pp_schedule="1f1b", microbatches=4, mtp_weight=MTP_WEIGHT, fp8_dispatch=True)
        w = plan.wrap(copy.deepcopy(model))
        loss = plan.mean_over_data(plan.train_step(w, plan.shard_batch(x), plan.shard_batch(y)))
        rel = abs(loss - float(ref_loss)) / float(ref_loss)
        assert 0 < rel < 2e-3, rel
        plan.sync_grads(w)
        plan.clip_grad_norm_(w, 0.05)  # as the reference's
        for s in w.stages:
            grads = gather_experts(s.model, {n: p.grad for n, p in s.model.named_parameters()}, grads=True)
            ref = {n: ref_grads["embed_tokens.weight" if n.endswith("embed_tokens.weight") else n] for n in grads}
            num = sum((g - ref[n]).pow(2).sum() for n, g in grads.items()).sqrt()
            den = sum(r.pow(2).sum() for r in ref.values()).sqrt()
            assert 0 < num / den < 5e-2, (rank, float(num / den))
    if ep == 1:  # DualPipeV's split backward cannot run chained MTP depths: refused up front, on every rank
        plan = ParallelPlan(pp=2, pp_schedule="dualpipev", microbatches=4)
        with pytest.raises(NanoseekError, match="dualpipev does not support MTP depth 2 yet"):
            plan.wrap(build_model(num_nextn_predict_layers=2))
        with pytest.raises(NanoseekError, match="world size 2 is not divisible by pp x ep = 3: launch with torchrun"):
            ParallelPlan(ep=3)


def test_pipeline_matches_single_process():
    """PP=2 with DualPipeV (4 stages in a V) and with 1F1B, 4 micro-batches: eval loss, training loss (main +
    0.3 x MTP), every parameter's gradient (tied MTP embedding included), the clipped norm, the weights after
    SGD and a checkpoint round trip equal the single-process run on the same batch."""
    spawn(_pp_worker, 2, 1, ("dualpipev", "1f1b"))


def test_pipeline_and_expert_parallel_compose():
    """PP=2 (DualPipeV, then 1F1B) x EP=2 (two-half overlap) on 4 ranks: the same checks against the single
    process on the doubled batch; with FP8 dispatch (1F1B) loss and gradients within the EP-only tolerances."""
    spawn(_pp_worker, 4, 2, ("dualpipev", "1f1b"))


def test_layout_errors_say_what_to_do_and_print_once(monkeypatch, capsys):
    """A layout that needs ranks says how to launch them; under torchrun (RANK set) only rank 0 prints a user
    error, while every rank exits with code 2."""
    from nanoseek.cli import main

    with pytest.raises(NanoseekError, match=r"--ep 2 needs 2 processes .*`torchrun --nproc-per-node 2 -m nanoseek"):
        ParallelPlan(ep=2)  # a plain single process
    monkeypatch.setenv("RANK", "1")
    assert main(["info", "--seq-len", "0"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["info", "--seq-len", "0"]) == 2
    assert capsys.readouterr().err.count("error:") == 1


def test_split_layers():
    assert split_layers(3, 4) == [[0], [1], [2], []]  # the last stage: norm + head + MTP
    assert split_layers(3, 2) == [[0, 1], [2]]
    assert split_layers(61, 16)[0] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------- data parallel
def _dp_worker(rank, world, ep, modes):
    model = build_model()
    x, y = batch(8)
    ref_loss, ref_grads, ref_norm, ref_state = reference(model, x, y)
    plan = ParallelPlan(ep=ep)
    assert (plan.dp, plan.ep, plan.data_world) == (world // ep, ep, world)
    for ddp in modes:
        w, loss, grads, norm = _ep_run(model, plan, x, y, ddp=ddp)
        tag = f"dp={plan.dp} ep={ep} ddp={ddp}"
        close(torch.tensor(loss, dtype=torch.float64), ref_loss.double(), f"{tag} loss")
        close(norm, ref_norm, f"{tag} grad norm")
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            close(g, ref_grads[n], f"{tag} grad {n}")
        state = plan.full_state_dict(w)
        for n, v in state.items():
            close(v, ref_state[n], f"{tag} weight {n} after SGD")
    # the loss-free balancer must see the global batch's routing counts
    counts = [m.tokens_per_expert.clone() for m in w.moe_layers()]
    plan.reduce_counts(w)
    for m, c in zip(w.moe_layers(), counts):
        total = c.clone()
        dist.all_reduce(total)
        assert torch.equal(m.tokens_per_expert, total)
        assert int(total.sum()) == 8 * (16 - (1 if m is w.mtp[0].mlp else 0)) * 2  # every token, K = 2

    if True in modes:  # gradient accumulation: two micro-batches of 4 rows, communicating only in the second
        ref = copy.deepcopy(model)
        for a in (0, 4):
            (mtp_loss(ref, x[a : a + 4], y[a : a + 4]) / 2).backward()
        w = plan.wrap(copy.deepcopy(model))
        run = plan.data_parallel(w)
        for a, sync in ((0, False), (4, True)):  # no_sync, and the expert hooks quiet, in the first backward
            with plan.accumulate(run, sync=sync):
                (mtp_loss(run, plan.shard_batch(x[a : a + 4]), plan.shard_batch(y[a : a + 4])) / 2).backward()
        plan.sync_grads(w)
        grads = gather_experts(w, {n: p.grad for n, p in w.named_parameters()}, grads=True)
        for n, p in ref.named_parameters():
            close(grads[n], p.grad, f"dp={plan.dp} ep={ep} accumulated grad {n}")


def test_data_parallel_matches_doubled_batch():
    """DP=2, each rank half of an 8-sequence batch == single process on all 8: loss, grads, norm, weights after
    an SGD step, through DistributedDataParallel and through the bucketed all-reduce; routing counts summed
    over ranks; two accumulated micro-batches (`plan.accumulate`) == the single process's accumulated grads."""
    spawn(_dp_worker, 2, 1, (True, False))


def test_expert_and_data_parallel_compose():
    """EP=2 x DP=2 on 4 ranks, through DDP: same checks (expert grads averaged over the DP ranks with the same
    experts by the async hooks, the rest by DDP over all four ranks), and under gradient accumulation the
    hooks, like DDP, stay quiet in the `sync=False` backward (else the first micro-batch would count dp times)."""
    spawn(_dp_worker, 4, 2, (True,))


def _fsdp_worker(rank, world, ep):
    from torch.distributed.tensor import DTensor

    model = build_model()
    x, y = batch(8)
    ref_loss, ref_grads, ref_norm, ref_state = reference(model, x, y)
    plan = ParallelPlan(ep=ep, dp_shard=True)
    w = plan.wrap(copy.deepcopy(model))
    assert plan.data_parallel(w) is w  # sharded in place
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in w.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert local <= total / world + 64 * 16  # each rank holds ~1/world of the model (experts: 1/ep, then 1/dp)
    with plan.accumulate(w, sync=True):
        loss = mtp_loss(w, plan.shard_batch(x), plan.shard_batch(y))
        loss.backward()
    plan.sync_grads(w)
    norm = plan.clip_grad_norm_(w, 0.05)
    # a second clip with a bound above the clipped norm leaves the shards as they are (no scaling up)
    assert abs(float(plan.clip_grad_norm_(w, 1e3)) - min(float(norm), 0.05)) < 1e-6
    close(torch.tensor(plan.mean_over_data(loss), dtype=torch.float64), ref_loss.double(), "fsdp loss")
    close(norm, ref_norm, "fsdp grad norm")
    grads = gather_experts(w, {n: p.grad.full_tensor() for n, p in w.named_parameters()}, grads=True)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        close(g, ref_grads[n], f"fsdp ep={ep} grad {n}")
    torch.optim.SGD(w.parameters(), lr=0.1).step()
    state = plan.full_state_dict(w)
    assert state.keys() == ref_state.keys()
    for n, v in state.items():
        close(v, ref_state[n], f"fsdp ep={ep} weight {n} after SGD")


def test_sharded_data_parallel_matches_doubled_batch():
    """FSDP2 (`dp_shard`), DP=2: each rank stores half of every parameter; loss, every gradient, the clipped global
    norm and the weights after an SGD step equal the single process on the doubled batch."""
    spawn(_fsdp_worker, 2, 1)


def test_sharded_data_parallel_composes_with_expert_parallel():
    """FSDP2 x EP=2 on 4 ranks: experts split over EP, then sharded over the 2 dp ranks holding them (gradient
    divided by dp x ep), the rest sharded over all 4; the same checks."""
    spawn(_fsdp_worker, 4, 2)


def test_comm_bench_quick():
    """`run_comm_bench(quick=True)` (what `nanoseek bench comm` prints): the byte figures order as they must,
    node limits hold, and the timing figures are present and finite."""
    import json
    import math

    from nanoseek.parallel.bench import run_comm_bench

    r = run_comm_bench(quick=True)
    json.dumps(r)  # serialisable
    b = r["bytes_per_token"]
    assert b["fp8_no_limit"] < b["bf16_no_limit"] < b["fp32_no_limit"]
    assert b["bf16_max_1_node"] < b["bf16_max_2_nodes"] < b["bf16_no_limit"]
    assert b["fp8_max_1_node"] < b["fp8_max_2_nodes"] < b["fp8_no_limit"]
    i = r["internode_bytes_per_token"]
    assert i["fp8_max_1_node"] < i["bf16_max_1_node"] < i["bf16_no_limit"]
    for row in r["traffic"]["rows"]:
        assert row["max_nodes_per_token"] <= (row["max_nodes_limit"] or row["nodes"])
    assert math.isfinite(r["hidden_fraction"]) and r["overlap"]["t_comm_s"] > 0
    for s in ("1f1b", "dualpipev"):
        assert r["bubble"][s]["measured_s"] >= 0 and r["bubble"][s]["simulated_s"] > 0
    assert r["bubble"]["dualpipev"]["simulated_s"] < r["bubble"]["1f1b"]["simulated_s"]
