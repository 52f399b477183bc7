"""The DeepSeek-V3 transformer: embedding -> L blocks -> norm -> head, plus D multi-token-prediction modules.

Module and parameter names follow the Hugging Face checkpoint (`self_attn.q_a_proj`, `mlp.gate`,
`mlp.shared_experts`, ...) so that `nanoseek.hf` maps keys with few renames. Layers live in a ModuleDict keyed
by their index so a pipeline stage is this same model with entries removed (and `embed_tokens`, `norm`,
`lm_head` set to None where a stage does not own them).

MTP (V3 §2.2): module k combines the previous depth's hidden state h^{k-1}_i (h^0 = the main model's last
block output, before the final norm) with the embedding of token t_{i+k}:
    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])      (embedding first, as the V3 weights expect)
    h^k = Block_k(h'),   logits^k_i = Head(shared_head.norm(h^k_i))   -> predicts t_{i+k+1}
Embedding and head are shared with the main model. The V3 checkpoint also stores copies of both inside each
MTP layer; `nanoseek.hf` ties them back when they are equal and keeps them separate when they are not.

This file is single-device: it never calls a collective. Parallelism is applied from `nanoseek.parallel`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import NanoseekError
from .attention import ABSORB_FP8, MLA, build_attention
from .cache import LayerCache
from .layers import MLP, Linear, RMSNorm, cross_entropy
from .moe import Experts, Gate, MoE
from .rope import Rotary


def lm_cross_entropy(
    main: torch.Tensor, mtps: list[torch.Tensor], targets: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(next-token CE of the main logits [B, T, V], [CE of each MTP depth]) in fp32; targets [B, T] are the next
    tokens, and depth k's logits at position i predict t_{i+k+1} = targets[:, i+k], i.e. targets[:, k:]."""
    V = main.shape[-1]
    ce = cross_entropy(main.reshape(-1, V), targets.reshape(-1))
    return ce, [cross_entropy(m.reshape(-1, V), targets[:, k + 1 :].reshape(-1)) for k, m in enumerate(mtps)]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope, mask=None, cache: LayerCache | None = None, start_pos: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """`shared_head` of an MTP layer: its own final norm; the projection is the main `lm_head` unless a
    checkpoint stored a different one (then `head` holds it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head: Linear | None = None


class MTPLayer(Block):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)
        self.embed_tokens: nn.Embedding | None = None  # None = the main model's embedding

    def forward(self, h_prev, emb, rope, mask=None, cache: LayerCache | None = None, start_pos: int = 0):
        """h_prev: h^{k-1} [B, T, d]; emb: Emb(t_{i+k}) [B, T, d] -> h^k [B, T, d] (before shared_head.norm)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev.to(emb.dtype))], dim=-1))
        return super().forward(x, rope, mask, cache, start_pos)


def attention_mask(T: int, start_pos: int, key_valid: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Bool mask [B|1, 1, T, S] for T new tokens written at cache slots [start_pos, start_pos+T).

    A query sees earlier slots that are valid (`key_valid` [B, >=S], False for padding) and always itself,
    so that padded rows never have an empty softmax (which would put NaNs into the cache).
    """
    S = start_pos + T
    q_slot = torch.arange(start_pos, S, device=device)
    k_slot = torch.arange(S, device=device)
    m = k_slot[None, :] <= q_slot[:, None]  # [T, S] causal in slot order
    if key_valid is None:
        return m[None, None]
    m = (m[None] & key_valid[:, None, :S].to(device)) | (k_slot[None, None, :] == q_slot[None, :, None])
    return m[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        L, d = cfg.num_hidden_layers, cfg.hidden_size
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(L)})
        self.norm: RMSNorm | None = RMSNorm(d, cfg.rms_norm_eps)
        self.lm_head: Linear | None = Linear(d, cfg.vocab_size)
        self.mtp = nn.ModuleList([MTPLayer(cfg, L + k) for k in range(cfg.num_nextn_predict_layers)])
        rope_dim = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.gqa_head_dim
        self.rotary = Rotary(cfg, rope_dim)
        self.mtp_unavailable_reason: str | None = None  # set when a checkpoint came without its MTP weights
        self.init_weights()

    # --- construction helpers -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) for every matrix (V3 uses 0.006), ones for norms, zero routing bias/counters.
        A no-op on the meta device; call again after `to_empty()`."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, Gate)):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, RMSNorm):
                m.reset_parameters()
            elif isinstance(m, Experts):
                nn.init.normal_(m.w13, 0.0, std)
                nn.init.normal_(m.w2, 0.0, std)
            elif isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.zero_()
            elif isinstance(m, MoE):
                m.tokens_per_expert.zero_()

    def set_attn_impl(self, impl: str) -> None:
        """Switch every MLA layer between "naive" and "absorb" (same outputs; different cache layout)."""
        if impl not in ("naive", "absorb"):
            raise NanoseekError(f"attn_impl must be naive|absorb, got {impl!r}")
        for m in self.modules():
            if isinstance(m, MLA) and impl == "absorb" and getattr(m.kv_b_proj, "fp8", None) is not None:
                raise NanoseekError(ABSORB_FP8)
        self.cfg.attn_impl = impl
        for m in self.modules():
            if isinstance(m, MLA):
                m.impl = impl

    def blocks(self) -> list[Block]:
        """Main blocks then MTP blocks, in cache order."""
        return [*self.layers.values(), *self.mtp]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def make_caches(self, batch: int, max_len: int, dtype=None, device=None, mtp: bool = True) -> list[LayerCache]:
        """One preallocated cache per block (main layers, then MTP layers unless `mtp=False`)."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        blocks = self.blocks() if mtp else list(self.layers.values())
        return [LayerCache(b.self_attn.cache_spec(), batch, max_len, dtype, device) for b in blocks]

    # --- forward ------------------------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor):
        return self.rotary(positions)

    def _context(self, T, start_pos, positions, key_valid, device, cached: bool):
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=device)
        # a cached step needs a mask when it starts past slot 0 (earlier keys); from slot 0 it is plain causal
        need = key_valid is not None or (cached and T > 1 and start_pos > 0)
        mask = attention_mask(T, start_pos, key_valid, device) if need else None
        return self.rope(positions), mask

    def hidden(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        caches: list[LayerCache] | None = None,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] (or hidden states [B, T, d] on a pipeline stage without embedding) -> last block
        output [B, T, d], before the final norm (the MTP modules consume it)."""
        x = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        rope, mask = self._context(x.shape[1], start_pos, positions, key_valid, x.device, caches is not None)
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, rope, mask, caches[i] if caches is not None else None, start_pos)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def forward(self, tokens: torch.Tensor, mtp: bool = False, **kw):
        """tokens [B, T] -> main-model logits [B, T, vocab]. Keywords as in `hidden`. With `mtp=True`, the
        training forward of `forward_mtp` instead: going through `forward` lets a wrapper that hooks it
        (DistributedDataParallel) see the MTP modules' parameters used."""
        if mtp:
            return self.forward_mtp(tokens)
        h = self.hidden(tokens, **kw)
        return self.logits(h) if self.lm_head is not None else h

    # --- multi-token prediction ---------------------------------------------------------------------------
    def require_mtp(self) -> None:
        if not len(self.mtp):
            raise NanoseekError(
                self.mtp_unavailable_reason or "this model has no MTP modules (num_nextn_predict_layers = 0)"
            )

    def mtp_embed(self, k: int, tokens: torch.Tensor) -> torch.Tensor:
        layer = self.mtp[k]
        return (layer.embed_tokens or self.embed_tokens)(tokens)

    def mtp_logits_from_hidden(self, k: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.mtp[k]
        return (layer.shared_head.head or self.lm_head)(layer.shared_head.norm(h))

    def mtp_step(
        self,
        k: int,
        h_prev: torch.Tensor,
        next_tokens: torch.Tensor,
        start_pos: int = 0,
        cache: LayerCache | None = None,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One MTP depth: h^{k} from h^{k-1} [B, T, d] and the tokens t_{i+k+1} [B, T] (0-based depth k)."""
        emb = self.mtp_embed(k, next_tokens)
        rope, mask = self._context(emb.shape[1], start_pos, positions, key_valid, emb.device, cache is not None)
        return self.mtp[k](h_prev, emb, rope, mask, cache, start_pos)

    def forward_mtp(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Training forward. tokens [B, T] -> (main logits [B, T, V], [MTP logits of depth k: [B, T-k, V]]).

        With targets = the next tokens (targets[:, i] = t_{i+1}), depth k's logits at position i predict
        t_{i+k+1} = targets[:, i+k], i.e. they align with targets[:, k:].
        """
        self.require_mtp()
        h = self.hidden(tokens)
        return self.logits(h), self.mtp_logits(h, tokens)

    def mtp_logits(self, h: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Every MTP depth's logits from the main hidden states h [B, T, d] of `tokens` [B, T]."""
        outs = []
        for k in range(len(self.mtp)):
            T_k = tokens.shape[1] - (k + 1)
            if T_k <= 0:
                break
            h = self.mtp_step(k, h[:, :T_k], tokens[:, k + 1 :])
            outs.append(self.mtp_logits_from_hidden(k, h))
        return outs
