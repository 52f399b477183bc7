"""What a config costs: parameters (total / activated / MTP), KV cache per token, training FLOPs per token.

Counts come from the model itself built on the meta device (no memory is allocated, so `v3` works on a
laptop), which keeps them exact by construction. KV-cache formulas follow DeepSeek-V2 Table 1:
MHA 2·n_h·d_h, GQA 2·n_g·d_h, MLA (d_c + d_h^R) elements per token per layer.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .model import Transformer


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = Transformer(cfg)
    total = active = mtp = embed = 0
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        if name == "embed_tokens.weight":
            embed = n  # a lookup: stored, never multiplied
            continue
        active += round(n * frac) if ".experts." in name else n
    # the checkpoint's MTP layers also store copies of the embedding and head
    stored_mtp = mtp + cfg.num_nextn_predict_layers * 2 * cfg.vocab_size * cfg.hidden_size
    mtp_active = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            mtp_active += round(p.numel() * frac) if ".experts." in name else p.numel()
    return {
        "params_total": total,
        "params_active": active,  # per token, as DeepSeek counts it (V3 36.7B, V2-Lite 2.4B): no embedding
        "params_active_with_embedding": active + embed,
        "params_embedding": embed,
        "params_mtp": stored_mtp,
        "params_mtp_unique": mtp,
        "params_mtp_active": mtp_active,
    }


def kv_elements(cfg: ModelConfig) -> dict[str, int]:
    if cfg.attn_type == "mla":
        ours = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        d_h = cfg.qk_nope_head_dim
        naive = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        ours = naive = 2 * cfg.kv_heads * cfg.gqa_head_dim
        d_h = cfg.gqa_head_dim
    return {
        "kv_elements_per_token_per_layer": ours,
        "mha_kv_elements_per_token_per_layer": 2 * cfg.num_attention_heads * d_h,
        "naive_kv_elements_per_token_per_layer": naive,
    }


def attn_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward score + value FLOPs per token per layer at context `seq_len` (causal: T/2 keys on average)."""
    if cfg.attn_type == "mla":
        qk, v = cfg.qk_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.gqa_head_dim
    return 2 * cfg.num_attention_heads * (seq_len / 2) * (qk + v)


def cost_report(cfg: ModelConfig, seq_len: int = 4096) -> dict:
    """The `nanoseek info --json` object."""
    pc = param_counts(cfg)
    kv = kv_elements(cfg)
    matmul_active = pc["params_active"]
    attn = attn_flops_per_token(cfg, seq_len)
    fwd_main = 2 * matmul_active + cfg.num_hidden_layers * attn
    # each MTP depth runs eh_proj + one block + the shared head (its embedding lookup is free); the modules'
    # own active parameters are already summed over the D depths, the head and the attention are per depth
    head = cfg.hidden_size * cfg.vocab_size
    fwd_mtp = 2 * pc["params_mtp_active"] + cfg.num_nextn_predict_layers * (2 * head + attn)
    return {
        "preset": cfg.name,
        **pc,
        **kv,
        "kv_bytes_per_token": kv["kv_elements_per_token_per_layer"] * cfg.num_hidden_layers * 2,  # bf16
        "seq_len": seq_len,
        "train_flops_per_token": 3 * (fwd_main + fwd_mtp),
        "train_flops_per_token_main": 3 * fwd_main,
        "forward_flops_per_token": fwd_main,
    }
