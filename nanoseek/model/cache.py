"""Preallocated per-layer KV storage for incremental decoding.

Each attention module declares what it caches per token (`cache_spec()`): the absorbed MLA path stores only
the normalised latent c_KV [kv_lora_rank] and the rotated shared key k_pe [qk_rope_head_dim] (576 values per
token per layer at V3 size); the naive path and the MHA/GQA baselines store expanded K and V. Shapes are fixed
at allocation so decoding never reallocates (and `torch.compile` sees static shapes).

All rows of a batch share slot indices: slot s holds the s-th token written, whatever each row's position;
padding is handled with an attention mask by the caller, not here.
"""

from __future__ import annotations

import math

import torch

from ..errors import NanoseekError


class LayerCache:
    def __init__(
        self,
        spec: dict[str, tuple[int, ...]],
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.max_len = max_len
        self.store = {k: torch.zeros(batch, max_len, *s, dtype=dtype, device=device) for k, s in spec.items()}

    def update(self, start: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write new[name] [B, T, ...] at slots [start, start+T) and return views of slots [0, start+T)."""
        T = next(iter(new.values())).shape[1]
        if start + T > self.max_len:
            raise NanoseekError(f"sequence length {start + T} exceeds the KV cache capacity {self.max_len}")
        out = {}
        for k, v in new.items():
            buf = self.store[k]
            buf[:, start : start + T] = v.to(buf.dtype)
            out[k] = buf[:, : start + T]
        return out

    def bytes_per_token(self) -> int:
        """Bytes stored per token (per batch row) in this layer."""
        return sum(math.prod(b.shape[2:]) * b.element_size() for b in self.store.values())
