"""HF interop and the proof that this is the DeepSeek-V3 model: logit parity with transformers.

transformers' DeepseekV3ForCausalLM models are built at random for several configs, saved, loaded with
`load_pretrained`, and compared in fp32 on both attention paths (max |diff| <= 1e-4).
"""

import json

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


def test_config_records_the_stored_dtype_and_nanoseek_fields(tmp_path):
    ours = _ours()
    ours.cfg = ours.cfg.replace(attn_impl="naive", name="mine")
    for kw, want in (
        ({"dtype": torch.bfloat16}, "bfloat16"),
        ({"dtype": None}, "float32"),
        ({"fp8": True}, "bfloat16"),
    ):
        save_pretrained(ours, tmp_path, **kw)
        cfg = json.loads((tmp_path / "config.json").read_text())
        assert cfg["dtype"] == cfg["torch_dtype"] == want, kw
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
