"""HF interop and the proof that this is the DeepSeek-V3 model: logit parity with transformers.

transformers' DeepseekV3ForCausalLM models are built at random for several configs, saved, loaded with
`load_pretrained`, and compared in fp32 on both attention paths (max |diff| <= 1e-4).
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
)

from nanoseek import NanoseekError, get_preset  # noqa: E402
from nanoseek.fp8 import block_dequant, block_quant  # noqa: E402
from nanoseek.hf import load_pretrained, save_pretrained  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    v_head_dim=16,
    qk_nope_head_dim=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    initializer_range=0.1,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
YARN_MSCALE = {  # a ramp over several dims (rope dim 16, original length 64) and mscale != mscale_all_dim
    **YARN,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
}
CASES = {
    "group_limited_with_bias": {},
    "no_q_lora": dict(q_lora_rank=None),
    "yarn": dict(rope_parameters=YARN, max_position_embeddings=256),
    "yarn_mscale": dict(rope_parameters=YARN_MSCALE, qk_rope_head_dim=16, max_position_embeddings=256),
    "two_dense_layers": dict(first_k_dense_replace=2, num_hidden_layers=4),
    "half_split_rope": dict(rope_interleave=False, n_group=2, topk_group=1),
    "top1_normalised": dict(num_experts_per_tok=1, n_group=1, topk_group=1),  # V3 normalises even one weight
    # no "mscale": transformers takes the attention factor from `factor` alone, not mscale / mscale_all_dim
    "yarn_no_mscale": dict(
        rope_parameters={k: v for k, v in YARN_MSCALE.items() if k != "mscale"},
        qk_rope_head_dim=16,
        max_position_embeddings=256,
    ),
}


def hf_model(**overrides):
    cfg = DeepseekV3Config(**{**BASE, **overrides})
    cfg._attn_implementation = "eager"
    m = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)  # a non-zero, trained-looking routing bias
    return m


@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_parity_with_transformers(case, tmp_path, capfd):
    hf = hf_model(**CASES[case])
    hf.save_pretrained(tmp_path)
    x = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        ref = hf(x).logits
    for impl in ("naive", "absorb"):
        ours = load_pretrained(tmp_path, attn_impl=impl)
        with torch.no_grad():
            got = ours(x)
        assert (got - ref).abs().max() <= 1e-4, impl
    assert ref.abs().max() > 0.5  # the comparison is not between near-zero tensors
    # transformers keeps num_nextn_predict_layers = 1 but drops the MTP weights: one warning line, MTP refused
    err = capfd.readouterr().err
    assert err.count("warning:") == 2 and "holds no MTP weights" in err
    with pytest.raises(NanoseekError, match="holds no MTP weights"):
        ours.require_mtp()


def test_bf16_load_keeps_the_routing_bias_fp32_and_exact(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.bfloat16)
    want = [b for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")]
    got = [m.gate.e_score_correction_bias for m in ours.moe_layers()]
    assert len(got) == len(want) == 2 and ours.embed_tokens.weight.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 and torch.equal(g, w.float()) for g, w in zip(got, want))


def _ours(**kw):
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        moe_intermediate_size=24,
        init_std=0.1,
    )
    cfg = get_preset("tiny", **{**base, **kw})
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.2)
    return m


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    ours = _ours()
    save_pretrained(ours, tmp_path, dtype=torch.float32, max_shard_bytes=200_000)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()  # no dtype: config.json's, fp32 as stored
    assert hf.dtype == torch.float32
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-4
    # the trained routing bias made the trip
    b_hf = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(b_hf, ours.layers["1"].mlp.gate.e_score_correction_bias)


def test_round_trip_is_exact_including_mtp_and_bias(tmp_path):
    ours = _ours(num_nextn_predict_layers=2)
    save_pretrained(ours, tmp_path, dtype=None)
    back = load_pretrained(tmp_path, attn_impl="naive")
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(back.mtp) == 2 and back.mtp[0].embed_tokens is None  # equal copies are tied back
    index = json.loads((tmp_path / "config.json").read_text())
    assert index["num_nextn_predict_layers"] == 2


FP8_QUANTIZATION = {  # as the V3 release's config.json says it
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def test_config_records_the_stored_dtype_and_nanoseek_fields(tmp_path):
    ours = _ours()
    ours.cfg = ours.cfg.replace(attn_impl="naive", name="mine")
    for kw, want in (
        ({"dtype": torch.bfloat16}, "bfloat16"),
        ({"dtype": None}, "float32"),
        ({"fp8": True}, "bfloat16"),
        ({"fp8": True, "dtype": torch.float32}, "bfloat16"),  # FP8 weights compute in bf16, whatever the rest
    ):
        save_pretrained(ours, tmp_path, **kw)
        cfg = json.loads((tmp_path / "config.json").read_text())
        assert cfg["dtype"] == cfg["torch_dtype"] == want, kw
        assert cfg.get("quantization_config") == (FP8_QUANTIZATION if kw.get("fp8") else None), kw
        assert cfg["nanoseek"] == {"attn_impl": "naive", "name": "mine"}
        assert DeepseekV3Config.from_pretrained(tmp_path).dtype == getattr(torch, want)
    back = load_pretrained(tmp_path, attn_impl=None)
    assert back.cfg == ours.cfg and back.cfg.name == "mine"  # name is not compared by ==
    cfg["nanoseek"] = {"attn_impl": "fast"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NanoseekError, match=r"config\.json key 'nanoseek': .*attn_impl must be naive\|absorb"):
        load_pretrained(tmp_path, attn_impl=None)


def test_mtp_from_hand_built_checkpoint_matches_independent_computation(tmp_path):
    """An HF directory holding an MTP layer in the release layout (fused experts here, to cover that form),
    with its own embedding/head copies; logits checked against transformers' own blocks and norms."""
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    cfg = hf.config
    L = cfg.num_hidden_layers
    torch.manual_seed(1)
    block = DeepseekV3DecoderLayer(cfg, layer_idx=L).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
        block.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    extra = {f"model.layers.{L}.{k}": v.clone() for k, v in block.state_dict().items()}
    enorm, hnorm, hd_norm = (DeepseekV3RMSNorm(64) for _ in range(3))
    eh_proj = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        for n in (enorm, hnorm, hd_norm):
            n.weight.uniform_(0.5, 1.5)
        eh_proj.weight.normal_(0, 0.1)
    p = f"model.layers.{L}."
    extra.update(
        {
            p + "enorm.weight": enorm.weight,
            p + "hnorm.weight": hnorm.weight,
            p + "eh_proj.weight": eh_proj.weight,
            p + "shared_head.norm.weight": hd_norm.weight,
            p + "embed_tokens.weight": hf.model.embed_tokens.weight,
            p + "shared_head.head.weight": hf.lm_head.weight,
        }
    )
    save_file({k: v.detach().contiguous() for k, v in extra.items()}, str(tmp_path / "mtp.safetensors"))

    ours = load_pretrained(tmp_path, attn_impl="absorb")
    assert len(ours.mtp) == 1
    T = 20
    x = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        main, (mtp,) = ours.forward_mtp(x)
        # independent computation with transformers' modules
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        pos = torch.arange(T)[None]
        h = hf.model.embed_tokens(x)
        pe = hf.model.rotary_emb(h, pos)
        for layer in hf.model.layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        assert (hf.lm_head(hf.model.norm(h)) - main).abs().max() <= 1e-4
        z = eh_proj(torch.cat([enorm(hf.model.embed_tokens(x[:, 1:])), hnorm(h[:, :-1])], -1))
        pe2 = hf.model.rotary_emb(z, pos[:, : T - 1])
        z = block(
            z,
            attention_mask=mask[..., : T - 1, : T - 1],
            position_embeddings=pe2,
            position_ids=pos[:, : T - 1],
        )
        ref = hf.lm_head(hd_norm(z))
    assert mtp.shape == (2, T - 1, 256)
    assert (mtp - ref).abs().max() <= 1e-4 and ref.abs().max() > 0.5


def test_mtp_copies_that_differ_are_kept(tmp_path):
    ours = _ours()
    save_pretrained(ours, tmp_path, dtype=None)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    # the release layout: the MTP layer stores its own copies of the embedding and the head (V3's loaders read
    # them there), equal to the main ones when they are tied
    assert torch.equal(sd["model.layers.3.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(sd["model.layers.3.shared_head.head.weight"], sd["lm_head.weight"])
    sd["model.layers.3.embed_tokens.weight"] = sd["model.layers.3.embed_tokens.weight"] + 1.0
    save_file(sd, str(f))
    back = load_pretrained(tmp_path)
    assert back.mtp[0].embed_tokens is not None
    assert torch.equal(back.mtp[0].embed_tokens.weight, ours.embed_tokens.weight + 1.0)


def test_fp8_checkpoint_with_ragged_blocks_and_original_config_dialect(tmp_path):
    # hidden 200 and kv_a 16+8=24 rows: no dimension is a multiple of 128, so every block is ragged
    ours = _ours(hidden_size=200, intermediate_size=300)
    save_pretrained(ours, tmp_path, fp8=True, dtype=torch.bfloat16)
    sd = load_file(str(tmp_path / "model.safetensors"))
    w = sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert w.dtype == torch.float8_e4m3fn and sd[
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    ].shape == (1, 2)
    assert sd["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert sd["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # gate stays high precision
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    # rewrite config.json in DeepSeek's original dialect (rope_scaling + quantization_config)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None
    cfg.pop("rope_interleave")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = load_pretrained(tmp_path, attn_impl="naive")
    # exact: every FP8 weight is dequant(quant(w)) with ragged blocks, every other tensor is bf16-rounded
    from nanoseek.hf import _FP8_SUFFIXES

    got = back.state_dict()
    n_fp8 = 0
    for name, w in ours.state_dict().items():
        if name.endswith("e_score_correction_bias"):
            expect = w
        elif name.endswith(("experts.w13", "experts.w2")):
            # stored per expert as [out, in] blocks, like the release
            per = [block_dequant(*block_quant(w[e].T.contiguous())).T for e in range(w.shape[0])]
            if name.endswith("w13"):
                I = w.shape[-1] // 2
                per = [
                    torch.cat(
                        [
                            block_dequant(*block_quant(w[e, :, :I].T.contiguous())).T,
                            block_dequant(*block_quant(w[e, :, I:].T.contiguous())).T,
                        ],
                        1,
                    )
                    for e in range(w.shape[0])
                ]
            expect = torch.stack(per)
            n_fp8 += 1
        elif name.endswith(_FP8_SUFFIXES):
            expect = block_dequant(*block_quant(w))
            n_fp8 += 1
        else:
            expect = w.bfloat16().float()
        assert torch.equal(got[name], expect), name
    assert n_fp8 > 20


def test_original_v3_config_json_is_read():
    raw = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "max_position_embeddings": 163840,
        "quantization_config": {"fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    from nanoseek.hf import config_from_hf

    cfg = config_from_hf(raw)
    v3 = get_preset("v3")
    for f in (
        "hidden_size",
        "num_hidden_layers",
        "n_routed_experts",
        "rope_factor",
        "mscale_all_dim",
        "rope_type",
        "first_k_dense_replace",
        "routed_scaling_factor",
        "num_nextn_predict_layers",
        "topk_group",
        "rope_interleave",  # no key in the original config.json: its rope is interleaved
    ):
        assert getattr(cfg, f) == getattr(v3, f), f


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    ours = _ours()
    save_pretrained(ours, tmp_path, dtype=None)
    f = tmp_path / "model.safetensors"
    good = load_file(str(f))

    def broken(mutate):
        sd = dict(good)
        mutate(sd)
        save_file(sd, str(f))
        with pytest.raises(NanoseekError) as e:
            load_pretrained(tmp_path)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = broken(lambda sd: sd.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    assert "missing keys (1): model.layers.1.mlp.experts.3.up_proj.weight" in msg
    msg = broken(lambda sd: sd.update({"model.layers.1.mlp.surprise": torch.zeros(2)}))
    assert "unexpected keys (1): model.layers.1.mlp.surprise" in msg
    msg = broken(lambda sd: sd.update({"model.norm.weight": torch.ones(63)}))
    assert "mis-shaped (1): model.norm.weight (63,) (expected (64,))" in msg
    # the MTP layer's own copy of the head must have the head's shape (not be kept as a different weight)
    msg = broken(lambda sd: sd.update({"model.layers.3.shared_head.head.weight": torch.ones(300, 64)}))
    assert "mis-shaped (1): model.layers.3.shared_head.head.weight (300, 64) (expected (256, 64))" in msg
    f.write_bytes(f.read_bytes()[:-100])  # a partial download
    with pytest.raises(NanoseekError, match=f"cannot read {f}"):
        load_pretrained(tmp_path)
    save_file(good, str(f))
    index = tmp_path / "model.safetensors.index.json"  # an index that sends a tensor to the wrong shard
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    wmap = {k: "model.safetensors" for k in good} | {"model.norm.weight": "other.safetensors"}
    index.write_text(json.dumps({"weight_map": wmap}))
    with pytest.raises(NanoseekError, match=f"cannot read model.norm.weight from {other}"):
        load_pretrained(tmp_path)
    index.write_text(json.dumps({"weight_map": list(good)}))
    with pytest.raises(NanoseekError, match="weight_map must map tensor names to file names"):
        load_pretrained(tmp_path)
    index.unlink()
    other.unlink()
    (tmp_path / "config.json").unlink()
    with pytest.raises(NanoseekError, match=r"no config\.json"):
        load_pretrained(tmp_path)


def test_config_from_hf_accepts_deepseek_configs_and_refuses_what_it_cannot_compute():
    """Either the model_type or the architecture identifies a V3 config (derivatives such as Kimi K2 keep only the
    architecture), both dialects' keys are read, and what the model cannot compute is refused, not ignored."""
    from nanoseek.hf import config_from_hf

    v3 = {"model_type": "deepseek_v3"}
    assert config_from_hf(v3).hidden_size == 7168  # no "architectures" key: transformers' defaults
    assert config_from_hf({"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]}).n_routed_experts == 256
    assert config_from_hf({**v3, "num_mtp_layers": 1}).num_nextn_predict_layers == 1
    cfg = config_from_hf({**v3, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}})
    assert cfg.rope_type == "default" and cfg.rope_theta == 50000.0
    # no "mscale": 0, so the attention factor comes from `factor` alone, as transformers computes it
    yarn = {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale_all_dim": 1.0}
    cfg = config_from_hf({**v3, "rope_parameters": yarn})
    assert cfg.rope_type == "yarn" and cfg.mscale == 0.0 and cfg.mscale_all_dim == 1.0
    for bad, msg in (
        ({"attention_bias": True}, "attention_bias = true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported (only silu)"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope type 'linear' is not supported (default or yarn)"),
    ):
        with pytest.raises(NanoseekError, match=re.escape(f"config.json: {msg}")):
            config_from_hf({**v3, **bad})


def test_yarn_config_without_original_length_uses_max_position_embeddings_like_transformers(tmp_path):
    """transformers takes a missing `original_max_position_embeddings` of a yarn config to be
    `max_position_embeddings`; any other value gives other rotary frequencies, hence other logits."""
    from nanoseek.hf import config_from_hf

    rope = {k: v for k, v in YARN.items() if k != "original_max_position_embeddings"}
    hf = hf_model(rope_parameters=rope, max_position_embeddings=256)
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 256  # transformers' reading
    hf.save_pretrained(tmp_path)
    f = tmp_path / "config.json"
    raw = json.loads(f.read_text())
    del raw["rope_parameters"]["original_max_position_embeddings"]  # transformers writes the key it filled in
    f.write_text(json.dumps(raw))
    assert config_from_hf(raw).original_max_position_embeddings == raw["max_position_embeddings"] == 256
    x = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        assert (load_pretrained(tmp_path)(x) - hf(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "kw",
    [
        dict(q_lora_rank=0),  # V2-Lite's form: q_proj instead of q_a_proj / q_b_proj
        # yarn with every parameter off transformers' defaults, so that each one must make the trip
        dict(
            rope_type="yarn",
            rope_theta=20000.0,
            rope_factor=4.0,
            original_max_position_embeddings=16,
            beta_fast=16.0,
            beta_slow=2.0,
            mscale=0.707,
            mscale_all_dim=1.0,
            qk_rope_head_dim=16,
        ),
    ],
    ids=["no_q_lora", "yarn"],
)
def test_exports_without_q_lora_or_with_yarn_give_transformers_the_same_logits(kw, tmp_path):
    ours = _ours(**kw)
    save_pretrained(ours, tmp_path, dtype=torch.float32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if "q_lora_rank" in kw:
        assert cfg["q_lora_rank"] is None  # transformers' "no q compression" (0 would build empty layers)
    else:
        assert cfg["rope_parameters"] == {
            "rope_type": "yarn",
            "rope_theta": 20000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
        }
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = hf(x).logits
        assert (ref - ours(x)).abs().max() <= 1e-4 and ref.abs().max() > 0.5


def _shards(d) -> list[tuple[str, dict[str, torch.Tensor]]]:
    return [(f.name, load_file(str(f))) for f in sorted(d.glob("*.safetensors"))]


def test_sharded_export_is_greedy_named_and_indexed_as_transformers_expects(tmp_path):
    """Shards are filled in order up to max_shard_bytes (a tensor never split, no empty shard), named
    model-0000i-of-0000n, and listed by an index whose total_size is the bytes of all tensors; a sharded
    directory loads, converts, and names a shard that went missing."""
    from nanoseek.checkpoint import load_model
    from nanoseek.convert import convert
    from nanoseek.hf import hf_state_dict

    ours = _ours()
    order = [k for k, _ in hf_state_dict(ours)]  # the order tensors are written in
    nbytes = {k: t.numel() * t.element_size() for k, t in hf_state_dict(ours)}  # fp32: stored as is
    total = sum(nbytes.values())
    for limit in (1, 200_000, nbytes[order[0]] + nbytes[order[1]]):
        d = tmp_path / f"max{limit}"
        save_pretrained(ours, d, dtype=torch.float32, max_shard_bytes=limit)
        shards = _shards(d)
        n = len(shards)
        assert [name for name, _ in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert index["metadata"] == {"total_size": total}
        assert index["weight_map"] == {k: name for name, sd in shards for k in sd}
        assert sorted(index["weight_map"]) == sorted(order)
        firsts = [min(sd, key=order.index) for _, sd in shards]
        sizes = [sum(nbytes[k] for k in sd) for _, sd in shards]
        if limit == 1:
            assert n == len(order) and all(len(sd) == 1 for _, sd in shards)  # each tensor alone, none empty
        else:
            assert max(sizes) <= limit and n > 2
            assert all(sizes[i] + nbytes[firsts[i + 1]] > limit for i in range(n - 1))  # greedy: nothing fitted
    assert sorted(_shards(tmp_path / f"max{limit}")[0][1]) == sorted(order[:2])  # exactly full is not over
    d = tmp_path / "max200000"
    model, _ = load_model(d, attn_impl="naive")
    a, b = ours.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    convert(d, tmp_path / "native", to="native")
    assert torch.equal(load_model(tmp_path / "native")[0].lm_head.weight, ours.lm_head.weight)
    n = len(_shards(d))
    (d / f"model-00002-of-{n:05d}.safetensors").unlink()
    with pytest.raises(
        NanoseekError, match=re.escape(f"index refers to missing file(s): model-00002-of-{n:05d}.safetensors")
    ):
        load_pretrained(d)


def test_fp8_weight_without_its_scale_is_a_one_line_error(tmp_path):
    save_pretrained(_ours(), tmp_path, fp8=True)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    key = "model.layers.1.mlp.experts.5.down_proj.weight"
    del sd[key + "_scale_inv"]
    save_file(sd, str(f))
    with pytest.raises(NanoseekError, match=re.escape(f"FP8 tensor {key} has no {key}_scale_inv")):
        load_pretrained(tmp_path)


def test_scale_inv_beside_a_non_fp8_weight_or_without_its_weight_is_refused(tmp_path):
    """Only float8 weights take a `_scale_inv`: beside an int8 weight, loading it as is would give the raw
    integers as weights (beside a bf16 one, unscaled values); one whose weight is absent would be dropped."""
    save_pretrained(_ours(), tmp_path)
    f = tmp_path / "model.safetensors"
    good = load_file(str(f))
    key = "model.layers.0.self_attn.q_a_proj.weight"

    def refused(sd) -> str:
        save_file({**good, **sd}, str(f))
        with pytest.raises(NanoseekError) as e:
            load_pretrained(tmp_path)
        msg = str(e.value).replace(str(tmp_path), "DIR")  # the test's directory name says scale_inv too
        assert "\n" not in msg
        return msg

    scale = {key + "_scale_inv": torch.full((1, 1), 0.01)}
    msg = refused({key: torch.full(good[key].shape, 3, dtype=torch.int8), **scale})
    assert f"{key} is torch.int8" in msg and "float8" in msg, msg
    msg = refused({key: good[key], **scale})  # bf16
    assert f"{key} is torch.bfloat16 but has a {key}_scale_inv" in msg and "only float8" in msg, msg
    orphan = "model.layers.0.self_attn.q_proj.weight_scale_inv"  # there is no q_proj: q_lora_rank is 24
    assert f"unexpected keys (1): {orphan}" in refused({orphan: torch.full((1, 1), 0.01)})
