"""Input validation: bad training settings, model configs, overrides and JSON files give one-line NanoseekErrors
naming the flag, field or file; the values that mean something (legal zeros, presets) still pass."""

import json

import pytest
import torch
from conftest import TRAIN_OVERRIDES, micro_config

import nanoseek.model.moe as moe
from nanoseek import PRESETS, ModelConfig, NanoseekError, get_preset
from nanoseek.checkpoint import read_config
from nanoseek.cli import main
from nanoseek.hf import config_from_hf, config_to_hf
from nanoseek.model import Transformer
from nanoseek.model.transformer import lm_cross_entropy
from nanoseek.train import build_model_config
from nanoseek.train_config import TrainConfig, load_settings, validate


# --- training settings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(grad_clip=0.0), "--grad-clip must be > 0, got 0.0"),
        (dict(grad_clip=-1.0), "--grad-clip must be > 0"),
        (dict(lr=0.0), "--lr must be > 0"),
        (dict(lr=float("inf")), "--lr must be finite, got inf"),
        (dict(lr=float("nan")), "--lr must be finite, got nan"),
        (dict(min_lr_ratio=-2.0), "--min-lr-ratio must be in [0, 1], got -2.0"),
        (dict(min_lr_ratio=1.5), "--min-lr-ratio must be in [0, 1]"),
        (dict(weight_decay=-1.0), "--weight-decay must be >= 0"),
        (dict(bias_update_rate=-1.0), "--bias-update-rate must be >= 0"),
        (dict(seq_aux_alpha=-1.0), "--seq-aux-alpha must be >= 0"),
        (dict(aux_alpha=-1e-3), "--aux-alpha must be >= 0"),
        (dict(mtp_weight=-0.1), "--mtp-weight must be >= 0"),
        (dict(mtp_weight_late=-0.1), "--mtp-weight-late must be >= 0"),
        (dict(mtp_weight_drop_step=-1), "--mtp-weight-drop-step must be >= 0"),
        (dict(warmup_steps=-1), "--warmup-steps must be >= 0"),
        (dict(mtp_depth=-1), "--mtp-depth must be >= 0"),
        (dict(beta1=1.5), "--beta1 must be in [0, 1), got 1.5"),
        (dict(beta1=1.0), "--beta1 must be in [0, 1)"),
        (dict(beta2=-1.0), "--beta2 must be in [0, 1)"),
        (dict(threads=-4), "--threads must be >= 1, got -4"),
        (dict(threads=0), "--threads must be >= 1, got 0"),
        (dict(ranks_per_node=0), "--ranks-per-node must be >= 1"),
        (dict(steps="10"), '--steps must be an integer, got "10"'),
        (dict(progress="no"), '--progress must be true or false, got "no"'),
        (dict(override="n_routed_experts=0"), "--override must be a list of strings"),
        (dict(data=""), "--data is empty (leave the flag out for its default)"),  # e.g. an unset "$DATA"
        (dict(tokenizer=" "), "--tokenizer is empty"),
        (dict(out=""), "--out is empty"),
    ],
)
def test_bad_training_settings_are_rejected(kw, needle):
    with pytest.raises(NanoseekError) as e:
        validate(TrainConfig(**kw))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_boundary_training_settings_are_accepted():
    validate(TrainConfig())
    validate(
        TrainConfig(
            min_lr_ratio=0.0, beta1=0.0, beta2=0.0, weight_decay=0.0, warmup_steps=0, mtp_weight_drop_step=0,
            bias_update_rate=0.0, seq_aux_alpha=0.0, aux_alpha=0.0, mtp_depth=0, threads=1, lr=1,
        )
    )  # fmt: skip
    validate(TrainConfig(min_lr_ratio=1.0, beta2=0.999, grad_clip=1e-3))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--lr", "nan"], "--lr must be finite"),
        (["--beta1", "1.5"], "--beta1 must be in [0, 1)"),
        (["--beta2", "-1"], "--beta2 must be in [0, 1)"),
        (["--threads", "-4"], "--threads must be >= 1"),
        (["--grad-clip", "0"], "--grad-clip must be > 0"),
        (["--override", "hidden_size=-8"], "hidden_size must be >= 0, got -8"),
        (["--override", "num_experts_per_tok=2.9"], "--override num_experts_per_tok must be an integer, got 2.9"),
        (["--override", "rms_norm_eps=true"], "--override rms_norm_eps must be a number, got true"),
    ],
)
def test_cli_prints_one_line_and_exits_2(argv, needle, tmp_path, corpus_dir, capsys):
    # --data: the override cases fail after the corpus is read, before any tokenizer or model is built
    rc = main(["train", *argv, "--data", str(corpus_dir), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()


# --- model config: ranges, strict overrides ------------------------------------------------------------------
@pytest.mark.parametrize(
    "item, needle",
    [
        ("hidden_size=-8", "hidden_size must be >= 0, got -8"),
        ("n_shared_experts=-1", "n_shared_experts must be >= 0"),
        ("hidden_size=0", "hidden_size must be > 0, got 0"),
        ("vocab_size=0", "vocab_size must be > 0"),
        ("num_attention_heads=0", "num_attention_heads must be > 0"),
        ("kv_lora_rank=0", "kv_lora_rank must be > 0"),
        ("v_head_dim=0", "v_head_dim must be > 0"),
        ("moe_layer_freq=0", "moe_layer_freq must be > 0"),
        ("num_experts_per_tok=0", "num_experts_per_tok must be > 0"),
        ("moe_intermediate_size=0", "moe_intermediate_size must be > 0"),
        ("rms_norm_eps=0", "rms_norm_eps must be > 0"),
        ("init_std=-0.1", "init_std must be finite and >= 0"),
        ("rope_theta=1", "rope_theta must be > 1"),
        ("routed_scaling_factor=NaN", "routed_scaling_factor must be finite"),
        ("topk_method=top1", "topk_method must be noaux_tc|greedy|group_limited_greedy"),
        ("num_experts_per_tok=2.9", "--override num_experts_per_tok must be an integer, got 2.9"),
        ("num_experts_per_tok=true", "--override num_experts_per_tok must be an integer, got true"),
        ("rms_norm_eps=true", "--override rms_norm_eps must be a number, got true"),
        ("tie_word_embeddings=1", "--override tie_word_embeddings must be true or false, got 1"),
        ("tie_word_embeddings=true", "tie_word_embeddings = true is not supported"),  # was silently untied
        ('hidden_size="256"', '--override hidden_size must be an integer, got "256"'),
        ("n_group=null", "--override n_group must be an integer, got null"),
        ("hidden_size=abc", "--override hidden_size=abc: cannot parse 'abc' as int"),
    ],
)
def test_bad_overrides_are_rejected(item, needle):
    with pytest.raises(NanoseekError) as e:
        build_model_config(TrainConfig(override=[item]))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "item, want",
    [
        ("num_experts_per_tok=3", 3),
        ("rms_norm_eps=1e-5", 1e-5),
        ("rope_theta=50000", 50000.0),  # an integer is a fine float (and becomes one)
        ("norm_topk_prob=false", False),
        ("attn_type=gqa", "gqa"),
        ("name=my model", "my model"),  # str fields take VALUE as is
    ],
)
def test_valid_overrides_parse_strictly_typed(item, want):
    key, value = ModelConfig.parse_override(item)
    assert key == item.split("=")[0] and value == want and type(value) is type(want)
    assert getattr(build_model_config(TrainConfig(override=[item])), key) == want


OFF_ZEROS = ["q_lora_rank", "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"]


@pytest.mark.parametrize("field", OFF_ZEROS)
def test_zeros_that_mean_off_stay_legal_and_the_model_trains(field, one_thread):
    cfg = micro_config(**{field: 0})
    m = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    main_logits, mtps = m(x, mtp=True) if cfg.num_nextn_predict_layers else (m(x), [])
    loss = main_logits.float().logsumexp(-1).mean() + sum(t.float().mean() for t in mtps)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_model_config_types_are_checked_on_construction():
    with pytest.raises(NanoseekError, match=r"invalid model config .*: n_group must be an integer, got null"):
        get_preset("tiny", n_group=None)
    cfg = get_preset("tiny", rope_theta=20000)
    assert type(cfg.rope_theta) is float  # ints are accepted for floats and stored as floats


# --- JSON files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, needle",
    [
        ({"steps": "10"}, 'steps must be an integer, got "10"'),
        ([1, 2], "expected a JSON object of training settings, got list"),
        ({"override": "n_routed_experts=0"}, 'override must be a list of strings, got "n_routed_experts=0"'),
        ({"progress": "no"}, 'progress must be true or false, got "no"'),
        ({"lr": None}, "lr must be a number, got null"),
        ({"threads": 1.5}, "threads must be an integer or null, got 1.5"),
    ],
)
def test_bad_train_config_files_name_the_file_and_field(tmp_path, content, needle):
    f = tmp_path / "train_config.json"
    f.write_text(json.dumps(content))
    with pytest.raises(NanoseekError) as e:
        load_settings(f)
    assert str(e.value).startswith(f"{f}: ") and needle in str(e.value)


def test_train_config_file_with_ints_for_floats_and_nulls_loads(tmp_path):
    f = tmp_path / "train_config.json"
    f.write_text(json.dumps({"lr": 1, "steps": 2, "warmup_steps": None, "override": ["n_routed_experts=0"]}))
    d = load_settings(f)
    assert d == {"lr": 1.0, "steps": 2, "warmup_steps": None, "override": ["n_routed_experts=0"]}
    assert type(d["lr"]) is float
    validate(TrainConfig(**d))


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"hidden_size": "256"}, 'hidden_size must be an integer, got "256"'),
        ({"n_group": None}, "n_group must be an integer, got null"),
        ({"norm_topk_prob": "yes"}, 'norm_topk_prob must be true or false, got "yes"'),
        ([1], "expected a JSON object of model config fields"),
    ],
)
def test_bad_model_config_files_name_the_file_and_field(tmp_path, content, needle):
    f = tmp_path / "model.json"
    f.write_text(json.dumps(content))
    with pytest.raises(NanoseekError) as e:
        build_model_config(TrainConfig(model_config=str(f)))
    assert str(f) in str(e.value) and needle in str(e.value)
    with pytest.raises(NanoseekError, match=f"{f}: "):  # the same file through `ModelConfig.load`
        ModelConfig.load(f)


def test_every_config_reader_applies_one_format_rule(tmp_path, capsys):
    """A checkpoint's config.json, --model-config and `info --config` read the "format" marker alike: ours is
    dropped, a missing one only a checkpoint refuses (it is how an HF config is told apart), another one all
    three refuse (before, --model-config dropped any marker silently and info named an unknown field)."""
    fields = micro_config().to_dict()
    cases = {"ours": {"format": "nanoseek"}, "none": {}, "other": {"format": "safetensors"}}
    readers = {
        "checkpoint": lambda d: read_config(d),
        "--model-config": lambda d: build_model_config(TrainConfig(model_config=str(d / "config.json"))),
        "info": lambda d: main(["info", "--config", str(d / "config.json"), "--json"]),
    }
    for case, marker in cases.items():
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**marker, **fields}))
        for name, read in readers.items():
            refused = case == "other" or (case == "none" and name == "checkpoint")
            if name == "info":
                assert read(d) == (2 if refused else 0), (case, name)
                out, err = capsys.readouterr()
                assert refused or json.loads(out)["params_total"] > 0, (case, name)
                assert not refused or ("not a nanoseek model config" in err and err.count("\n") == 1), (case, err)
            elif refused:
                with pytest.raises(NanoseekError, match=r"config\.json.*not a nanoseek model config"):
                    read(d)
            else:
                assert read(d).hidden_size == fields["hidden_size"], (case, name)


def test_checkpoint_config_with_a_null_field_names_the_file(tmp_path):
    cfg = micro_config().to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"format": "nanoseek", **cfg, "n_group": None}))
    with pytest.raises(NanoseekError) as e:
        read_config(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ") and "n_group must be an integer, got null" in str(
        e.value
    )


# --- previously valid configs --------------------------------------------------------------------------------
def test_presets_and_test_variants_still_validate():
    from nanoseek.bench import attention, common
    from nanoseek.bench import moe as bench_moe

    for name in PRESETS:
        cfg = get_preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        hf = config_from_hf(json.loads(json.dumps(config_to_hf(cfg))))  # through JSON, as from a file
        assert {k: v for k, v in hf.to_dict().items() if k != "name"} == {
            k: v for k, v in cfg.to_dict().items() if k != "name"
        }
    micro_config()
    for kind in ("mha", "gqa"):
        get_preset("tiny", attn_type=kind, num_key_value_heads=2 if kind == "gqa" else 0)
    assert build_model_config(TrainConfig(override=list(TRAIN_OVERRIDES))).hidden_size == 64
    assert build_model_config(TrainConfig(override=common.overrides(common.MICRO))).kv_lora_rank == 16
    for quick in (True, False):
        assert len(attention.arm_configs(quick)) == 3 and len(bench_moe.arm_configs(quick)) >= 3


# --- MoE kernels: _grouped_mm needs 16-byte aligned strides -------------------------------------------------
@pytest.mark.parametrize(
    "dtype, d, inter, want",
    [
        (torch.bfloat16, 64, 100, "bmm"),  # 100 bf16 = 200 bytes
        (torch.float32, 64, 100, "grouped_mm"),  # 400 bytes
        (torch.float32, 255, 128, "bmm"),
        (torch.bfloat16, 64, 128, "grouped_mm"),
    ],
)
def test_auto_picks_grouped_mm_only_for_aligned_dims(dtype, d, inter, want):
    if not moe.HAS_GROUPED_MM:
        pytest.skip("no torch._grouped_mm")
    xs, w13 = torch.zeros(64, d, dtype=dtype), torch.zeros(4, d, 2 * inter, dtype=dtype)
    assert moe.choose_impl("auto", xs, w13) == want
    if want == "bmm":
        with pytest.raises(NanoseekError, match=f"moe_impl=grouped_mm needs hidden_size \\({d}\\)"):
            moe.choose_impl("grouped_mm", xs, w13)


def test_unaligned_dims_skip_the_cpu_autotune(monkeypatch):
    monkeypatch.setattr(moe, "_TUNED", {})
    assert moe.choose_impl("auto", torch.zeros(4096, 64, dtype=torch.bfloat16), torch.zeros(4, 64, 200)) == "bmm"
    assert moe._TUNED == {}  # decided without timing a kernel that cannot run


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("fields", [dict(moe_intermediate_size=100), dict(hidden_size=63)])
def test_unaligned_moe_trains_with_the_default_impl(precision, fields, one_thread):
    cfg = micro_config(**fields)
    assert cfg.moe_impl == "auto"
    m = Transformer(cfg)
    ref = Transformer(cfg.replace(moe_impl="loop"))
    ref.load_state_dict(m.state_dict())
    x = torch.randint(0, cfg.vocab_size, (4, 65))  # 4*64*2 = 512 routed rows: the sorted (not gathered) path
    losses = []
    for model in (m, ref):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            main_loss, mtp_losses = lm_cross_entropy(*model(x[:, :-1], mtp=True), x[:, 1:])
            loss = main_loss + sum(mtp_losses)
        loss.backward()
        losses.append(loss)
    assert torch.isfinite(losses[0])
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-2 if precision == "bf16" else 1e-5)
    w13 = m.layers["1"].mlp.experts.w13
    assert w13.grad is not None and w13.grad.abs().sum() > 0


def test_more_bad_training_settings_are_rejected(tmp_path):
    """Bounds the big table above leaves out: eval_tokens must hold one seq_len + 1 row (exactly), the
    counts that 0 does not mean "default" for, an empty --resume, and unknown keys of a --config file."""
    with pytest.raises(
        NanoseekError, match=r"--eval-tokens 32 must cover at least one sequence of --seq-len \+ 1 = 33"
    ):
        validate(TrainConfig(eval_tokens=32, seq_len=32))
    validate(TrainConfig(eval_tokens=33, seq_len=32))  # exactly one row is enough
    for kw, needle in [
        (dict(pp_microbatches=0), "--pp-microbatches must be >= 1, got 0"),
        (dict(max_nodes_per_token=0), "--max-nodes-per-token must be >= 1, got 0"),
        (dict(grad_accum=0), "--grad-accum must be >= 1, got 0"),
        (dict(keep_last=0), "--keep-last must be >= 1, got 0"),
        (dict(resume=""), "--resume is empty"),
        (dict(compile=True, pp=2), "--compile does not apply under --pp yet"),
    ]:
        with pytest.raises(NanoseekError) as e:
            validate(TrainConfig(**kw))
        assert needle in str(e.value) and "\n" not in str(e.value), kw
    (tmp_path / "c.json").write_text(json.dumps({"steps": 3, "no_such": 1}))
    with pytest.raises(NanoseekError, match="unknown training setting\\(s\\): no_such"):
        load_settings(tmp_path / "c.json")
    # the default shuffle window holds 2^23 tokens, whatever the row length
    assert TrainConfig(seq_len=255).window_rows() == 32768 and TrainConfig(seq_len=1023).window_rows() == 8192
    assert TrainConfig(seq_len=255, shuffle_rows=5).window_rows() == 5


def test_resume_replays_the_runs_saved_settings(tmp_path):
    """`train --resume DIR/checkpoints/step_N` reads DIR/train_config.json and continues in DIR (the saved
    --out may be elsewhere, e.g. a moved run); flags given on the command line still win."""
    from nanoseek.cli import build_parser
    from nanoseek.train_config import from_args

    run = tmp_path / "moved_run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"steps": 7, "lr": 0.01, "out": "/elsewhere", "resume": None}))
    ck = str(run / "checkpoints" / "step_0000002")
    tc = from_args(build_parser().parse_args(["train", "--resume", ck]))
    assert (tc.steps, tc.lr, tc.out, tc.resume) == (7, 0.01, str(run), ck)
    tc = from_args(build_parser().parse_args(["train", "--resume", ck, "--steps", "9"]))
    assert (tc.steps, tc.lr, tc.out) == (9, 0.01, str(run))


# --- mutation-audit additions: bounds and rules the tables above leave out ---------------------------------------
@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(init_std=float("inf")), "init_std must be finite and >= 0, got inf"),
        (dict(intermediate_size=0), "intermediate_size must be > 0, got 0"),
        (dict(max_position_embeddings=0), "max_position_embeddings must be > 0, got 0"),
        (dict(rope_factor=0.0), "rope_factor must be > 0, got 0.0"),
        (dict(qk_nope_head_dim=0), "qk_nope_head_dim must be > 0, got 0"),
        (dict(attn_type="gqa", num_key_value_heads=3), "num_attention_heads 4 not divisible by kv heads 3"),
        (dict(attn_type="mha", hidden_size=2), "head_dim is 0 and hidden_size 2 < num_attention_heads 4"),
        (dict(qk_rope_head_dim=15), "rotary dims must be even"),
        (dict(topk_group=0), "topk_group 0 must be in [1, n_group=4]"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok 9 exceeds the experts in the kept groups"),
    ],
)
def test_more_bad_model_configs_are_rejected(kw, needle):
    with pytest.raises(NanoseekError) as e:
        get_preset("tiny", **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_model_config_edges_that_stay_legal():
    get_preset("tiny", n_group=0, topk_group=1)  # 0 groups = no grouping (the gate treats G <= 1 alike)
    get_preset("tiny", num_experts_per_tok=8)  # exactly the experts of the 2 kept groups of 4
    gqa = get_preset("tiny", attn_type="gqa", num_key_value_heads=2)
    assert gqa.kv_heads == 2 and gqa.gqa_head_dim == 64  # hidden 256 over the 4 query heads, not the kv heads


def test_override_and_from_dict_name_unknown_fields_and_keep_equals_in_values():
    assert ModelConfig.parse_override("name=run=2") == ("name", "run=2")  # split at the first "="
    with pytest.raises(NanoseekError, match=r"--override no_such=1: 'no_such' is not a ModelConfig field"):
        ModelConfig.parse_override("no_such=1")
    with pytest.raises(NanoseekError, match=r"^f\.json: unknown model config field\(s\): a, b$"):
        ModelConfig.from_dict({"b": 1, "a": 2, "hidden_size": 64}, "f.json")


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(seq_len=0), "--seq-len must be >= 1, got 0"),
        (dict(ep=0), "--ep must be >= 1, got 0"),
        (dict(shuffle_rows=-1), "--shuffle-rows must be >= 0, got -1"),
        (dict(precision="fp16"), "--precision must be fp32|bf16|fp8, got 'fp16'"),
        (dict(balance="off"), "--balance must be loss-free|aux|none, got 'off'"),
        (dict(override=["hidden_size"]), "--override expects KEY=VALUE, got 'hidden_size'"),
    ],
)
def test_more_bad_training_settings_through_the_api(kw, needle):
    with pytest.raises(NanoseekError) as e:
        validate(TrainConfig(**kw))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_train_flags_types_defaults_and_help():
    from nanoseek.cli import build_parser
    from nanoseek.train_config import from_args

    parser = build_parser()
    tc = from_args(parser.parse_args(["train", "--seq-aux-alpha", "0.5", "--pp-microbatches", "4"]))
    assert tc.seq_aux_alpha == 0.5 and type(tc.seq_aux_alpha) is float and tc.pp_microbatches == 4
    validate(tc)
    assert TrainConfig().keep_freed_memory is True and TrainConfig().progress is True
    # a sequence longer than the 2^23-token window still gets a window of one row
    assert TrainConfig(seq_len=1 << 23).window_rows() == 1
    train = parser._subparsers._group_actions[0].choices["train"]
    helps = {a.option_strings[0]: a.help for a in train._actions if a.option_strings}
    assert helps["--lr"].endswith("(default: 0.003)") and helps["--mtp-depth"].count("(default:") == 1


def test_tiny_preset_routing_shape():
    """`tiny`, the default of training, tests and benches: 16 routed experts in 4 groups, tokens keep the top 2
    groups and 2 experts, plus 1 shared expert (README: "16 routed experts top-2 + 1 shared")."""
    keys = ("n_routed_experts", "n_group", "topk_group", "num_experts_per_tok", "n_shared_experts")
    assert [PRESETS["tiny"][k] for k in keys] == [16, 4, 2, 2, 1]


def test_a_huge_integer_or_a_non_utf8_file_is_a_one_line_error(tmp_path):
    """float("1" + 400 zeros) overflows: it was an OverflowError traceback from `info --config`, `--override` and
    train_config files; `ModelConfig.load` of bytes that are not UTF-8 was a UnicodeDecodeError."""
    big = 10**400
    with pytest.raises(NanoseekError, match="rope_theta must be a finite number, got an integer of 401 digits"):
        ModelConfig.parse_override(f"rope_theta={big}")
    f = tmp_path / "big.json"
    f.write_text('{"rms_norm_eps": ' + str(big) + "}")
    assert main(["info", "--config", str(f)]) == 2
    (tmp_path / "b.json").write_bytes(b"\x80")
    with pytest.raises(NanoseekError, match=r"cannot read model config .*b\.json"):
        ModelConfig.load(tmp_path / "b.json")
