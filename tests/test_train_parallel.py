"""`nanoseek train` under torch.distributed (forked gloo ranks, as torchrun would start them): the loss curve
of EP=2, DP=2 and PP=2 (or 3) runs equals the single-process run on the same global batch."""

import json
import time
import warnings

import pytest
from conftest import TRAIN_OVERRIDES as SMALL

import nanoseek.checkpoint
from nanoseek.errors import NanoseekError
from nanoseek.parallel.launch import run_local
from nanoseek.train import Trainer, train
from nanoseek.train_config import TrainConfig


def cfg(out, corpus, **kw):
    base = dict(
        preset="tiny",
        override=list(SMALL),
        data=str(corpus),
        steps=3,
        batch_size=4,
        seq_len=32,
        eval_every=3,
        save_every=3,
        eval_tokens=231,  # 7 validation rows: a last batch of 3, uneven over 2 pipeline micro-batches
        progress=False,
        out=str(out),
        precision="fp32",
        threads=1,
        seq_aux_alpha=0.0,
    )  # fmt: skip (no balance loss unless a case sets one)
    return TrainConfig(**{**base, **kw})


def _rank_train(rank, world, out, corpus, kw):
    # DDP's deprecation warning (printed twice by every rank) would fail the run
    warnings.filterwarnings("error", message=".*broadcast_buffers", category=FutureWarning)
    kw = dict(kw)
    if "interrupt_after" in kw:  # Ctrl-C on every rank (as torchrun forwards it) once that many steps ran
        stop, real = kw.pop("interrupt_after"), Trainer.train_step

        def dying(self):
            if self.step == stop:
                raise KeyboardInterrupt
            return real(self)

        Trainer.train_step = dying  # a forked rank: the test process keeps the real one
    if kw.pop("disk_full", False):  # rank 0's checkpoint write fails; each rank records how it ended
        if rank == 0:

            def full(*a, **k):
                raise OSError(28, "No space left on device")

            nanoseek.checkpoint.save_model = full
        try:
            train(cfg(out, corpus, **kw))
        except NanoseekError as e:
            (out / f"rank{rank}.error").write_text(str(e))
        return
    if kw.pop("slow_recovery", False):  # rank 0's repair of an interrupted save takes a while
        real = nanoseek.checkpoint.recover_interrupted_saves

        def slow(run_dir):
            time.sleep(1.5)
            return real(run_dir)

        nanoseek.checkpoint.recover_interrupted_saves = slow
        trainer = Trainer(cfg(out, corpus, **kw))
        (out / f"rank{rank}.resumed").write_text(trainer.resume_from.name)
        return
    train(cfg(out, corpus, **kw))


def records(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]


@pytest.mark.parametrize(
    "kw,single_batch",
    [
        (dict(ep=2, batch_size=2), 4),  # EP=2 also splits the data: 2 ranks x 2 rows == 4 rows on one process
        (dict(batch_size=1, grad_accum=2), 4),  # DP=2 (DDP, no_sync on the first micro-batch): 2 x 2 x 1 rows
        (dict(batch_size=1, grad_accum=2, dp_shard=True), 4),  # the same with FSDP2 (sharded weights and moments)
        # DDP with MTP off: the MTP-only weights get no gradient, so DDP must not wait for them
        (dict(batch_size=1, grad_accum=2, mtp_weight=0.0, mtp_weight_late=0.0), 4),
        (dict(ep=2, batch_size=2, dp_shard=True), 4),  # FSDP2 x EP: non-expert weights sharded over the EP ranks
        (dict(pp=2, pp_schedule="dualpipev"), 4),
        (dict(pp=2, pp_schedule="1f1b", mtp_depth=2), 4),  # two chained MTP depths on the last stage
        # gradient accumulation over pipeline calls: each call averages its own micro-batches only
        (dict(pp=2, pp_schedule="1f1b", batch_size=2, grad_accum=2), 2),
        # 3 stages on 3 ranks: the tied MTP embedding is summed by the first and last stage alone
        (dict(pp=3, pp_schedule="1f1b", pp_microbatches=4), 4),
        # the MoE balance losses under PP: each stage adds its own layers' (sequence-wise; batch-level per
        # micro-batch, which equals the single process with as many gradient-accumulation steps)
        (dict(pp=2, pp_schedule="dualpipev", seq_aux_alpha=0.05), 4),
        (dict(pp=2, pp_schedule="1f1b", pp_microbatches=2, balance="aux", aux_alpha=0.05), 4),
        # MTP off: no stage runs the MTP module, but the checkpoint still holds it (generate and --resume load it)
        (dict(pp=2, pp_schedule="1f1b", mtp_weight=0.0, mtp_weight_late=0.0), 4),
        # node-limited routing (2 nodes of 1 rank, 1 node per token) is group-limited routing over 2 groups keeping
        # 1: the single process trains with that config, and the run's checkpoint records it
        (dict(ep=2, batch_size=2, ranks_per_node=1, max_nodes_per_token=1), 4),
    ],
)
def test_distributed_training_matches_single_process(tmp_path, corpus_dir, kw, single_batch):
    keys = ("seq_aux_alpha", "balance", "aux_alpha", "mtp_depth", "mtp_weight", "mtp_weight_late")
    same = {k: kw[k] for k in keys if k in kw}
    if kw.get("balance") == "aux":  # the batch-level loss is per micro-batch: 2 accumulation steps of 2 rows
        same.update(grad_accum=2, batch_size=single_batch // 2)
    else:
        same.update(batch_size=single_batch)
    if kw.get("pp") and kw.get("grad_accum"):  # no data ranks: the single process takes the same batches
        same["grad_accum"] = kw["grad_accum"]
    if kw.get("max_nodes_per_token"):
        same["override"] = [*SMALL, "n_group=2", "topk_group=1"]
    train(cfg(tmp_path / "single", corpus_dir, **same))
    run_local(_rank_train, kw.get("pp", 2), tmp_path / "dist", corpus_dir, kw)
    (s_steps, s_evals), (d_steps, d_evals) = records(tmp_path / "single"), records(tmp_path / "dist")
    assert [r["step"] for r in d_steps] == [1, 2, 3]
    for a, b in zip(s_steps, d_steps):
        assert b["tokens"] == a["tokens"] == a["step"] * 4 * 32, a["step"]  # the global batch, every data rank's
        for k in ("loss", "mtp_loss", "aux_loss", "grad_norm"):
            assert b[k] == (None if a[k] is None else pytest.approx(a[k], rel=1e-4, abs=1e-5)), (k, a["step"])
        if kw.get("seq_aux_alpha") or kw.get("balance") == "aux":
            assert a["aux_loss"] > 0.01  # the balance loss is on, so its gradient path is exercised
    for k in ("val_loss", "val_mtp_loss"):
        want = s_evals[-1][k]
        assert d_evals[-1][k] == (None if want is None else pytest.approx(want, rel=1e-4)), k
    # routing statistics cover every layer (under PP: gathered from all stages, in layer order)
    for a, b in zip(s_steps + s_evals, d_steps + d_evals):
        for k in ("maxvio_batch", "maxvio_batch_layers", "expert_load", "maxvio_global", "val_expert_load"):
            if k in a:
                assert b[k] == (a[k] if "load" in k else pytest.approx(a[k], rel=1e-6)), (k, a["step"])
    # the checkpoint written from the ranks is the single-process layout with the same weights
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "single" / "checkpoints" / "step_0000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "dist" / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert a.keys() == b.keys()
    configs = [json.loads((tmp_path / r / "config.json").read_text()) for r in ("single", "dist")]
    assert configs[0] == configs[1]  # the routing the weights were trained with (node limits included)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-4 * max(1.0, float(a[k].abs().max())), k


def test_sharded_data_parallel_resume_is_exact(tmp_path, corpus_dir, capfd):
    """FSDP2 (--dp-shard): a run interrupted after step 2 and resumed (sharded AdamW moments saved per rank as
    local shards and re-wrapped) continues with the uninterrupted run's losses, bit for bit."""
    kw = dict(batch_size=2, dp_shard=True, eval_every=2, save_every=2, steps=4)
    run_local(_rank_train, 2, tmp_path / "full", corpus_dir, kw)
    capfd.readouterr()
    run_local(_rank_train, 2, tmp_path / "cut", corpus_dir, dict(kw, interrupt_after=2))
    # the hint names the launcher: a plain `nanoseek train` would be one rank
    assert f"continue with `torchrun --nproc-per-node 2 -m nanoseek train --resume --out {tmp_path / 'cut'}`" in (
        capfd.readouterr().err
    )
    # the same world size under another layout (DDP: whole moments, not shards) is refused, naming both
    with pytest.raises(Exception, match="written with pp=1 dp=2 ep=1 dp_shard=True, this run has pp=1 dp=2 ep=1 dp_"):
        run_local(_rank_train, 2, tmp_path / "cut", corpus_dir, dict(kw, resume="latest", dp_shard=False))
    run_local(_rank_train, 2, tmp_path / "cut", corpus_dir, dict(kw, resume="latest"))
    (full, _), (cut, _) = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(full, cut):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]


def test_pipeline_resume_needs_the_same_micro_batches(tmp_path, corpus_dir):
    """A PP checkpoint records its micro-batch count (the loss averaging and the balance losses depend on it):
    resuming with another --pp-microbatches is refused, naming both layouts."""
    kw = dict(pp=2, pp_schedule="1f1b", pp_microbatches=2, steps=2, eval_every=2, save_every=2, eval_tokens=64)
    run_local(_rank_train, 2, tmp_path / "run", corpus_dir, kw)
    layout = "pp=2 dp=1 ep=1 dp_shard=False pp_schedule=1f1b pp_microbatches="
    with pytest.raises(Exception, match=f"written with {layout}2, this run has {layout}4; resume with the same"):
        run_local(_rank_train, 2, tmp_path / "run", corpus_dir, dict(kw, pp_microbatches=4, resume="latest"))


def test_failed_checkpoint_write_stops_every_rank_with_one_error(tmp_path, corpus_dir):
    """Rank 0 cannot write a checkpoint (disk full): it raises the one-line error and the other ranks, told so by
    the save, stop with a NanoseekError too (not printed off rank 0) instead of a transport traceback."""
    run_local(_rank_train, 2, tmp_path / "run", corpus_dir, dict(batch_size=2, steps=1, disk_full=True))
    assert "cannot write the checkpoint" in (tmp_path / "run" / "rank0.error").read_text()
    assert (tmp_path / "run" / "rank1.error").read_text().startswith("rank 0 could not write the checkpoint")


def test_every_rank_resumes_from_the_checkpoint_rank_0_repaired(tmp_path, corpus_dir):
    """The newest checkpoint caught between a save's two renames (step_4 set aside as .old): rank 0 restores it
    before any rank lists the checkpoints, so rank 1 does not resume from step 2 while rank 0 resumes from 4."""
    kw = dict(ep=2, batch_size=2, steps=4, save_every=2, eval_every=4)
    run_local(_rank_train, 2, tmp_path / "run", corpus_dir, kw)
    ck = tmp_path / "run" / "checkpoints"
    (ck / "step_0000004").rename(ck / ".step_0000004.old-123")
    run_local(_rank_train, 2, tmp_path / "run", corpus_dir, dict(kw, steps=6, resume="latest", slow_recovery=True))
    assert [(tmp_path / "run" / f"rank{r}.resumed").read_text() for r in (0, 1)] == ["step_0000004"] * 2
    # a plain single process cannot take the 2 ranks' optimizer states over: the world size is named
    with pytest.raises(NanoseekError, match="step_0000004 was written by 2 ranks, this run has 1"):
        train(cfg(tmp_path / "run", corpus_dir, batch_size=2, steps=6, resume="latest"))
