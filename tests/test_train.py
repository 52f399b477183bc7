"""Training: golden losses, bit-identical resume, loss-free balancing, balance/MTP losses, robustness."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_OVERRIDES as SMALL

from nanoseek import NanoseekError, get_preset
from nanoseek.balance import LossFreeBalancer, batch_aux_loss, maxvio, seq_aux_loss
from nanoseek.model.moe import MoE
from nanoseek.train import Trainer, lm_losses, train
from nanoseek.train_config import TrainConfig

GOLDEN = Path(__file__).parent / "assets" / "golden_tiny.json"


def tc(tmp_path, corpus_dir, **kw):
    base = dict(
        preset="tiny",
        override=list(SMALL),
        data=str(corpus_dir),
        steps=6,
        batch_size=2,
        seq_len=32,
        eval_every=3,
        save_every=3,
        eval_tokens=200,
        progress=False,
        out=str(tmp_path / "run"),
        lr=3e-3,
    )
    return TrainConfig(**{**base, **kw})


def step_records(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


STABLE = ("step", "loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "maxvio_batch", "expert_load", "tokens")


def test_golden_losses_of_tiny(tmp_path, corpus_dir):
    """The first steps of the full `tiny` preset under a fixed seed reproduce stored losses (fp32)."""
    cfg = TrainConfig(
        preset="tiny",
        data=str(corpus_dir),
        steps=5,
        batch_size=2,
        seq_len=64,
        eval_every=5,
        save_every=5,
        eval_tokens=130,
        progress=False,
        out=str(tmp_path / "g"),
        precision="fp32",
    )
    train(cfg)
    losses = [round(r["loss"], 5) for r in step_records(tmp_path / "g")]
    if os.environ.get("NANOSEEK_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, abs=2e-4)
    assert losses[0] == pytest.approx(math.log(4096), abs=0.05)  # a fresh model is uniform over the vocabulary
    assert losses[-1] < losses[0] - 0.5  # and it learns


@pytest.mark.parametrize("precision,states", [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")])
def test_resume_is_bit_identical(tmp_path, corpus_dir, monkeypatch, precision, states):
    full = tc(tmp_path / "a", corpus_dir, precision=precision, grad_accum=2, optim_states=states)
    train(full)
    ref = step_records(tmp_path / "a" / "run")
    assert len(ref) == 6

    # the same run, killed during step 5 (after the step-3 checkpoint), then resumed
    real = Trainer.train_step

    def dying(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train(tc(tmp_path / "b", corpus_dir, precision=precision, grad_accum=2, optim_states=states))
    monkeypatch.setattr(Trainer, "train_step", real)
    assert [r["step"] for r in step_records(tmp_path / "b" / "run")] == [1, 2, 3, 4]
    train(tc(tmp_path / "b", corpus_dir, precision=precision, grad_accum=2, optim_states=states, resume="latest"))
    got = step_records(tmp_path / "b" / "run")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ref, got):
        assert {k: a[k] for k in STABLE} == {k: b[k] for k in STABLE}
    # the moments kept their dtype through the resume (torch's loader would cast them to the params' fp32)
    state = torch.load(tmp_path / "b" / "run" / "checkpoints" / "step_0000006" / "trainer_state.pt", weights_only=False)
    moments = [v for st in state["optimizer"][0]["state"].values() for k, v in st.items() if k.startswith("exp_avg")]
    assert {m.dtype for m in moments} == {torch.bfloat16 if states == "bf16" else torch.float32}


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, corpus_dir, monkeypatch):
    t = Trainer(tc(tmp_path, corpus_dir))
    for _ in range(3):
        t.train_step()
    first = t.save()
    t.train_step()

    def boom(*a, **k):
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(torch, "save", boom)
    # the disk's free space is named: torch.save's own message for a full disk ("unexpected pos") does not say so
    with pytest.raises(
        NanoseekError,
        match=rf"killed mid-save \([\d,]+ MiB free on its disk\); the last complete checkpoint is {first}",
    ):
        t.save()
    from nanoseek.checkpoint import list_checkpoints, load_model

    assert list_checkpoints(t.out) == [first]
    assert not [p for p in (t.out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp leftovers
    load_model(first)


def test_resume_edge_cases(tmp_path, corpus_dir):
    """Resuming a finished run does nothing (no re-evaluation logged) and stops below --steps with an error; the
    saved settings never say `resume` (replaying them starts a fresh run); a fresh run refuses a directory
    that holds another run's checkpoints; what a kill left behind (a partial metrics line, save temp dirs, a
    checkpoint caught between the two renames) is repaired."""
    run = tmp_path / "run"
    train(tc(tmp_path, corpus_dir, steps=3))
    lines = (run / "metrics.jsonl").read_text()
    s = train(tc(tmp_path, corpus_dir, steps=3, resume="latest"))
    assert s["steps"] == 3 and s["checkpoint"].endswith("step_0000003") and s["val_loss"] is not None
    assert (run / "metrics.jsonl").read_text() == lines
    assert json.loads((run / "train_config.json").read_text())["resume"] is None
    with pytest.raises(NanoseekError, match="at step 3, past --steps 2"):
        train(tc(tmp_path, corpus_dir, steps=2, resume="latest"))
    with pytest.raises(NanoseekError, match="already holds a run's checkpoints: continue it with --resume"):
        train(tc(tmp_path, corpus_dir, steps=3, seed=1))
    with pytest.raises(NanoseekError, match=r"differ from the checkpoint .*: num_nextn_predict_layers 1 -> 0 "):
        train(tc(tmp_path, corpus_dir, steps=4, resume="latest", mtp_depth=0))
    # a fresh run writes config.json, tokenizer files and metrics here: any other non-empty folder is refused
    other = tmp_path / "hf-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(NanoseekError, match="is a non-empty directory that is not a nanoseek run"):
        train(tc(tmp_path, corpus_dir, steps=1, out=str(other)))
    assert (other / "config.json").read_text() == "{}" and len(list(other.iterdir())) == 1
    with pytest.raises(NanoseekError, match="is a file, not a directory"):
        train(tc(tmp_path, corpus_dir, steps=1, out=str(other / "config.json")))
    died = tmp_path / "died"  # a run that stopped before its first checkpoint starts over in place
    train(tc(tmp_path, corpus_dir, steps=1, out=str(died)))
    shutil.rmtree(died / "checkpoints")
    assert train(tc(tmp_path, corpus_dir, steps=1, out=str(died)))["steps"] == 1

    ck = run / "checkpoints"
    (run / "metrics.jsonl").write_text(lines + '{}\n{"step": 4, "loss": 4.9')  # a stray line; one cut short
    (ck / ".step_0000004.tmp-x1").mkdir()  # a save killed while writing
    (ck / "step_0000003").rename(ck / ".step_0000003.old-77")  # killed between atomic_dir's two renames
    s = train(tc(tmp_path, corpus_dir, steps=4, resume="latest"))
    assert s["steps"] == 4 and sorted(p.name for p in ck.iterdir()) == ["step_0000003", "step_0000004"]
    assert [r["step"] for r in step_records(run)] == [1, 2, 3, 4]


def test_resume_onto_a_read_only_run_directory_is_one_line(tmp_path, corpus_dir, monkeypatch):
    import nanoseek.train as tr
    import nanoseek.train_checkpoint as tcp

    train(tc(tmp_path, corpus_dir, steps=2, save_every=2, eval_every=2))

    def read_only(path, text):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tcp, "atomic_write_text", read_only)  # the trimmed metrics.jsonl, written first
    monkeypatch.setattr(tr, "atomic_write_text", read_only)  # train_config.json
    with pytest.raises(NanoseekError, match=r"--resume: cannot write the run directory .*: Read-only file system"):
        train(tc(tmp_path, corpus_dir, steps=3, resume="latest"))


def test_rewind_sets_newer_checkpoints_aside(tmp_path, corpus_dir):
    """Resuming from an earlier checkpoint (to retry from there with other settings) moves the newer ones and
    their metrics to DIR/abandoned/, so that neither `--resume` nor `nanoseek generate` picks them up."""
    from nanoseek.checkpoint import list_checkpoints, resolve

    run = tmp_path / "run"
    train(tc(tmp_path, corpus_dir, steps=6, save_every=2, eval_every=2))
    ck = run / "checkpoints"
    train(tc(tmp_path, corpus_dir, steps=5, save_every=5, eval_every=5, lr=1e-3, resume=str(ck / "step_0000002")))
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000005"]
    with pytest.raises(NanoseekError, match=f"continues the run in {run}, but --out is {tmp_path / 'other'}"):
        train(tc(tmp_path, corpus_dir, steps=6, resume=str(ck / "step_0000005"), out=str(tmp_path / "other")))
    assert resolve(run)[1] == ck / "step_0000005"
    (aside,) = (run / "abandoned").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_0000004", "step_0000006"]
    assert {json.loads(ln)["step"] for ln in (aside / "metrics.jsonl").read_text().splitlines()} == {3, 4, 5, 6}
    assert [r["step"] for r in step_records(run)] == [1, 2, 3, 4, 5]


def test_resume_trains_with_the_new_lr_weight_decay_and_betas(tmp_path, corpus_dir, capsys):
    """The optimizer and scheduler states hold the lr, weight decay and betas they were built with; a resumed run
    (e.g. a rewind to retry with a lower --lr) must use the new flags, with the lr recomputed from the schedule."""
    from nanoseek.train import Trainer, lr_lambda

    run = tmp_path / "run"
    train(tc(tmp_path, corpus_dir, steps=4, save_every=2, eval_every=4, warmup_steps=2))
    new = tc(tmp_path, corpus_dir, steps=4, save_every=4, eval_every=4, warmup_steps=2, lr=1e-4, weight_decay=0.3)
    new.beta2, new.resume = 0.99, str(run / "checkpoints" / "step_0000002")
    trainer = Trainer(new)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.3, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.99) for g in trainer.optimizer.param_groups)
    f = lr_lambda(new)
    assert trainer.scheduler.get_last_lr() == [1e-4 * f(2)] * 2
    assert "--resume: lr 0.003 -> 0.0001, weight_decay 0.1 -> 0.3, betas (0.9, 0.95) -> (0.9, 0.99)" in (
        capsys.readouterr().err
    )
    trainer.fit()
    lrs = {r["step"]: r["lr"] for r in step_records(run)}
    assert lrs[2] == pytest.approx(3e-3 * f(1)) and lrs[3] == pytest.approx(1e-4 * f(2))
    assert lrs[4] == pytest.approx(1e-4 * f(3))


def test_a_resume_with_other_validation_batches_says_so(tmp_path, corpus_dir, capsys):
    """The checkpoint records a hash of the validation tokens: resuming with another --eval-tokens (or data whose
    validation split changed) notes that val_loss no longer continues the curve; the same batches note nothing."""
    train(tc(tmp_path, corpus_dir, steps=2, save_every=2, eval_every=2))
    capsys.readouterr()
    same = tc(tmp_path, corpus_dir, steps=4, save_every=2, eval_every=2, resume="latest")
    Trainer(same)
    assert "validation batches differ" not in capsys.readouterr().err
    Trainer(tc(tmp_path, corpus_dir, steps=4, save_every=2, eval_every=2, resume="latest", eval_tokens=100))
    step2 = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert f"note: the validation batches differ from those of {step2} (the data or --eval-tokens changed): " in (
        capsys.readouterr().err
    )


def test_corrupt_checkpoint_files_are_one_line_errors(tmp_path, corpus_dir):
    run = tmp_path / "run"
    train(tc(tmp_path, corpus_dir, steps=3))
    last = run / "checkpoints" / "step_0000003"
    state = last / "trainer_state.pt"
    for content in (b"", b"hello"):  # empty; not a torch file
        state.write_bytes(content)
        with pytest.raises(NanoseekError, match=f"cannot read {state}"):
            train(tc(tmp_path, corpus_dir, steps=4, resume="latest"))
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(NanoseekError, match=f"cannot read {weights}"):
        train(tc(tmp_path, corpus_dir, steps=4, resume="latest"))


def test_nan_steps_are_skipped_then_stop(tmp_path, corpus_dir, monkeypatch):
    import nanoseek.train as tr

    calls = {"n": 0}
    real = tr.lm_losses

    def sometimes_nan(model, x, y, use_mtp):
        calls["n"] += 1
        loss, mtp = real(model, x, y, use_mtp)
        return (loss * float("nan"), mtp) if calls["n"] >= 3 else (loss, mtp)

    monkeypatch.setattr(tr, "lm_losses", sometimes_nan)
    t = Trainer(tc(tmp_path, corpus_dir, max_nan_skips=3))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train_step()
    t.train_step()
    after_good = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert any(not torch.equal(before[k], after_good[k]) for k in before)
    rec = t.train_step()
    assert rec["skipped"] and rec["loss"] is None and t.nan_skips == 1
    assert all(torch.equal(after_good[k], v) for k, v in t.model.state_dict().items())  # the step was skipped
    t.train_step()
    with pytest.raises(NanoseekError, match="NaN/inf for 3 consecutive steps"):
        t.train_step()


def test_a_good_step_resets_the_nan_streak(tmp_path, corpus_dir, monkeypatch):
    """--max-nan-skips counts consecutive bad steps: NaN, good, NaN, NaN with a limit of 3 trains on (2 in a
    row at the end), while the total of skipped steps keeps counting."""
    import nanoseek.train as tr

    calls = {"n": 0}
    real = tr.lm_losses

    def nan_on_1_3_4(model, x, y, use_mtp):
        calls["n"] += 1
        loss, mtp = real(model, x, y, use_mtp)
        return (loss * float("nan"), mtp) if calls["n"] in (1, 3, 4) else (loss, mtp)

    monkeypatch.setattr(tr, "lm_losses", nan_on_1_3_4)
    t = Trainer(tc(tmp_path, corpus_dir, max_nan_skips=3))
    skipped = [t.train_step()["skipped"] for _ in range(4)]
    assert skipped == [True, False, True, True]
    assert (t.step, t.nan_skips, t.consecutive_nan) == (4, 3, 2)


def test_a_skipped_step_leaves_no_expert_counts_behind(tmp_path, corpus_dir, monkeypatch):
    """The loads a NaN step routed are dropped with it: the next good step's loss-free update (and its logged
    loads) see that step's tokens only."""
    import nanoseek.train as tr

    calls = {"n": 0}
    real = tr.lm_losses

    def second_is_nan(model, x, y, use_mtp):
        calls["n"] += 1
        loss, mtp = real(model, x, y, use_mtp)
        return (loss * float("nan"), mtp) if calls["n"] == 2 else (loss, mtp)

    monkeypatch.setattr(tr, "lm_losses", second_is_nan)
    t = Trainer(tc(tmp_path, corpus_dir))
    cfg = t.core.cfg
    per_step = 2 * 32 * cfg.num_experts_per_tok  # batch x seq_len tokens, K copies each
    for skipped in (False, True, False):
        assert bool(t.train_step().get("skipped")) == skipped
    assert [int(c.sum()) for c in t.balancer.last_main] == [per_step] * len(t.balancer.last_main)


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    from nanoseek.train import lr_lambda

    f = lr_lambda(TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1) and f(150) == pytest.approx(0.1)
    assert f(32.5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # a quarter of the cosine


def test_mtp_weight_drops_at_the_given_step(tmp_path, corpus_dir):
    train(tc(tmp_path, corpus_dir, steps=4, mtp_weight=0.3, mtp_weight_late=0.1, mtp_weight_drop_step=2))
    assert [r["mtp_weight"] for r in step_records(tmp_path / "run")] == [0.3, 0.3, 0.1, 0.1]


def test_loss_free_balancing_without_a_routing_bias_says_so(tmp_path, corpus_dir, capsys):
    """A greedy router (V2 style) has no bias for the default --balance loss-free to move: a note, not silence."""
    from nanoseek.train import Trainer

    Trainer(tc(tmp_path, corpus_dir, override=[*SMALL, "topk_method=greedy"]))
    assert "note: --balance loss-free needs a routing bias (topk_method noaux_tc); this model's is greedy" in (
        capsys.readouterr().err
    )
    Trainer(tc(tmp_path / "b", corpus_dir, out=str(tmp_path / "b")))
    assert "needs a routing bias" not in capsys.readouterr().err


def test_a_tokenizer_smaller_than_the_model_vocab_or_lossy_is_noted(tmp_path, corpus_dir, capsys):
    """A corpus too small for vocab_size BPE ids leaves head rows that are never trained: a note says how many
    (generate never emits them, tests/test_engine.py); a corpus that fills the vocabulary prints nothing."""
    t = Trainer(tc(tmp_path, corpus_dir, override=[*SMALL, "vocab_size=20000"]))
    n = t.tok.vocab_size
    assert 257 < n < 20000
    assert f"note: this corpus supports a {n}-token BPE, the model has 20000 ids: the other {20000 - n} are never" in (
        capsys.readouterr().err
    )
    b = tc(tmp_path / "b", corpus_dir, out=str(tmp_path / "b"), override=[*SMALL, "vocab_size=400"])
    assert Trainer(b).tok.vocab_size == 400
    assert "BPE" not in capsys.readouterr().err
    # a given tokenizer that loses text (no byte fallback, whitespace pre-tokenizer) is noted too
    import tokenizers
    from tokenizers import models, pre_tokenizers

    ws = tokenizers.Tokenizer(models.BPE())
    ws.pre_tokenizer = pre_tokenizers.Whitespace()
    ws.train_from_iterator(["def f(x): return x"], tokenizers.trainers.BpeTrainer(special_tokens=["</s>"]))
    ws.save(str(tmp_path / "ws.json"))
    Trainer(tc(tmp_path / "c", corpus_dir, out=str(tmp_path / "c"), tokenizer=str(tmp_path / "ws.json")))
    assert f"note: --tokenizer {tmp_path / 'ws.json'} is lossy (" in capsys.readouterr().err


def test_mtp_weight_zero_turns_mtp_off(tmp_path, corpus_dir):
    """--mtp-weight 0 without a drop step: no MTP forward (no mtp_loss), the MTP weights untouched, even though
    --mtp-weight-late keeps its default 0.1 (it applies only after a --mtp-weight-drop-step)."""
    from nanoseek.train import Trainer

    t = Trainer(tc(tmp_path, corpus_dir, mtp_weight=0.0))
    before = {k: v.clone() for k, v in t.core.state_dict().items() if k.startswith("mtp.")}
    assert not t.use_mtp and t.train_step()["mtp_loss"] is None
    assert all(torch.equal(v, t.core.state_dict()[k]) for k, v in before.items())
    late = Trainer(tc(tmp_path / "b", corpus_dir, mtp_weight=0.0, mtp_weight_drop_step=2, out=str(tmp_path / "b")))
    assert late.use_mtp  # weight 0.1 from step 2 on


def test_loss_free_bias_lowers_an_overloaded_expert_and_maxvio_falls():
    cfg = get_preset("tiny", hidden_size=32, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, 0, 0.05)
    with torch.no_grad():
        moe.gate.weight[0] += 0.3  # a skewed router: expert 0 wins for most inputs
    holder = torch.nn.Sequential(moe)
    bal = LossFreeBalancer(holder, rate=1e-2)
    x = torch.randn(256, 32) + 1.0
    vios = []
    for _ in range(150):
        with torch.no_grad():
            moe(x)
        bal.step()
        vios.append(bal.maxvio_batch()[0])
    bias = moe.gate.e_score_correction_bias
    steps = float(bias[0]) / bal.rate
    assert abs(steps - round(steps)) < 1e-3  # moved in whole ±gamma steps (sign rule, not proportional)
    assert bias[0] < -0.3 and bias[0] == bias.min()  # the overloaded expert's bias went down the most
    assert vios[0] > 2.0 and max(vios[-20:]) < 0.5  # MaxVio fell from heavy imbalance to near balance
    assert moe.gate.weight.grad is None  # the update never touched the gate weights or autograd


def test_balancer_leaves_idle_layers_alone_and_reports_main_layers_only():
    """A layer that counted no tokens this step (e.g. an MTP layer on a step without MTP) keeps its bias under the
    proportional rule (0/0 would make it NaN for good); MaxVio_batch covers the main model's layers, not MTP's."""
    from conftest import micro_config

    from nanoseek.model import Transformer

    m = Transformer(micro_config())
    bal = LossFreeBalancer(m, rate=1e-2, rule="proportional")
    bal.step()  # nothing counted anywhere
    assert all(torch.equal(moe.gate.e_score_correction_bias, torch.zeros_like(moe.gate.e_score_correction_bias))
               for moe in bal.layers)  # fmt: skip
    with torch.no_grad():
        m.forward_mtp(torch.randint(0, 300, (2, 16)))
    main = [moe.tokens_per_expert.clone() for moe in bal.layers[: bal.n_main]]
    assert len(bal.layers) > bal.n_main and all(int(moe.tokens_per_expert.sum()) > 0 for moe in bal.layers)
    bal.step()
    assert bal.maxvio_batch() == [maxvio(c) for c in main]


def test_proportional_bias_rule_moves_by_the_relative_load_error():
    """`--bias-update proportional`: b_i += γ (mean − load_i) / mean, so one step is exactly that (not ±γ), and
    repeated steps balance the skewed router too."""
    cfg = get_preset("tiny", hidden_size=32, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, 0, 0.05)
    with torch.no_grad():
        moe.gate.weight[0] += 0.3
    bal = LossFreeBalancer(torch.nn.Sequential(moe), rate=1e-2, rule="proportional")
    x = torch.randn(256, 32) + 1.0
    with torch.no_grad():
        moe(x)
    counts = moe.tokens_per_expert.clone().double()
    bal.step()
    want = 1e-2 * (counts.mean() - counts) / counts.mean()
    assert torch.allclose(moe.gate.e_score_correction_bias.double(), want, atol=1e-7)
    assert want.abs().max() > 2e-2  # far from balance: steps larger than the sign rule's ±γ
    for _ in range(150):
        with torch.no_grad():
            moe(x)
        bal.step()
    assert bal.maxvio_batch()[0] < 0.5
    with pytest.raises(ValueError, match="bias update rule"):
        LossFreeBalancer(torch.nn.Sequential(moe), rule="median")


def test_sign_rule_balances_median_batch_loads_proportional_balances_the_mean():
    """Why the proportional rule balances better on small batches: the sign rule stops moving when an expert is
    over the mean load in half of the batches (its *median* batch load is the mean), the proportional one when
    its *expected* load is. Batches whose content favours expert 0 one time in four (as a batch of a few files'
    text can) leave it over-loaded on the whole stream under the sign rule, not under the proportional one."""
    cfg = get_preset("tiny", hidden_size=32, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2)
    torch.manual_seed(0)
    base = MoE(cfg)
    torch.nn.init.normal_(base.gate.weight, 0, 0.05)
    towards_0 = base.gate.weight[0].detach() / base.gate.weight[0].norm()

    def batch(g: torch.Generator, favours_0: bool) -> torch.Tensor:
        return torch.randn(128, 32, generator=g) + (2.0 * towards_0 if favours_0 else 0.0)

    loads = {}
    for rule, rate in (("sign", 2e-3), ("proportional", 2e-2)):
        moe = MoE(cfg)
        moe.load_state_dict(base.state_dict())
        bal = LossFreeBalancer(torch.nn.Sequential(moe), rate=rate, rule=rule)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(600):
                moe(batch(g, bool(torch.rand(1, generator=g).item() < 0.25)))
                bal.step()
            moe.tokens_per_expert.zero_()  # the load over a long stream with the same mix, bias fixed
            g = torch.Generator().manual_seed(2)
            for i in range(200):
                moe(batch(g, i % 4 == 0))
        loads[rule] = moe.tokens_per_expert.double() / moe.tokens_per_expert.double().mean()
    assert loads["sign"][0] > 1.3  # measured 1.54
    assert maxvio(loads["proportional"]) < 0.15  # measured 0.083 (the rest is sampling noise)


def test_bias_update_schedule_lr_scales_gamma_like_the_learning_rate(tmp_path, corpus_dir):
    """`--bias-update-schedule lr`: each step moves every bias by exactly ±γ·lr_t/lr (warm-up included), where
    the constant schedule moves it by ±γ; a bad value is a one-line error."""
    moved = {}
    for schedule in ("constant", "lr"):
        t = Trainer(
            tc(tmp_path / schedule, corpus_dir, bias_update_rate=0.01, bias_update_schedule=schedule, warmup_steps=4)
        )
        bias = t.balancer.layers[0].gate.e_score_correction_bias
        steps = []
        for _ in range(3):
            before, lr = bias.clone(), t.scheduler.get_last_lr()[0]
            t.train_step()
            steps.append(((bias - before).abs().max().item(), lr / t.tc.lr))
        moved[schedule] = steps
    assert [m for m, _ in moved["constant"]] == pytest.approx([0.01] * 3, abs=1e-6)
    assert [s for _, s in moved["lr"]] == pytest.approx([0.25, 0.5, 0.75])  # the warm-up
    assert [m for m, _ in moved["lr"]] == pytest.approx([0.0025, 0.005, 0.0075], abs=1e-6)
    with pytest.raises(NanoseekError, match="--bias-update-schedule"):
        Trainer(tc(tmp_path / "bad", corpus_dir, bias_update_schedule="cosine"))


def test_seq_aux_loss_and_batch_loss_equal_hand_computation():
    torch.manual_seed(3)
    B, T, E, K, alpha = 2, 5, 4, 2, 0.1
    scores = torch.rand(B * T, E)
    idx = scores.topk(K, -1).indices
    got = seq_aux_loss(scores, idx, (B, T), alpha)
    expect = 0.0
    for b in range(B):
        for i in range(E):
            f = E / (K * T) * sum(int(i in idx[b * T + t].tolist()) for t in range(T))
            p = sum(float(scores[b * T + t, i] / scores[b * T + t].sum()) for t in range(T)) / T
            expect += alpha * f * p
    assert float(got) == pytest.approx(expect / B, rel=1e-6)
    f_all = [E / (K * B * T) * int((idx == i).sum()) for i in range(E)]
    p_all = (scores / scores.sum(-1, keepdim=True)).mean(0)
    assert float(batch_aux_loss(scores, idx, alpha)) == pytest.approx(
        alpha * sum(f * float(p) for f, p in zip(f_all, p_all)), rel=1e-6
    )
    assert maxvio(torch.tensor([4, 4, 4, 4])) == 0.0 and maxvio(torch.tensor([8, 0, 4, 4])) == 1.0


def test_mtp_loss_equals_hand_computation():
    from nanoseek.model import Transformer

    m = Transformer(
        get_preset(
            "tiny",
            hidden_size=32,
            vocab_size=50,
            num_hidden_layers=2,
            num_nextn_predict_layers=2,
            n_routed_experts=4,
            n_group=1,
            topk_group=1,
            init_std=0.1,
        )
    )
    tokens = torch.randint(0, 50, (2, 11))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        loss, mtp = lm_losses(m, x, y, use_mtp=True)
        main, logits = m.forward_mtp(x)
    for k, lg in enumerate(logits):
        # depth k+1 at position i predicts token t_{i+k+2}, i.e. tokens[:, i+k+2]
        nll = [-torch.log_softmax(lg[b, i], -1)[tokens[b, i + k + 2]] for b in range(2) for i in range(10 - k - 1)]
        assert float(mtp[k]) == pytest.approx(float(torch.stack(nll).mean()), rel=1e-5)
    assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(main.reshape(-1, 50), y.reshape(-1))))


def test_config_replay_and_explicit_flags_win(tmp_path, corpus_dir):
    from nanoseek.cli import build_parser
    from nanoseek.train_config import from_args

    first = tc(tmp_path, corpus_dir, steps=2, eval_every=2, save_every=2)
    train(first)
    saved = tmp_path / "run" / "train_config.json"
    assert json.loads(saved.read_text())["steps"] == 2
    args = build_parser().parse_args(["train", "--config", str(saved), "--lr", "0.01"])
    replay = from_args(args)
    assert replay.lr == 0.01 and replay.steps == 2 and replay.override == SMALL and replay.data == str(corpus_dir)
    # a file that says how its run was started (older versions wrote "resume" after a resume) replays fresh
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "resume": "latest"}))
    assert from_args(build_parser().parse_args(["train", "--config", str(saved)])).resume is None


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "nanoseek", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )


def test_bad_inputs_give_one_line_errors(tmp_path, corpus_dir):
    cases = [
        (["train", "--data", str(tmp_path / "missing")], "missing"),
        (["train", "--steps", "0"], "--steps must be >= 1"),
        (["train", "--override", "no_such_field=3"], "'no_such_field' is not a ModelConfig field"),
        (["train", "--resume", str(tmp_path / "nothing")], "no checkpoint found"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["train", "--data", str(empty)], str(empty)))
    for argv, needle in cases:
        r = run_cli(*argv, "--out", str(tmp_path / "o"), "--no-progress")
        assert r.returncode == 2, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (argv, r.stderr)
    # a tokenizer larger than the model's vocabulary
    import random

    from nanoseek.tokenizer import train_tokenizer

    rng = random.Random(0)
    text = " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 9))) for _ in range(20000)
    )
    with pytest.raises(NanoseekError, match="--seq-len 32 exceeds the model's max_position_embeddings 16"):
        Trainer(tc(tmp_path, corpus_dir, override=[*SMALL, "max_position_embeddings=16"]))
    big = train_tokenizer([text], 600)
    assert big.vocab_size == 600
    big.save(tmp_path / "tok.json")
    with pytest.raises(NanoseekError, match="model's vocab_size is 512"):
        Trainer(tc(tmp_path, corpus_dir, tokenizer=str(tmp_path / "tok.json")))


def test_run_keeps_its_tokenizer_and_eos(tmp_path, corpus_dir, capsys):
    """A foreign tokenizer whose EOS is named only by its tokenizer_config.json keeps that EOS in the run and its
    checkpoints (generate and convert read them); resuming uses the run's copy, not --tokenizer's path, which
    may be gone or changed by then."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from nanoseek.checkpoint import list_checkpoints
    from nanoseek.tokenizer import Tokenizer

    def foreign(path: Path, vocab: int) -> None:
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|im_end|>"], initial_alphabet=alphabet)
        tok.train_from_iterator([p.read_text() for p in sorted(corpus_dir.rglob("*.py"))], trainer)
        path.mkdir()
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))

    foreign(tmp_path / "tok", 400)
    ext = tmp_path / "tok" / "tokenizer.json"
    train(tc(tmp_path, corpus_dir, steps=2, save_every=2, tokenizer=str(ext)))
    run = tmp_path / "run"
    (step2,) = list_checkpoints(run)
    for d in (run, step2):
        assert Tokenizer.from_file(d / "tokenizer.json").eos_token == "<|im_end|>"
    shutil.rmtree(tmp_path / "tok")  # the external file is gone: resume with the run's own copy
    train(tc(tmp_path, corpus_dir, steps=3, save_every=1, tokenizer=str(ext), resume="latest"))
    assert (
        f"note: --tokenizer {ext} is gone or changed; resuming with {step2}/tokenizer.json" in capsys.readouterr().err
    )
    foreign(tmp_path / "tok", 300)  # another tokenizer at that path: still the run's
    s = train(tc(tmp_path, corpus_dir, steps=4, save_every=1, tokenizer=str(ext), resume="latest"))
    assert (Path(s["checkpoint"]) / "tokenizer.json").read_bytes() == (step2 / "tokenizer.json").read_bytes()


def test_fp8_training_stays_finite_and_close_to_bf16(tmp_path, corpus_dir):
    runs = {}
    for precision in ("bf16", "fp8"):
        train(tc(tmp_path / precision, corpus_dir, precision=precision, steps=4, eval_every=4, save_every=4))
        runs[precision] = [r["loss"] for r in step_records(tmp_path / precision / "run")]
    assert all(math.isfinite(v) for v in runs["fp8"])
    for a, b in zip(runs["bf16"], runs["fp8"]):
        assert abs(a - b) < 2e-3 * a  # measured: within 0.006% over the first steps
    assert runs["fp8"] != runs["bf16"]  # the FP8 path really ran


def test_bf16_optimizer_states(tmp_path, corpus_dir):
    t = Trainer(tc(tmp_path, corpus_dir, optim_states="bf16"))
    t.train_step()
    states = [s for s in t.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.bfloat16 for s in states)


def test_compiled_training_matches_eager(tmp_path, corpus_dir):
    """`--compile` (fp32, so the MoE experts take the padded-bmm path: compile cannot trace fp32 grouped GEMMs
    in torch 2.13) gives the eager losses."""
    eager = train(tc(tmp_path / "e", corpus_dir, steps=2, precision="fp32", out=str(tmp_path / "e")))
    comp = train(tc(tmp_path / "c", corpus_dir, steps=2, precision="fp32", compile=True, out=str(tmp_path / "c")))
    assert eager["steps"] == comp["steps"] == 2
    for a, b in zip(step_records(tmp_path / "e"), step_records(tmp_path / "c")):
        for k in ("loss", "mtp_loss", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a["step"])


@pytest.mark.parametrize("scale", [0.3, 0.999999, 1.0, 5.0, float("nan")])
def test_clip_grad_norm_if_over_matches_torch_bit_for_bit(scale):
    """The trainer's clip skips torch's multiply-by-1 pass, and otherwise is torch's clip exactly."""
    from nanoseek.parallel.launch import clip_grad_norm_if_over

    torch.manual_seed(0)
    mods = [torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)]
    mods[1].load_state_dict(mods[0].state_dict())
    grads = [torch.randn_like(p) for p in mods[0].parameters()]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    for m in mods:
        for p, g in zip(m.parameters(), grads):
            p.grad = g * (scale / total)
    want = torch.nn.utils.clip_grad_norm_(mods[0].parameters(), 1.0)
    got = clip_grad_norm_if_over(mods[1].parameters(), 1.0)
    assert torch.equal(got, want) or (got.isnan() and want.isnan())
    for a, b in zip(mods[1].parameters(), mods[0].parameters()):
        if not math.isnan(scale):  # torch's clip turns every gradient NaN; ours leaves them (the step is skipped)
            assert torch.equal(a.grad, b.grad)
    if scale == 5.0:
        assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in mods[1].parameters()])) < 1.0 + 1e-5


def test_only_the_last_keep_last_checkpoints_are_kept(tmp_path, corpus_dir):
    """Each save prunes the run to its `--keep-last` newest checkpoints (older ones deleted, the newest kept)."""
    from nanoseek.checkpoint import list_checkpoints

    train(tc(tmp_path, corpus_dir, steps=8, save_every=2, eval_every=8, keep_last=2))
    ck = tmp_path / "run" / "checkpoints"
    assert list_checkpoints(tmp_path / "run") == [ck / "step_0000006", ck / "step_0000008"]
    assert sorted(p.name for p in ck.iterdir()) == ["step_0000006", "step_0000008"]  # the rest deleted, not hidden


def test_recover_interrupted_saves_restores_old_dirs_and_removes_tmp_ones(tmp_path):
    """A `.step_X.old-*` whose step_X is missing is the previous complete checkpoint (killed between atomic_dir's
    two renames) and is put back; a `.step_X.tmp-*` is a half-written save and is removed even when step_X is
    missing (restoring it would resume from partial weights); an `.old-*` whose step_X exists is removed."""
    from nanoseek.checkpoint import list_checkpoints, recover_interrupted_saves

    ck = tmp_path / "run" / "checkpoints"
    for name in (".step_0000003.old-1", ".step_0000003.old-2", ".step_0000009.tmp-x"):
        (ck / name).mkdir(parents=True)
        (ck / name / "model.safetensors").write_text(name)  # a kill may come after the weights were written
    done = recover_interrupted_saves(tmp_path / "run")
    assert done == [
        "restored step_0000003 from an interrupted save",
        "removed .step_0000003.old-2 (left by an interrupted save)",
        "removed .step_0000009.tmp-x (left by an interrupted save)",
    ]
    assert sorted(p.name for p in ck.iterdir()) == ["step_0000003"]
    assert list_checkpoints(tmp_path / "run") == [ck / "step_0000003"]
    assert (ck / "step_0000003" / "model.safetensors").read_text() == ".step_0000003.old-1"  # the sorted-first one
    assert recover_interrupted_saves(tmp_path / "run") == []  # nothing left to do


def test_evaluate_loss_is_next_token_loss_on_shifted_batches(tmp_path, corpus_dir):
    """`evaluate` feeds tokens [:-1] and scores against [1:]: its val_loss is the plain next-token cross-entropy
    computed independently (single-process and distributed runs share this code, so only a reference catches a
    wrong shift); val_mtp_loss is the mean of the MTP depths' losses."""
    t = Trainer(tc(tmp_path, corpus_dir, precision="fp32"))
    t.train_step()  # a model that is not uniform
    b = t.val[0]
    assert b.shape == (2, 33)
    rec = t.evaluate([b])
    t.model.eval()
    with torch.no_grad():
        loss, _ = lm_losses(t.model, b[:, :-1], b[:, 1:], False)
        _, mtp = lm_losses(t.model, b[:, :-1], b[:, 1:], True)
    t.model.train()
    assert rec["val_loss"] == pytest.approx(float(loss), abs=1e-6)
    assert rec["val_mtp_loss"] == pytest.approx(float(torch.stack(mtp).mean()), abs=1e-6)
    assert rec["val_tokens"] == 2 * 32 and 3.0 < rec["val_loss"] < 7.0  # near ln(512) = 6.24 after one step
