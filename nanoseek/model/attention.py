"""Attention: DeepSeek's Multi-head Latent Attention (MLA), and MHA/GQA baselines with the same RoPE.

MLA (V3 §2.1.1): the query goes through a low-rank bottleneck (q_lora_rank, RMSNorm on the latent); keys and
values are produced from one shared latent c_KV [kv_lora_rank] (RMSNorm'd) plus ONE decoupled RoPE key k_pe
[qk_rope_head_dim] shared by all heads.

Two mathematically identical paths, switchable at run time (`attn_impl`):
- naive: expand c_KV with W_UKV (kv_b_proj) into per-head k_nope and v, then ordinary attention.
  Cheaper for training/prefill (scores in qk_head_dim = 192 at V3 size).
- absorb: fold W_UK into the query (q_nope' = q_nope W_UK, per head, in latent space) and apply W_UV after
  attending over the latents. Keys/values are the latents themselves, so the cache holds only
  kv_lora_rank + qk_rope_head_dim values per token, and all heads share one "key head" (MQA over latents).
  Decoding folds the heads into the query-length axis (one pass over the cache serves every head); a causal
  prefill broadcasts the key head over the heads instead, so that the causal kernel skips the blocks above
  the diagonal (2x faster at 2K tokens than the folded query with an explicit mask).

Tensor legend: B batch, T new tokens, S keys (cached + new), H heads, C kv_lora_rank, R rope dim.
Masks are bool [B|1, 1, T, S], True = may attend; None means plain causal (T > 1: no cache, or a cache written
from slot 0) or attend-all (T == 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import LayerCache
from .layers import Linear, RMSNorm
from .rope import apply_rope, softmax_scale

ABSORB_FP8 = (
    "FP8 Linears need attn_impl=naive: the absorbed MLA path multiplies by kv_b_proj's weight inside the "
    "attention core, so kv_b_proj would silently run in high precision"
)


def _sdpa(q, k, v, mask, causal: bool, scale: float, gqa: bool = False) -> torch.Tensor:
    dv, dq = v.shape[-1], q.shape[-1]
    if dv < dq:
        # The fused CPU kernels need equal q/k and v head dims (MLA: 192 vs 128); otherwise torch falls back
        # to the unfused math path (7x slower in fp32 here). Zero-padding v is exact: padded outputs are 0.
        v = F.pad(v, (0, dq - dv))
    elif dv > dq:  # a config with v_head_dim > qk_head_dim: zero-pad q and k instead (q.k is unchanged)
        q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=gqa
    )
    return o[..., :dv]


def _plain_causal(T: int, mask: torch.Tensor | None, cache: LayerCache | None, start_pos: int) -> bool:
    """Whether T > 1 new tokens attend causally to exactly themselves: no mask, and no cache or a cache written
    from slot 0 (then the keys are these T tokens). The causal kernel skips the blocks above the diagonal."""
    return T > 1 and mask is None and (cache is None or start_pos == 0)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.impl = cfg.attn_impl
        H, d, qk = self.n_heads, cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(d, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk)
        else:
            self.q_proj = Linear(d, H * qk)
        self.kv_a_proj_with_mqa = Linear(d, cfg.kv_lora_rank + self.rope_dim)  # = [W_DKV ; W_KR]
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim))  # = [W_UK ; W_UV] per head
        self.o_proj = Linear(H * self.v_dim, d)
        self.scale = softmax_scale(cfg, qk)

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        if self.impl == "absorb":
            return {"kvpe": (self.kv_lora_rank + self.rope_dim,)}  # [c_KV | k_pe]: key and (sliced) value
        return {"k": (self.n_heads, self.nope + self.rope_dim), "v": (self.n_heads, self.v_dim)}

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.cfg.q_lora_rank else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, H, -1).split([self.nope, self.rope_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c = self.kv_a_layernorm(c)  # [B, T, C]
        cos, sin = rope
        il = self.cfg.rope_interleave
        q_pe = apply_rope(q_pe, cos, sin, il)  # [B, T, H, R]
        k_pe = apply_rope(k_pe[:, :, None], cos, sin, il)  # [B, T, 1, R]: one key shared by all heads
        causal = _plain_causal(T, mask, cache, start_pos)
        if self.impl == "naive":
            o = self._naive(q_nope, q_pe, c, k_pe, mask, cache, start_pos, causal)
        else:
            o = self._absorb(q_nope, q_pe, c, k_pe[:, :, 0], mask, cache, start_pos, causal)
        return self.o_proj(o.reshape(B, T, H * self.v_dim))

    def _naive(self, q_nope, q_pe, c, k_pe, mask, cache, start_pos, causal) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        k_nope, v = self.kv_b_proj(c).view(B, T, H, -1).split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, T, H, self.rope_dim)], dim=-1)  # [B, T, H, nope+R]
        if cache is not None:
            kv = cache.update(start_pos, k=k, v=v)
            k, v = kv["k"], kv["v"]
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal, self.scale)
        return o.transpose(1, 2)  # [B, T, H, V]

    def _absorb(self, q_nope, q_pe, c, pe, mask, cache, start_pos, causal) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        C = self.kv_lora_rank
        w = self.kv_b_proj.weight.to(q_nope.dtype).view(H, self.nope + self.v_dim, C)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w[:, : self.nope])  # W_UK absorbed: [B, T, H, C]
        # one buffer [c_KV | k_pe] serves as the key, and its first C columns as the value: no per-step copy
        kv = torch.cat([c, pe], dim=-1)  # [B, T, C+R]
        if cache is not None:
            kv = cache.update(start_pos, kvpe=kv)["kvpe"]  # [B, S, C+R]
        S = kv.shape[1]
        q = torch.cat([q_lat, q_pe], dim=-1)  # [B, T, H, C+R]
        if causal:  # the key head broadcast (stride 0) over the heads: the causal kernel, no mask
            kv = kv[:, None].expand(B, H, S, C + self.rope_dim)
            o = _sdpa(q.transpose(1, 2), kv, kv, None, True, self.scale)[..., :C]  # [B, H, T, C]
            return torch.einsum("bhtc,hdc->bthd", o, w[:, self.nope :])  # W_UV absorbed: [B, T, H, V]
        # heads folded into the query axis (rows ordered t-major): one latent "key head" serves all heads
        q = q.reshape(B, 1, T * H, C + self.rope_dim)
        if mask is not None:
            mask = mask.repeat_interleave(H, dim=2)  # [B|1, 1, T*H, S]
        # the value is the whole [c_KV | k_pe] row and only the first C output columns are kept: each output
        # column is P @ that value column alone, so this equals attending over c_KV (bit for bit) without
        # the copy that padding a C-wide value to the key's width would make of the whole cache every step
        o_lat = _sdpa(q, kv[:, None], kv[:, None], mask, False, self.scale)[..., :C].reshape(B, T, H, C)
        return torch.einsum("bthc,hdc->bthd", o_lat, w[:, self.nope :])  # W_UV absorbed: [B, T, H, V]


class GQA(nn.Module):
    """Standard multi-head (kv heads = heads) or grouped-query attention, RoPE on the whole head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.kv_heads, cfg.gqa_head_dim
        d = cfg.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.hd)
        self.k_proj = Linear(d, self.n_kv * self.hd)
        self.v_proj = Linear(d, self.n_kv * self.hd)
        self.o_proj = Linear(self.n_heads * self.hd, d)
        self.scale = softmax_scale(cfg, self.hd)

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.n_kv, self.hd), "v": (self.n_kv, self.hd)}

    def forward(self, x, rope, mask=None, cache: LayerCache | None = None, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rope
        il = self.cfg.rope_interleave
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.hd), cos, sin, il)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.hd), cos, sin, il)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if cache is not None:
            kv = cache.update(start_pos, k=k, v=v)
            k, v = kv["k"], kv["v"]
        causal = _plain_causal(T, mask, cache, start_pos)
        gqa = self.n_kv != self.n_heads
        o = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal, self.scale, gqa)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLA(cfg) if cfg.attn_type == "mla" else GQA(cfg)
