"""FP8 numerics of DeepSeek-V3: formats, tile-wise quantisers, checkpoint blocks, a saved-tensor meter.

The recipe (V3 report §3.3; docs/fp8.md has the long version):

- Format: E4M3 (`torch.float8_e4m3fn`, max 448) for every GEMM operand in Fprop, Dgrad and Wgrad; no E5M2.
- Fine-grained scales, computed online from the current tensor (no delayed scaling), amax floored at 1e-4
  like the reference `act_quant` kernel: activations and activation gradients per 1x128 tile (one token,
  128 channels); weights per 128x128 block; for Wgrad the activations are re-tiled 128x1 (128 tokens, one
  channel) so that the tiles run along the contraction (token) dimension.
- A scale is the *dequantisation multiplier*: `x ~= q.float() * scale`, the checkpoint's `weight_scale_inv`
  convention. `pow2_scale=True` rounds every scale up to a power of two (the reference's `ue8m0`), which
  makes scaling and rescaling exact.
- E5M6 (5 exponent bits, 6 mantissa bits, max 65024) is the custom format the recipe caches the o_proj
  input in, with power-of-two scales. It is emulated exactly and stored in an fp16 container (every E5M6
  number is an fp16 number); the hardware format would take 1.5 bytes, the container takes 2.

Tiles are given as `(rows, cols)` over the last two dimensions of a tensor; leading dimensions are batch
dimensions (one tile grid per matrix, e.g. per expert). Ragged shapes are zero-padded to whole tiles
internally, so the scale of an edge tile covers only the elements that exist. `tile=None` is one scale for
the whole tensor: the per-tensor baseline that fine-grained scaling is measured against.

`quantize` returns `(q, scale)` with `scale` of shape `[..., ceil(R/tr), ceil(C/tc)]`; `dequantize` inverts
it; `fake_quant` is the round trip the CPU emulation feeds to its GEMMs. The FP8 Linear / routed experts
built on these live in `nanoseek.fp8_linear`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

E4M3_MAX = 448.0
E5M6_MAX = 65024.0  # (2 - 2**-6) * 2**15
BLOCK = 128
AMAX_FLOOR = 1e-4  # as in the reference act_quant kernel: an all-zero tile gets a tiny, finite scale

Tile = tuple[int, int]
TILE_1x128: Tile = (1, BLOCK)  # activations / activation gradients in Fprop and Dgrad
TILE_128x1: Tile = (BLOCK, 1)  # the same tensors re-tiled along tokens for Wgrad
TILE_128x128: Tile = (BLOCK, BLOCK)  # weights

FORMATS = {"e4m3": (E4M3_MAX, torch.float8_e4m3fn), "e5m6": (E5M6_MAX, torch.float16)}


# ------------------------------------------------------------------------------------------- tile views
def _tiled(x: torch.Tensor, tile: Tile) -> torch.Tensor:
    """View `[..., R, C]` as `[..., R/tr, tr, C/tc, tc]`, zero-padding R and C up to whole tiles."""
    if x.dim() < 2:
        raise ValueError(f"tiled quantisation needs a tensor with >= 2 dims, got shape {tuple(x.shape)}")
    tr, tc = tile
    R, C = x.shape[-2:]
    pr, pc = -R % tr, -C % tc
    if pr or pc:  # one copy plus zeroing the margins (F.pad would fill everything, then copy)
        xp = x.new_empty(*x.shape[:-2], R + pr, C + pc)
        xp[..., :R, :C] = x
        xp[..., R:, :].zero_()
        xp[..., :R, C:].zero_()
        x = xp
    return x.reshape(*x.shape[:-2], (R + pr) // tr, tr, (C + pc) // tc, tc)


def _untiled(t: torch.Tensor, R: int, C: int) -> torch.Tensor:
    *lead, rb, tr, cb, tc = t.shape
    t = t.reshape(*lead, rb * tr, cb * tc)
    return t if (rb * tr, cb * tc) == (R, C) else t[..., :R, :C].contiguous()


# ------------------------------------------------------------------------------------- format helpers
def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Round positive scales up to a power of two, exactly (frexp, not log2, so 2**k stays 2**k). NaN and inf
    stay as they are (frexp gives them exponent 0, i.e. a scale of 1 that would hide an overflow)."""
    m, e = torch.frexp(s)  # s = m * 2**e with 0.5 <= m < 1
    return torch.where(s.isfinite(), torch.ldexp(torch.ones_like(s), e - (m == 0.5).to(e.dtype)), s)


def round_e5m6(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (|v| <= E5M6_MAX) to E5M6: 6 mantissa bits, exponents down to 2**-14, subnormals
    below that (quantum 2**-20), round-half-to-even. Exact: only power-of-two rescalings and a rounding."""
    _, e = torch.frexp(v)  # |v| = m * 2**e, 0.5 <= m < 1: the leading bit is 2**(e-1)
    quantum = torch.ldexp(torch.ones_like(v), (e - 1).clamp_min(-14) - 6)
    return torch.round(v / quantum) * quantum


def _flush_denormal_on() -> bool:
    return torch.tensor(2.0**-130, dtype=torch.float32).item() == 0.0


def _decode(q: torch.Tensor, nan_codes: bool = True) -> tuple[torch.Tensor, float]:
    """Stored values -> a fresh fp32 tensor `v` and a factor `f` with values == v * f exactly.

    For float8_e4m3fn on CPU this is a bit shuffle (~4x faster than `q.float()`, which converts element by
    element): sign and the 7 exponent/mantissa bits are moved into an fp32 bit pattern, which reads as the
    value times 2**-120; E4M3 subnormals land on fp32 denormals, so it is skipped if denormals are flushed.
    The shuffle reads E4M3's NaN code (S.1111.111) as 480, so `nan_codes` puts NaN back there (one more pass
    over q; see `dequantize` for when it may be skipped).
    """
    if q.dtype == torch.float8_e4m3fn and q.device.type == "cpu" and not _flush_denormal_on():
        bits = q.view(torch.int8).to(torch.int32)
        bits.bitwise_left_shift_(20).bitwise_and_(-0x78100000)  # keep 0x87F00000: sign + 7 low bits
        if nan_codes:
            bits.masked_fill_(q.view(torch.uint8).bitwise_and(0x7F) == 0x7F, 0x7FC00000)
        return bits.view(torch.float32), 2.0**120
    return q.to(torch.float32, copy=True), 1.0


# ------------------------------------------------------------------------------------------- quantise
def quantize(
    x: torch.Tensor, tile: Tile | None = TILE_1x128, *, pow2_scale: bool = False, fmt: str = "e4m3"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `x` with one scale per `tile` of its last two dims (None: one scale for the whole tensor).

    Returns `(q, scale)`: `q` has x's shape in float8_e4m3fn (fmt="e4m3") or in the fp16 container of E5M6
    (fmt="e5m6", which always uses power-of-two scales, as in the recipe); `scale` is fp32,
    `[..., ceil(R/tr), ceil(C/tc)]` (all-ones shape for tile=None), and `x ~= dequantize(q, scale, tile)`.
    As in the reference kernel, `q = x / scale` is computed in fp32 and rounded (to nearest even) once.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    fmax, storage = FORMATS[fmt]
    pow2_scale = pow2_scale or fmt == "e5m6"
    if tile is None:
        t = x
        amax = torch.maximum(t.amax(), -t.amin()).reshape([1] * x.dim())
    else:  # (bf16 x: the max is exact either way; 1xN tiles run faster from an fp32 copy, NxM ones without)
        t = _tiled(x.float() if tile[0] == 1 else x, tile)
        amax = torch.maximum(t.amax(dim=(-3, -1)), -t.amin(dim=(-3, -1)))
    scale = amax.float().clamp_min(AMAX_FLOOR) / fmax
    if pow2_scale:
        scale = pow2_ceil(scale)
    v = t / (scale if tile is None else scale[..., :, None, :, None])  # promoted to (at least) fp32
    # |v| <= fmax up to the rounding of `scale`, which rounds back to fmax: no clamp needed for E4M3
    q = v.to(storage) if fmt == "e4m3" else round_e5m6(v.clamp_(-fmax, fmax)).to(storage)
    if tile is not None:
        q = _untiled(q, *x.shape[-2:])
    return q, scale


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    tile: Tile | None = TILE_1x128,
    dtype: torch.dtype = torch.float32,
    *,
    nan_codes: bool = True,
) -> torch.Tensor:
    """Inverse of `quantize`: `q * scale` broadcast over the tiles, computed in fp32, returned in `dtype`.

    `nan_codes=False` skips restoring E4M3's NaN code as NaN (see `_decode`), for `q` fresh from `quantize`
    (the FP8 GEMMs' hot path): it writes that code only into tiles whose scale is inf or NaN, so the tile comes
    out non-finite either way. Any other `q` (a checkpoint's weights) keeps the default."""
    v, f = _decode(q, nan_codes)
    s = scale.float() * f
    if not bool(torch.isfinite(s).all()):  # a scale >= 2**8 times the decode factor: apply it separately
        v, s = v.mul_(f), scale.float()
    if tile is None:
        return v.mul_(s).to(dtype)
    R, C = q.shape[-2:]
    t = _tiled(v, tile)
    grid = (*t.shape[:-4], t.shape[-4], t.shape[-2])
    if tuple(scale.shape) != grid:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match the {tile} tile grid {grid}")
    t.mul_(s[..., :, None, :, None])
    return _untiled(t, R, C).to(dtype)


def fake_quant(
    x: torch.Tensor,
    tile: Tile | None = TILE_1x128,
    *,
    pow2_scale: bool = False,
    fmt: str = "e4m3",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """quantise -> dequantise: the values an FP8 GEMM would see, in `dtype` (default: x's dtype; pass
    torch.float32 to keep them exact, since value * scale is generally not a bf16 number)."""
    q, s = quantize(x, tile, pow2_scale=pow2_scale, fmt=fmt)
    return dequantize(q, s, tile, dtype or x.dtype, nan_codes=False)


# ------------------------------------------------------------------- checkpoint blocks (HF loader API)
def block_dequant(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, dtype=torch.float32) -> torch.Tensor:
    """Dequantise a 2-D block-quantised weight: `w[i, j] * scale_inv[i // block, j // block]`.

    DeepSeek-V3 checkpoints store FP8 weights with one fp32 `<name>_scale_inv` per 128x128 block (despite
    the name, the multiplier that dequantises). Ragged edge blocks (kv_a_proj_with_mqa is 576 x 7168, a
    5 x 56 grid) are handled by padding to whole blocks and cropping back.
    """
    if w.dim() != 2:
        raise ValueError(f"block_dequant expects a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    grid = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match the {block}x{block} block grid {grid} "
            f"of a weight of shape {(rows, cols)}"
        )
    return dequantize(w, scale_inv, (block, block), dtype)


def block_quant(w: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight to E4M3 with one scale per `block` x `block` tile (online amax).

    Returns `(w_fp8, scale_inv)` with `w ~= w_fp8.float() * scale_inv[block grid]`, the checkpoint layout.
    `pow2_scale` rounds each scale up to a power of two (DeepSeek's `ue8m0`).
    """
    if w.dim() != 2:
        raise ValueError(f"block_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    return quantize(w, (block, block), pow2_scale=pow2_scale)


# ---------------------------------------------------------------------------------- memory accounting
def _storage_key(t: torch.Tensor):
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses, meta)
        return None


class SavedTensorBytes:
    """Sum the bytes autograd saves for backward while the context is active.

    Each storage is counted once (two views of one buffer hold one buffer). Pass the model's parameters as
    `exclude` to count activations only: a Linear that saves its weight does not add memory.

        with SavedTensorBytes(exclude=model.parameters()) as m:
            loss = model(x).sum()
        print(m.bytes, m.by_dtype)

    Measure a forward only: storages freed by a backward inside the context could be reused and missed.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {k for k in map(_storage_key, exclude) if k is not None}
        self.bytes = 0
        self.by_dtype: dict[torch.dtype, int] = {}
        self._seen: set = set()
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is None:
            n = t.nelement() * t.element_size()
        elif key in self.excluded or key in self._seen:
            return t
        else:
            self._seen.add(key)
            n = t.untyped_storage().nbytes()
        self.bytes += n
        self.by_dtype[t.dtype] = self.by_dtype.get(t.dtype, 0) + n
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


# ------------------------------------------------------------------------------- fp32 GEMMs, fast ones
_FAST_FP32_CPU: bool | None = None


def _cpu_fast_fp32_is_accurate() -> bool:
    """oneDNN's `fp32_precision="bf16"` mode runs fp32 matmuls as several bf16 passes on the CPU's bf16 units
    (AVX512-BF16, or AMX where present). On the machines we measured it stays fp32-accurate (~2x the bf16
    time, faster than the fp32 FMA path); check that once per process and use it only if so."""
    global _FAST_FP32_CPU
    if _FAST_FP32_CPU is None:
        ok = False
        try:
            g = torch.Generator().manual_seed(0)
            a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
            with _mkldnn_fp32_precision("bf16"):
                y = a @ b
            ref = a.double() @ b.double()
            ok = bool(((y.double() - ref).norm() / ref.norm()) < 1e-5)
        except (AttributeError, RuntimeError, ValueError):
            ok = False
        _FAST_FP32_CPU = ok
    return _FAST_FP32_CPU


@contextlib.contextmanager
def _mkldnn_fp32_precision(value: str) -> Iterator[None]:
    mm = torch.backends.mkldnn.matmul
    old = mm.fp32_precision
    mm.fp32_precision = value
    try:
        yield
    finally:
        mm.fp32_precision = old


@contextlib.contextmanager
def fp32_gemm_mode(device: torch.device | str) -> Iterator[None]:
    """fp32 matmuls that really are fp32-accurate (no TF32 on CUDA) and as fast as the device allows (bf16
    passes through oneDNN on CPU when `_cpu_fast_fp32_is_accurate`). Sets process-wide flags while active."""
    device = torch.device(device)
    if device.type == "cpu" and _cpu_fast_fp32_is_accurate():
        with _mkldnn_fp32_precision("bf16"):
            yield
    elif device.type == "cuda" and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        mm = torch.backends.cuda.matmul
        old = mm.fp32_precision
        mm.fp32_precision = "ieee"
        try:
            yield
        finally:
            mm.fp32_precision = old
    else:
        yield
