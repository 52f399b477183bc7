"""Single-device model: MLA paths, MoE routing and kernels, caches, masks, MTP, presets, cost report."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import micro_config as tiny

from nanoseek import NanoseekError, get_preset
from nanoseek.costs import cost_report
from nanoseek.model import Block, Transformer
from nanoseek.model.moe import Gate, sorted_swiglu


@pytest.mark.parametrize("q_lora", [32, 0])
@pytest.mark.parametrize("yarn", [False, True])
def test_naive_equals_absorbed(q_lora, yarn):
    extra = (
        dict(rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=16, mscale_all_dim=1.0) if yarn else {}
    )
    m = Transformer(tiny(q_lora_rank=q_lora, **extra)).eval()
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        a = m(x)
        m.set_attn_impl("absorb")
        b = m(x)
    assert (a - b).abs().max() < 1e-5
    assert a.abs().max() > 0.1  # not trivially zero


def test_naive_equals_absorbed_when_v_is_wider_than_qk():
    """v_head_dim above qk_nope + qk_rope (a valid config): the naive path pads q and k, not v."""
    cfg = tiny()
    m = Transformer(tiny(v_head_dim=cfg.qk_head_dim + 8)).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        a = m(x)
        m.set_attn_impl("absorb")
        b = m(x)
    assert (a - b).abs().max() < 1e-5 and a.abs().max() > 0.1


@pytest.mark.parametrize("attn", [("mla", "naive"), ("mla", "absorb"), ("gqa", "naive"), ("mha", "naive")])
def test_cached_decode_equals_full_forward(attn):
    attn_type, impl = attn
    cfg = tiny(attn_type=attn_type, attn_impl=impl, num_key_value_heads=2 if attn_type == "gqa" else 0)
    m = Transformer(cfg).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        full = m(x)
        caches = m.make_caches(batch=2, max_len=32)
        # a prefill from slot 0 (plain causal), a chunk past slot 0 (masked), then one token at a time
        out = [m(x[:, :10], caches=caches, start_pos=0), m(x[:, 10:15], caches=caches, start_pos=10)]
        out += [m(x[:, t : t + 1], caches=caches, start_pos=t) for t in range(15, 24)]
    assert (torch.cat(out, 1) - full).abs().max() < 1e-5


def test_expert_kernel_autotune_runs_under_inference_mode(monkeypatch):
    # the one-off CPU timing runs a backward; the engine's first big MoE call (a long prefill) is in
    # inference mode, where that used to raise "element 0 of tensors does not require grad"
    import nanoseek.model.moe as moe

    monkeypatch.setattr(moe, "_TUNED", {})
    w13, w2 = torch.randn(4, 16, 32) * 0.1, torch.randn(4, 16, 16) * 0.1
    xs, counts = torch.randn(2048, 16), torch.tensor([512, 512, 512, 512])
    with torch.inference_mode():
        y = sorted_swiglu(xs, w13, w2, counts, "auto")
    assert list(moe._TUNED.values()) in (["bmm"], ["grouped_mm"])
    assert (y - sorted_swiglu(xs, w13, w2, counts, "grouped_mm")).abs().max() < 1e-5


def test_left_padded_batch_equals_each_row_alone():
    m = Transformer(tiny(attn_impl="absorb")).eval()
    a, b = torch.randint(0, 300, (1, 12)), torch.randint(0, 300, (1, 7))
    pad = 5
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :pad] = False
    pos = (torch.arange(12)[None] - torch.tensor([[0], [pad]])).clamp_min(0)
    with torch.no_grad():
        out = m(batch, positions=pos, key_valid=valid)
        assert (out[0] - m(a)[0]).abs().max() < 1e-5
        assert (out[1, pad:] - m(b)[0]).abs().max() < 1e-5
        assert torch.isfinite(out).all()


def test_cache_overflow_is_a_clear_error():
    m = Transformer(tiny()).eval()
    caches = m.make_caches(batch=1, max_len=8)
    with pytest.raises(NanoseekError, match="exceeds the KV cache capacity 8"):
        m(torch.zeros(1, 9, dtype=torch.long), caches=caches)


def test_absorbed_cache_holds_only_latent_and_rope_key():
    cfg = tiny(attn_impl="absorb")
    m = Transformer(cfg)
    c = m.make_caches(batch=1, max_len=4, dtype=torch.bfloat16)[0]
    assert c.bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    m.set_attn_impl("naive")
    c = m.make_caches(batch=1, max_len=4, dtype=torch.bfloat16)[0]
    assert c.bytes_per_token() == cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[5, 0, 9, 1, 3, 12], [4, 4, 5, 4, 3, 4], [0, 0, 30, 0, 1, 0]])
def test_expert_kernels_agree_forward_and_backward(dtype, counts):
    E, d, I = 6, 32, 16
    counts = torch.tensor(counts)
    xs = torch.randn(int(counts.sum()), d, dtype=dtype)
    w13, w2 = torch.randn(E, d, 2 * I, dtype=dtype) * 0.2, torch.randn(E, I, d, dtype=dtype) * 0.2
    results = {}
    for impl in ("loop", "grouped_mm", "bmm"):
        xi, a, b = (t.clone().requires_grad_() for t in (xs, w13, w2))
        y = sorted_swiglu(xi, a, b, counts, impl)
        y.sum().backward()  # a stride-0 gradient: the case _grouped_mm's CPU backward trips on
        results[impl] = (y, xi.grad, a.grad, b.grad)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for impl in ("grouped_mm", "bmm"):
        for got, ref in zip(results[impl], results["loop"]):
            assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


@pytest.mark.parametrize("align", [1, 4, 32])
@pytest.mark.parametrize("impl", ["grouped_mm", "bmm", "loop"])
def test_padded_routing_equals_a_per_token_reference(align, impl):
    """Experts.forward (sort, pad each expert to `align` rows with zero rows, grouped GEMM, combine) equals
    sum_k w_k * Expert_k(x) computed token by token, in value and in every gradient, with skewed loads and
    experts that get no token; the padded layout holds zero rows and multiples of `align` per expert."""
    from nanoseek.model.moe import Experts, Routing, _Dispatch

    torch.manual_seed(0)
    E, d, I, N, K = 6, 16, 8, 400, 2
    ex = Experts(E, d, I, impl=impl)
    torch.nn.init.normal_(ex.w13, 0, 0.3)
    torch.nn.init.normal_(ex.w2, 0, 0.3)
    ex.row_align = align
    seen = []
    inner = ex.mlp_sorted
    ex.mlp_sorted = lambda xs, counts: seen.append(counts.tolist()) or inner(xs, counts)
    idx = torch.stack([torch.randint(0, 3, (N,)), torch.full((N,), 4)], 1)  # experts 3 and 5 get nothing
    x = torch.randn(N, d, requires_grad=True)
    w = torch.rand(N, K, requires_grad=True)
    y = ex(x, idx, w)
    assert all(c % align == 0 for c in seen[0]) and sum(seen[0]) >= N * K  # the forward used the padded layout
    assert ex.pad_rows_to(N * K, x.device) == align and ex.pad_rows_to(4 * E - 1, x.device) == 1
    assert ex.pad_rows_to(4 * align * E - 1, x.device) == max(1, align // 2)  # fewer rows: a smaller alignment
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, ex.w13, ex.w2), gy)

    x2, w2_ = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    a, b = ex.w13.detach().clone().requires_grad_(), ex.w2.detach().clone().requires_grad_()
    h = torch.einsum("nd,nkdi->nki", x2, a[idx])
    ref = (torch.einsum("nki,nkid->nkd", F.silu(h[..., :I]) * h[..., I:], b[idx]) * w2_[..., None]).sum(1)
    ref_grads = torch.autograd.grad(ref, (x2, w2_, a, b), gy)
    assert torch.allclose(y, ref, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-5)

    route = Routing(idx, E, align)
    counts = route.counts.tolist()
    assert all(c % align == 0 for c in counts) and counts[3] == counts[5] == 0
    assert sum(counts) == route.Mp < route.M + E * align
    xs = _Dispatch.apply(x.detach(), route)
    real = torch.ones(route.Mp, dtype=torch.bool)
    if route.pad is not None:
        real[route.pad] = False
        assert len(route.pad) == route.Mp - route.M and not xs[route.pad].any()
    assert torch.equal(xs[real], x.detach()[route.token_of_slot[real]])


def test_two_level_buckets_bound_the_padding():
    from nanoseek.model.moe import two_level_cap

    assert two_level_cap([4, 4, 4, 4, 3, 4]) == 4  # balanced: one level, padded to the max
    assert two_level_cap([40, 40, 41, 40, 39, 40]) == 41  # a second level would save < 15% of the rows
    assert two_level_cap([5, 0, 9, 1, 3, 12]) == 5  # 6*5 + 2*7 = 44 rows instead of 6*12 = 72
    assert two_level_cap([0, 0, 30, 0, 1, 0]) == 1  # one hot expert: 6*1 + 29 rows instead of 6*30


def test_gate_bias_changes_selection_not_weights():
    cfg = tiny(n_group=1, topk_group=1)
    g = Gate(cfg)
    torch.nn.init.normal_(g.weight, 0, 0.5)
    x = torch.randn(50, cfg.hidden_size)
    _, idx0, scores = g(x)
    with torch.no_grad():
        g.e_score_correction_bias[3] = 10.0  # force expert 3 into every token's top-k
    w1, idx1, _ = g(x)
    assert (idx1 == 3).any(-1).all() and not (idx0 == 3).any(-1).all()
    # weights come from the unbiased scores of the chosen experts, normalised, times the scaling factor
    expect = scores.gather(1, idx1)
    expect = expect / expect.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(w1, expect, atol=1e-6)


def test_gate_scores_are_fp32_in_a_bf16_model():
    """The gate computes in fp32 whatever the model's dtype (a bf16 GEMM would flip near-tied selections)."""
    cfg = tiny(n_group=1, topk_group=1)
    g = Gate(cfg).to(torch.bfloat16)
    torch.nn.init.normal_(g.weight, 0, 0.5)
    x = torch.randn(64, cfg.hidden_size, dtype=torch.bfloat16)
    _, _, scores = g(x)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, torch.sigmoid(torch.nn.functional.linear(x.float(), g.weight.float())))


def test_yarn_frequencies_and_amplitude_equal_transformers():
    """Every inverse frequency (the ramp between the low and high bounds included) and the cos/sin amplitude,
    for V3's YaRN and for one with mscale != mscale_all_dim."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from nanoseek.model.rope import inv_frequencies

    for kw in (
        {},
        dict(qk_rope_head_dim=16, rope_factor=4.0, original_max_position_embeddings=64, mscale=0.707),
    ):
        cfg = get_preset("v3", **kw)
        hf = transformers.DeepseekV3Config(
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": cfg.rope_theta,
                "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_max_position_embeddings,
                "beta_fast": cfg.beta_fast,
                "beta_slow": cfg.beta_slow,
                "mscale": cfg.mscale,
                "mscale_all_dim": cfg.mscale_all_dim,
            },
        )
        want, want_amp = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
        inv, amp = inv_frequencies(cfg, cfg.qk_rope_head_dim)
        assert torch.allclose(inv, want.float(), rtol=1e-6) and amp == pytest.approx(want_amp, rel=1e-6), kw
    assert want_amp != 1.0  # the second case exercises the amplitude


def test_group_limited_routing_stays_in_top_groups():
    cfg = tiny(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    g = Gate(cfg)
    torch.nn.init.normal_(g.weight, 0, 1.0)
    x = torch.randn(200, cfg.hidden_size)
    _, idx, scores = g(x)
    groups = idx // 4
    assert max(len(set(r.tolist())) for r in groups) <= 2
    # the kept groups are those with the largest sum of their two best scores
    gs = scores.view(200, 4, 4).topk(2, -1).values.sum(-1)
    best = gs.topk(2, -1).indices.sort(-1).values
    for r in range(200):
        assert set(groups[r].tolist()) <= set(best[r].tolist())


def test_moe_counts_tokens_per_expert():
    m = Transformer(tiny())
    x = torch.randint(0, 300, (2, 10))
    m(x)  # the main model only: the MTP layer's MoE is not run
    main = [b.mlp for b in m.layers.values() if hasattr(b.mlp, "tokens_per_expert")]
    assert len(main) == 2
    for moe in main:
        assert int(moe.tokens_per_expert.sum()) == 2 * 10 * moe.cfg.num_experts_per_tok
    assert int(m.mtp[0].mlp.tokens_per_expert.sum()) == 0
    m.forward_mtp(x)
    assert int(m.mtp[0].mlp.tokens_per_expert.sum()) == 2 * 9 * 2


def test_bias_is_a_buffer_outside_autograd_and_stays_fp32():
    m = Transformer(tiny())
    names = {n for n, _ in m.named_parameters()}
    assert not any("e_score_correction_bias" in n for n in names)
    assert any("e_score_correction_bias" in n for n in m.state_dict())
    m = m.to(torch.bfloat16)
    assert m.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    assert m.moe_layers()[0].gate.weight.dtype == torch.bfloat16


def test_mtp_logits_match_hand_computation():
    m = Transformer(tiny(num_nextn_predict_layers=2)).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        main, mtp = m.forward_mtp(x)
        h0 = m.hidden(x)
        assert torch.allclose(main, m.lm_head(m.norm(h0)))
        h = h0
        for k, layer in enumerate(m.mtp):
            T = 12 - (k + 1)
            e = m.embed_tokens(x[:, k + 1 :])
            inp = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(h[:, :T])], -1))
            h = Block.forward(layer, inp, m.rope(torch.arange(T)))  # the plain transformer block
            ref = m.lm_head(layer.shared_head.norm(h))
            assert mtp[k].shape == (2, T, 300)
            assert (mtp[k] - ref).abs().max() < 1e-6


def test_dense_baseline_and_gqa_build_and_train_step():
    for cfg in (
        tiny(n_routed_experts=0),
        tiny(attn_type="gqa", num_key_value_heads=2),
        tiny(attn_type="mha"),
    ):
        m = Transformer(cfg)
        x = torch.randint(0, 300, (2, 16))
        loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten())
        loss.backward()
        assert all(p.grad is not None for n, p in m.named_parameters() if not n.startswith("mtp"))
    assert not Transformer(tiny(n_routed_experts=0)).moe_layers()


@pytest.mark.parametrize("experts,tol", [(0, 0.02), (8, 0.08)])
def test_bf16_forward_close_to_fp32(experts, tol):
    m = Transformer(tiny(n_routed_experts=experts)).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ref = m(x)
        got = m.to(torch.bfloat16)(x).float()
    # measured: 0.9% dense; ~4% with MoE, where bf16 flips near-tied routing decisions of a random gate
    assert (got - ref).abs().mean() < tol * ref.abs().mean()


def test_presets_build_on_meta_and_v3_counts():
    with torch.device("meta"):
        Transformer(get_preset("v3"))
    r = cost_report(get_preset("v3"))
    assert abs(r["params_total"] - 671e9) / 671e9 < 0.005
    assert 13e9 < r["params_mtp"] < 15e9  # ~14B including its copies of embedding and head
    assert 36e9 < r["params_active"] < 38e9
    assert r["kv_elements_per_token_per_layer"] == 576
    assert r["mha_kv_elements_per_token_per_layer"] == 32768
    assert r["kv_bytes_per_token"] == 576 * 61 * 2
    lite = cost_report(get_preset("v2-lite"))
    assert abs(lite["params_total"] - 15.7e9) / 15.7e9 < 0.01 and abs(lite["params_active"] - 2.4e9) / 2.4e9 < 0.03


def test_v3_flops_per_token_follow_the_formulas(capsys):
    """V3's FLOPs per token pinned to their formulas: 2 per activated weight (routed experts scaled by K/E =
    8/256; the embedding is a lookup) plus causal attention, A = 2·n_h·(T/2)·(d_qk + d_v) per token per layer
    (T/2 keys on average); the MTP depth adds its own activated weights, the shared output head and one more
    attention; training = 3 forwards (the backward is two). `info --seq-len` changes only the attention."""
    from nanoseek.cli import main

    r = cost_report(get_preset("v3"), seq_len=4096)
    A = 2 * 128 * (4096 // 2) * (192 + 128)
    assert r["forward_flops_per_token"] == 2 * r["params_active"] + 61 * A
    # the MTP module's activated weights: MLA (q 7168->1536->128x192, kv 7168->512+64, 512->128x(128+128), o
    # 128x128->7168, 2 norms), MoE (1 shared + 8 of 256 routed experts of 3x7168x2048, the gate), 2 block norms,
    # eh_proj 2x7168->7168, and enorm, hnorm, the head's norm
    attn = 7168 * 1536 + 1536 * 128 * 192 + 7168 * (512 + 64) + 512 * 128 * 256 + 128 * 128 * 7168 + 1536 + 512
    mtp = attn + 9 * 3 * 7168 * 2048 + 256 * 7168 + 2 * 7168 + 2 * 7168 * 7168 + 3 * 7168
    assert r["params_mtp_active"] == mtp == 688_100_352
    head = 7168 * 129280
    assert r["train_flops_per_token"] == 3 * (r["forward_flops_per_token"] + 2 * (mtp + head) + A)
    assert r["train_flops_per_token_main"] == 3 * r["forward_flops_per_token"]
    assert r["naive_kv_elements_per_token_per_layer"] == 128 * (192 + 128) == 40960
    assert main(["info", "--preset", "v3", "--seq-len", "8192", "--json"]) == 0
    long = json.loads(capsys.readouterr().out)
    assert long["seq_len"] == 8192 and long["params_active"] == r["params_active"]
    assert long["forward_flops_per_token"] - r["forward_flops_per_token"] == 61 * A  # twice the keys: +A a layer
    assert long["train_flops_per_token"] - r["train_flops_per_token"] == 3 * 62 * A  # 61 layers + the MTP block
    # D = 2 identical MTP depths cost twice one depth: its block, its attention and its pass through the head
    r2 = cost_report(dataclasses.replace(get_preset("v3"), num_nextn_predict_layers=2), seq_len=4096)
    assert r2["params_mtp_active"] == 2 * mtp
    assert r2["train_flops_per_token"] == 3 * (r["forward_flops_per_token"] + 2 * 2 * (mtp + head) + 2 * A)


def test_yarn_softmax_scale_matches_spec():
    from nanoseek.model.rope import inv_frequencies, softmax_scale

    assert softmax_scale(get_preset("v3"), 192) == pytest.approx(0.1352338, abs=1e-6)
    assert softmax_scale(get_preset("v2-lite"), 192) == pytest.approx(0.1147214, abs=1e-6)
    inv, amp = inv_frequencies(get_preset("v3"), 64)
    plain = 10000.0 ** (-torch.arange(0, 64, 2).float() / 64)
    assert torch.allclose(inv[:11], plain[:11]) and torch.allclose(inv[23:], plain[23:] / 40) and amp == 1.0


def test_info_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "nanoseek", "info", "--preset", "v3", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    for key in (
        "params_total",
        "params_active",
        "params_mtp",
        "kv_elements_per_token_per_layer",
        "mha_kv_elements_per_token_per_layer",
        "kv_bytes_per_token",
        "train_flops_per_token",
    ):
        assert key in r
    bad = subprocess.run([sys.executable, "-m", "nanoseek", "info", "--preset", "v4"], capture_output=True, text=True)
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "error: unknown preset 'v4'; choose one of: tiny, small, v2-lite, v3"
    )


def test_bad_config_files_and_thread_counts_are_one_line_errors(tmp_path):
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "llama.json").write_text('{"model_type": "llama", "hidden_size": 4096}')
    cases = [
        (["info", "--config", str(tmp_path / "list.json")], "expected a JSON object of model config fields"),
        (["info", "--config", str(tmp_path / "bad.json")], "cannot read --config"),
        (["info", "--config", str(tmp_path / "missing.json")], "cannot read --config"),
        (["bench", "kv", "--threads", "0", "--out", str(tmp_path / "b")], "--threads must be >= 1, got 0"),
        # an HF config of another architecture would get DeepSeek-V3's defaults for every missing field
        (["info", "--config", str(tmp_path / "llama.json")], "model_type 'llama' (architectures []) is not a DeepSeek"),
        (["info", "--seq-len", "-5"], "--seq-len must be >= 1, got -5"),
    ]
    for argv, needle in cases:
        r = subprocess.run([sys.executable, "-m", "nanoseek", *argv], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, (argv, r.stderr)
    cmd = [sys.executable, "-m", "nanoseek.bench_decode", "--threads", "-1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --threads must be >= 1, got -1"


def test_malformed_hf_configs_are_one_line_errors_naming_the_file(tmp_path, capsys):
    """Fields of the wrong type or shape in a config.json are one error line naming the file, not a traceback;
    `info --config` also reads nanoseek's own config.json (with its "format" key)."""
    from nanoseek.cli import main
    from nanoseek.hf import config_from_hf, config_to_hf

    good = config_to_hf(get_preset("tiny"))
    cases = {
        "rope_parameters": ({"rope_parameters": "yarn"}, "rope_parameters / rope_scaling must be a JSON object"),
        "no factor": ({"rope_scaling": {"type": "yarn"}}, "missing field 'original_max_position_embeddings'"),
        "factor": ({"rope_scaling": {"type": "yarn", "factor": "abc"}}, "ValueError: could not convert string"),
        "mtp": ({"num_nextn_predict_layers": "x"}, "ValueError: invalid literal for int()"),
        "hidden": ({"hidden_size": "big"}, "hidden_size"),
    }
    for name, (change, needle) in cases.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps({**good, "rope_parameters": None, **change}))
        assert main(["info", "--config", str(f)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: {f}: ") and needle in err and err.count("\n") == 1, (name, err)
    with pytest.raises(NanoseekError, match=r"cfg\.json: expected a JSON object, got list"):
        config_from_hf([1, 2], "cfg.json")
    from nanoseek.checkpoint import resolve

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("[1, 2]")
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(NanoseekError, match=r"config\.json: expected a JSON object, got list"):
        resolve(model_dir)
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"format": "nanoseek", **get_preset("tiny").to_dict()}))
    assert main(["info", "--config", str(own), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_total"] == 8_223_744  # tiny, as `info --preset tiny`


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputing_rmsnorm_and_lean_cross_entropy_match_autograd(dtype):
    """RMSNorm's custom backward (recomputes the normalised input) and the chunked cross-entropy (keeps the
    logits, not fp32 log-probabilities) give autograd's values and gradients, and keep fewer bytes."""
    from nanoseek.fp8 import SavedTensorBytes
    from nanoseek.model.layers import RMSNorm, _CrossEntropyFunction, cross_entropy

    torch.manual_seed(0)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    x = (torch.randn(3, 50, 64) * 3).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = norm.weight.detach().clone().requires_grad_()
    with SavedTensorBytes(exclude=[norm.weight]) as mine:
        y = norm(x)
    xf = x_ref.float()
    with SavedTensorBytes(exclude=[w_ref]) as ref:
        y_ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * w_ref).to(dtype)
    assert y.dtype == dtype and torch.equal(y, y_ref)  # the forward is the same computation
    assert mine.bytes < ref.bytes
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-4)

    chunk = _CrossEntropyFunction.CHUNK_ELEMENTS
    _CrossEntropyFunction.CHUNK_ELEMENTS = 7 * 33  # several chunks of 7 rows, a ragged last one
    try:
        logits = (torch.randn(40, 33) * 4).to(dtype).requires_grad_()
        ref_logits = logits.detach().clone().requires_grad_()
        t = torch.randint(0, 33, (40,))
        t[[3, 17]] = -100  # ignored, as in F.cross_entropy
        with SavedTensorBytes() as mine:
            loss = cross_entropy(logits, t)
        with SavedTensorBytes() as ref:
            loss_ref = F.cross_entropy(ref_logits.float(), t)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
        kept = logits.detach().clone()
        loss.backward()
        loss_ref.backward()
        assert logits.grad.dtype == dtype and torch.equal(logits, kept)  # backward works on copies
        torch.testing.assert_close(logits.grad.float(), ref_logits.grad.float(), rtol=tol, atol=1e-3 * tol)
        if dtype == torch.bfloat16:
            assert mine.bytes < 0.6 * ref.bytes
    finally:
        _CrossEntropyFunction.CHUNK_ELEMENTS = chunk


# --- from a mutation audit of model/ and balance.py: behaviours no other test pinned ----------------------------
def test_v2_group_limited_greedy_keeps_the_groups_with_the_best_single_score():
    """V2's group_limited_greedy ranks groups by their best expert (amax), not by a sum (V3's noaux_tc)."""
    cfg = tiny(scoring_func="softmax", topk_method="group_limited_greedy", n_routed_experts=16, n_group=4, topk_group=2)
    cfg = dataclasses.replace(cfg, num_experts_per_tok=4)
    torch.manual_seed(0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, 0, 1.0)
    _, idx, scores = gate(torch.randn(200, cfg.hidden_size))
    best = scores.view(200, 4, 4).amax(-1).topk(2, dim=-1).indices  # [N, 2] the groups V2 keeps
    assert ((idx // 4)[:, :, None] == best[:, None, :]).any(-1).all()
    summed = scores.view(200, 4, 4).sum(-1).topk(2, dim=-1).indices
    assert not torch.equal(best.sort(-1).values, summed.sort(-1).values)  # the two rules differ on these tokens


def test_init_weights_zeroes_the_token_counters():
    """A model built on the meta device, then `to_empty()` + `init_weights()`, starts with zero expert counts
    (the balancer's first step reads them)."""
    m = Transformer(tiny())
    for moe in m.moe_layers():
        moe.tokens_per_expert.fill_(5)
    m.init_weights()
    assert all(int(moe.tokens_per_expert.abs().sum()) == 0 for moe in m.moe_layers())


def test_forward_mtp_skips_depths_the_sequence_is_too_short_for():
    """T = 2 tokens with 2 MTP depths: depth 2 has no position left, so it is left out (an empty [B, 0, V]
    entry would give a NaN loss)."""
    m = Transformer(tiny(num_nextn_predict_layers=2)).eval()
    with torch.no_grad():
        _, mtps = m.forward_mtp(torch.randint(0, 300, (2, 2)))
    assert len(mtps) == 1 and tuple(mtps[0].shape) == (2, 1, m.cfg.vocab_size)


def test_attention_mask_lets_a_padded_query_see_itself():
    """Padding slot 0 of one row: its query sees only itself (never an empty softmax); the others are causal
    over the valid slots."""
    from nanoseek.model.transformer import attention_mask

    m = attention_mask(3, 0, torch.tensor([[False, True, True]]), torch.device("cpu"))
    assert m[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_two_level_cap_counts_experts_at_the_cap_as_fitting():
    """Seven experts of 2 rows and one of 20: a cap of 2 (8 x 2 rows + one second level of 18) beats one level
    of 20 rows per expert (160)."""
    from nanoseek.model.moe import two_level_cap

    assert two_level_cap([2] * 7 + [20]) == 2
    assert two_level_cap([5] * 8) == 5  # even loads: one level


# --- mutation-audit additions: the cost report beyond V3's MLA, and the `info` command's defaults and text --------
def test_gqa_cost_report_counts_kv_heads_and_head_dim():
    """GQA caches 2·n_g·d_h per token per layer (MHA: 2·n_h·d_h) with d_h the explicit head_dim when set, else
    hidden / n_h; attention FLOPs use d_h for both the score and the value product."""
    r = cost_report(get_preset("tiny", attn_type="gqa", num_key_value_heads=2, head_dim=32), seq_len=4096)
    assert r["kv_elements_per_token_per_layer"] == r["naive_kv_elements_per_token_per_layer"] == 2 * 2 * 32
    assert r["mha_kv_elements_per_token_per_layer"] == 2 * 4 * 32
    assert r["forward_flops_per_token"] == 2 * r["params_active"] + 4 * (2 * 4 * 2048 * (32 + 32)) == 10_056_192
    r = cost_report(get_preset("tiny", attn_type="gqa", num_key_value_heads=2))
    assert r["kv_elements_per_token_per_layer"] == 2 * 2 * 64 and r["mha_kv_elements_per_token_per_layer"] == 512


def test_cost_report_embedding_and_odd_context():
    r = cost_report(get_preset("v3"), seq_len=1)  # one token attends to T/2 = 0.5 keys on average, not 0
    assert r["forward_flops_per_token"] - 2 * r["params_active"] == 61 * 2 * 128 * 0.5 * (192 + 128) == 2_498_560
    assert r["params_embedding"] == 129280 * 7168
    assert r["params_active_with_embedding"] == r["params_active"] + 129280 * 7168


def test_readme_preset_table_matches_info():
    """README's preset table, row by row: params, active, MTP stored and unique, KV values per token per layer,
    each within half a unit of its last printed digit."""
    import re
    from pathlib import Path

    rows = {}
    for line in (Path(__file__).parents[1] / "README.md").read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = re.findall(r"([\d.]+)([MB]?)", " ".join(cells[1:5]))

    def close(printed, unit, value):
        scale = {"M": 1e6, "B": 1e9, "": 1}[unit]
        decimals = len(printed.partition(".")[2])
        return abs(value / scale - float(printed)) <= 0.5 * 10**-decimals + 1e-9

    for name in ("tiny", "small", "v3"):
        r = cost_report(get_preset(name))
        want = [r[k] for k in ("params_total", "params_active", "params_mtp", "params_mtp_unique")]
        want.append(r["kv_elements_per_token_per_layer"])
        assert len(rows[name]) == 5 and all(close(p, u, v) for (p, u), v in zip(rows[name], want)), (name, rows[name])


def test_info_defaults_and_text(capsys):
    from nanoseek.cli import main

    assert main(["info", "--json"]) == 0  # --preset tiny, --seq-len 4096
    r = json.loads(capsys.readouterr().out)
    assert (r["preset"], r["params_total"], r["seq_len"]) == ("tiny", 8_223_744, 4096)
    assert main(["info", "--preset", "v3"]) == 0
    out = capsys.readouterr().out
    v3 = cost_report(get_preset("v3"))
    assert f"{v3['params_active'] / 1e9:.3f} B activated per token" in out and "36.626 B activated" in out
    assert "576 elements/token/layer (MHA: 32768), 68.6 KiB/token in bf16" in out  # 576 x 61 x 2 B / 1024


def test_v2_lite_yarn_amplitude_is_one():
    """V2-Lite's config sets mscale = mscale_all_dim = 0.707, so YaRN's cos/sin amplitude, mscale(40, 0.707) /
    mscale(40, 0.707), is exactly 1 (mscale = 1.0 would give 1.0857)."""
    from nanoseek.model.rope import inv_frequencies

    assert inv_frequencies(get_preset("v2-lite"), 64)[1] == 1.0
