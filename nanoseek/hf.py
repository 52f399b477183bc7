"""Hugging Face checkpoint interop: `load_pretrained` and `save_pretrained`.

Reads and writes the layout of the released DeepSeek-V3 weights (and of transformers' `DeepseekV3ForCausalLM`):
config.json plus one or many `*.safetensors` files with an index. What is handled, because real checkpoints
contain it and other tools drop it:
- the MTP layer(s), stored as `model.layers.{num_hidden_layers + k}` with their own copies of the embedding
  (`embed_tokens`) and head (`shared_head.head`) and a `shared_head.norm`;
- `e_score_correction_bias`, the trained routing bias (kept fp32);
- FP8 block-quantised weights (`float8_e4m3fn` + `<name>_scale_inv`, 128x128 blocks, ragged edges);
- both config.json dialects: DeepSeek's original (`rope_scaling`, `quantization_config`) and current
  transformers' (`rope_parameters`, `rope_interleave`);
- routed experts stored per expert (`experts.{e}.gate_proj.weight`, the release layout, which we write) or
  fused (`experts.gate_up_proj` [E, 2I, d], `experts.down_proj` [E, d, I]).

Nothing is dropped silently: missing, unexpected and mis-shaped keys are one error that lists them. The one
tolerated gap is a checkpoint that declares MTP layers but holds no MTP weights (transformers saves those): it
loads without MTP, says so in one warning line, and anything needing MTP later refuses with that reason.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_dir
from .config import ModelConfig
from .errors import NanoseekError
from .fp8 import block_dequant, block_quant
from .model import Transformer

# transformers' DeepseekV3Config defaults, used for keys a config.json leaves out
_HF_DEFAULTS = dict(
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    moe_layer_freq=1,
)
NANOSEEK_KEY = "nanoseek"  # config.json key holding the ModelConfig fields that HF keys do not express
_COPIED = [k for k in _HF_DEFAULTS if k not in ("q_lora_rank", "n_group", "topk_group", "n_shared_experts")]
# weights the V3 release stores in FP8 (everything else — embedding, head, norms, gate, eh_proj — is bf16/fp32)
_FP8_SUFFIXES = (
    "q_a_proj.weight",
    "q_b_proj.weight",
    "q_proj.weight",
    "kv_a_proj_with_mqa.weight",
    "kv_b_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


# --- config --------------------------------------------------------------------------------------------------
def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a DeepSeek-V2/V3 config.json (either dialect)."""
    if not isinstance(d, dict):
        raise NanoseekError(f"{source}: expected a JSON object, got {type(d).__name__}")
    try:
        return _config_from_hf(d, source)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a field of the wrong type or a missing one
        what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise NanoseekError(f"{source}: malformed DeepSeek config ({what})") from None


def _config_from_hf(d: dict, source: str) -> ModelConfig:
    # V2/V2-Lite ship model_type deepseek_v2, V3/R1 deepseek_v3; V3-architecture derivatives (e.g. Kimi K2) keep
    # the architecture name. Anything else would silently get V3's defaults for every missing field.
    mtype, archs = d.get("model_type"), d.get("architectures")
    archs = archs if isinstance(archs, list) else []
    arch_ok = bool({"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"} & set(archs))
    if mtype not in ("deepseek_v2", "deepseek_v3") and not arch_ok:
        raise NanoseekError(
            f"{source}: model_type {mtype!r} (architectures {archs}) is not a DeepSeek V2/V3 config: "
            "expected model_type deepseek_v2 or deepseek_v3"
        )
    d = {**_HF_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k == "q_lora_rank"}}
    if d.get("attention_bias"):
        raise NanoseekError(f"{source}: attention_bias = true is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise NanoseekError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
    v2 = mtype == "deepseek_v2" or "DeepseekV2ForCausalLM" in archs
    kw = {k: d[k] for k in _COPIED}
    kw["q_lora_rank"] = d.get("q_lora_rank") or 0
    kw["n_group"] = d.get("n_group") or 1
    kw["topk_group"] = d.get("topk_group") or 1
    kw["n_shared_experts"] = d.get("n_shared_experts") or 0
    kw["n_routed_experts"] = d.get("n_routed_experts") or 0
    kw["scoring_func"] = d.get("scoring_func", "softmax" if v2 else "sigmoid")
    kw["topk_method"] = d.get("topk_method", "greedy" if v2 else "noaux_tc")
    kw["num_nextn_predict_layers"] = int(d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0)
    kw["rope_interleave"] = bool(d.get("rope_interleave", True))
    if d.get("initializer_range") is not None:
        kw["init_std"] = d["initializer_range"]  # (validated by ModelConfig)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise NanoseekError(f"{source}: rope_parameters / rope_scaling must be a JSON object, got {rope!r}")
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if "rope_theta" in rope:
        kw["rope_theta"] = rope["rope_theta"]
    if rtype == "yarn":
        kw.update(
            rope_type="yarn",
            rope_factor=float(
                rope.get("factor") or d["max_position_embeddings"] / rope["original_max_position_embeddings"]
            ),
            # absent: the context length itself, as transformers reads it (with a factor given)
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", d["max_position_embeddings"])
            ),
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 0.0),
            mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        )
    elif rtype != "default":
        raise NanoseekError(f"{source}: rope type {rtype!r} is not supported (default or yarn)")
    kw["name"] = d.get("_name_or_path") or "hf"
    kw["attn_impl"] = "absorb"  # the latent cache: what large checkpoints need (a runtime switch anyway)
    # nanoseek's own fields that no HF key carries (written by `config_to_hf`; transformers ignores the key)
    cfg, extra = ModelConfig.from_dict(kw, source), d.get(NANOSEEK_KEY) or {}
    if not isinstance(extra, dict):
        raise NanoseekError(f"{source}: {NANOSEEK_KEY!r} must be a JSON object, got {type(extra).__name__}")
    return ModelConfig.from_dict({**cfg.to_dict(), **extra}, f"{source} key {NANOSEEK_KEY!r}") if extra else cfg


def config_to_hf(cfg: ModelConfig, fp8: bool = False, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A config.json that transformers' DeepseekV3Config reads (and that keeps DeepSeek's own fields).

    `dtype` is the dtype transformers should compute in: the stored one, bf16 for FP8 weights (as the V3
    release says); nanoseek fields without an HF key go under "nanoseek", so a round trip keeps them."""
    if cfg.attn_type != "mla":
        raise NanoseekError("HF export supports MLA models only (attn_type = mla)")
    d = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **{k: getattr(cfg, k) for k in _COPIED},
        "q_lora_rank": cfg.q_lora_rank or None,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "n_shared_experts": cfg.n_shared_experts,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "scoring_func": cfg.scoring_func,
        "topk_method": cfg.topk_method,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "rope_interleave": cfg.rope_interleave,
    }
    # transformers 5 reads "dtype", older versions "torch_dtype"; from_pretrained() loads in it by default
    d["dtype"] = d["torch_dtype"] = str(torch.bfloat16 if fp8 else dtype).removeprefix("torch.")
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "yarn":
        rope.update(
            factor=cfg.rope_factor,
            original_max_position_embeddings=cfg.original_max_position_embeddings,
            beta_fast=cfg.beta_fast,
            beta_slow=cfg.beta_slow,
            mscale=cfg.mscale,
            mscale_all_dim=cfg.mscale_all_dim,
        )
    d["rope_parameters"] = rope
    if fp8:
        d["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        }
    back = config_from_hf(d).to_dict()
    extra = {k: v for k, v in cfg.to_dict().items() if back[k] != v}
    return {**d, NANOSEEK_KEY: extra} if extra else d


# --- key mapping ---------------------------------------------------------------------------------------------
def _to_hf_key(name: str, n_layers: int) -> str:
    if name.startswith("layers."):
        return "model." + name
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{n_layers + int(k)}.{rest}"
    if name in ("embed_tokens.weight", "norm.weight"):
        return "model." + name
    return name  # lm_head.weight


def hf_state_dict(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs in the release layout: per-expert weights, MTP copies of embedding and head."""
    L = model.cfg.num_hidden_layers
    for name, t in model.state_dict().items():
        hk = _to_hf_key(name, L)
        if name.endswith("experts.w13"):
            I = t.shape[-1] // 2
            base = hk[: -len("w13")]
            for e in range(t.shape[0]):
                yield f"{base}{e}.gate_proj.weight", t[e, :, :I].T
                yield f"{base}{e}.up_proj.weight", t[e, :, I:].T
        elif name.endswith("experts.w2"):
            base = hk[: -len("w2")]
            for e in range(t.shape[0]):
                yield f"{base}{e}.down_proj.weight", t[e].T
        else:
            yield hk, t
    for k, layer in enumerate(model.mtp):
        p = f"model.layers.{L + k}."
        if layer.embed_tokens is None:
            yield p + "embed_tokens.weight", model.embed_tokens.weight
        if layer.shared_head.head is None:
            yield p + "shared_head.head.weight", model.lm_head.weight


class _Checkpoint:
    """Lazy access to the tensors of an HF directory (single file or sharded with an index)."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise NanoseekError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
            if not isinstance(wmap, dict) or not all(isinstance(f, str) for f in wmap.values()):
                raise NanoseekError(f"{index}: weight_map must map tensor names to file names")
            self.where = {k: path / f for k, f in wmap.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise NanoseekError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
            self.where = {}
            for f in files:
                with self._open(f) as h:
                    self.where.update({k: f for k in h.keys()})  # noqa: SIM118 (safe_open has no __iter__)
        missing_files = sorted({str(f.name) for f in self.where.values() if not f.exists()})
        if missing_files:
            raise NanoseekError(f"{path}: index refers to missing file(s): {', '.join(missing_files)}")
        self._handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    @staticmethod
    def _open(f: Path):
        """safe_open with a one-line error for a truncated or corrupt file (a partial download)."""
        try:
            return safe_open(f, "pt")
        except Exception as e:  # SafetensorError, OSError: whatever a broken file raises
            raise NanoseekError(f"cannot read {f}: {e}") from None

    def _raw(self, key: str) -> torch.Tensor:
        f = self.where[key]
        if f not in self._handles:
            self._handles[f] = self._open(f)
        self.used.add(key)
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:  # the index names a file that does not hold the tensor, or the data is cut short
            raise NanoseekError(f"cannot read {key} from {f}: {e}") from None

    def get(self, key: str) -> torch.Tensor:
        """The tensor as fp32 (FP8 weights are dequantised with their 128x128 `_scale_inv`)."""
        t = self._raw(key)
        skey = key + "_scale_inv"
        if not t.is_floating_point():  # e.g. int8 codes: read as numbers they would be weights 100x too large
            raise NanoseekError(f"{self.path}: {key} is {t.dtype}; expected floating-point (or float8) weights")
        if t.element_size() != 1 and skey in self.where:  # its scale would be dropped without a word
            raise NanoseekError(f"{self.path}: {key} is {t.dtype} but has a {skey}: only float8 weights take one")
        if t.element_size() == 1:
            if skey not in self.where:
                raise NanoseekError(f"{self.path}: FP8 tensor {key} has no {skey}")
            try:
                return block_dequant(t, self._raw(skey))
            except ValueError as e:
                raise NanoseekError(f"{self.path}: {key}: {e}") from None
        return t.float()


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(items[:limit])}{more}"


def load_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, attn_impl: str | None = "absorb", device: str = "cpu"
) -> Transformer:
    """Load an HF-format DeepSeek-V2/V3 directory into a nanoseek `Transformer` (`attn_impl=None`: the
    config's, i.e. the one it was exported with, else absorb)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise NanoseekError(f"{path}: no config.json (not an HF-format model directory)")
    try:
        raw_cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise NanoseekError(f"{cfg_file}: unreadable ({e})") from None
    cfg = config_from_hf(raw_cfg, str(cfg_file))
    cfg = cfg.replace(attn_impl=attn_impl) if attn_impl else cfg
    ckpt = _Checkpoint(path)
    L = cfg.num_hidden_layers

    mtp_reason = None
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{L}.") for k in ckpt.where):
        mtp_reason = (
            f"{path} declares num_nextn_predict_layers = {cfg.num_nextn_predict_layers} but holds no MTP "
            f"weights (model.layers.{L}.*), as transformers saves it; MTP is unavailable for this model"
        )
        print(f"warning: {mtp_reason}", file=sys.stderr)
        cfg = cfg.replace(num_nextn_predict_layers=0)

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    sd: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    misshaped: list[str] = []

    def fetch(hk: str) -> torch.Tensor | None:
        if hk not in ckpt:
            missing.append(hk)
            return None
        return ckpt.get(hk)

    for name, meta in expected.items():
        hk = _to_hf_key(name, L)
        if name.endswith(("experts.w13", "experts.w2")):
            t = _load_experts(ckpt, hk, meta.shape, fetch)
        else:
            t = fetch(hk)
        if t is None:
            continue
        if tuple(t.shape) != tuple(meta.shape):
            misshaped.append(f"{hk} {tuple(t.shape)} (expected {tuple(meta.shape)})")
            continue
        keep_fp32 = name.endswith("e_score_correction_bias")
        sd[name] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)

    # MTP layers' stored copies of embedding and head: tied back when equal, kept when different
    own: dict[str, torch.Tensor] = {}
    for k in range(cfg.num_nextn_predict_layers):
        for sub, main in (
            ("embed_tokens.weight", "embed_tokens.weight"),
            ("shared_head.head.weight", "lm_head.weight"),
        ):
            hk = f"model.layers.{L + k}.{sub}"
            if hk in ckpt:
                t = ckpt.get(hk).to(device=device, dtype=dtype)
                shape = tuple(expected[main].shape)
                if tuple(t.shape) != shape:  # a copy of another shape cannot be the layer's own weight
                    misshaped.append(f"{hk} {tuple(t.shape)} (expected {shape})")
                elif main in sd and not torch.equal(t, sd[main]):
                    own[f"{k}.{sub}"] = t

    def is_scale(k: str) -> bool:  # a used weight's scale; one without its weight is reported as unexpected
        return k.endswith("_scale_inv") and k.removesuffix("_scale_inv") in ckpt.where

    unexpected = sorted(k for k in ckpt.where if k not in ckpt.used and not is_scale(k))
    problems = [
        _listing(title, items)
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped", misshaped),
        )
        if items
    ]
    if problems:
        raise NanoseekError(f"{path}: checkpoint does not match its config: " + "; ".join(problems))

    model.load_state_dict(sd, strict=True, assign=True)
    for key, t in own.items():  # e.g. "0.embed_tokens.weight"
        k, sub = key.split(".", 1)
        layer = model.mtp[int(k)]
        if sub.startswith("embed_tokens"):
            layer.embed_tokens = torch.nn.Embedding(t.shape[0], t.shape[1], device="meta")
            layer.embed_tokens.weight = torch.nn.Parameter(t)
        else:
            from .model.layers import Linear

            layer.shared_head.head = Linear(t.shape[1], t.shape[0]).to("meta")
            layer.shared_head.head.weight = torch.nn.Parameter(t)
    _materialize_buffers(model, device)
    model.mtp_unavailable_reason = mtp_reason
    model.source = str(path)
    return model


def _load_experts(ckpt: _Checkpoint, hk: str, shape: torch.Size, fetch) -> torch.Tensor | None:
    """Stack per-expert (or fused) HF weights into our w13 [E, d, 2I] / w2 [E, I, d]."""
    E = shape[0]
    base = hk.rsplit(".", 1)[0]  # model.layers.i.mlp.experts
    if hk.endswith("w13"):
        if f"{base}.gate_up_proj" in ckpt:  # transformers' fused layout [E, 2I, d]
            return ckpt.get(f"{base}.gate_up_proj").transpose(1, 2)
        parts = [(fetch(f"{base}.{e}.gate_proj.weight"), fetch(f"{base}.{e}.up_proj.weight")) for e in range(E)]
        if any(g is None or u is None for g, u in parts):
            return None
        return torch.stack([torch.cat([g.T, u.T], dim=1) for g, u in parts])
    if f"{base}.down_proj" in ckpt:  # fused [E, d, I]
        return ckpt.get(f"{base}.down_proj").transpose(1, 2)
    parts = [fetch(f"{base}.{e}.down_proj.weight") for e in range(E)]
    if any(p is None for p in parts):
        return None
    return torch.stack([p.T for p in parts])


def _materialize_buffers(model: torch.nn.Module, device: str) -> None:
    """Non-persistent buffers (expert load counters) are not in a checkpoint: create them as zeros."""
    for mod in model.modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                mod.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype, device=device), persistent=False)


# --- save ----------------------------------------------------------------------------------------------------
def save_pretrained(
    model: Transformer,
    path: str | Path,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    fp8: bool = False,
    max_shard_bytes: int = 4 * 2**30,
) -> None:
    """Write `model` as an HF directory (config.json + sharded safetensors + index), atomically.

    `dtype` is the storage dtype of the floating weights (the routing bias always stays fp32); `fp8=True`
    stores the linear weights as E4M3 with 128x128 `_scale_inv` blocks, like the V3 release. The options are
    keyword-only: a dtype passed in a size's place failed deep inside the sharding.
    """
    path = Path(path)
    tensors: list[tuple[str, torch.Tensor]] = []
    for hk, t in hf_state_dict(model):
        t = t.detach().to("cpu")
        if hk.endswith("e_score_correction_bias"):
            tensors.append((hk, t.float().contiguous()))
        elif fp8 and hk.endswith(_FP8_SUFFIXES) and t.dim() == 2:
            q, s = block_quant(t.float())  # t may be a transposed view (experts): safetensors wants contiguous
            tensors += [(hk, q.contiguous()), (hk + "_scale_inv", s.contiguous())]
        else:
            tensors.append((hk, (t.to(dtype) if dtype is not None else t).contiguous().clone()))

    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for kv in tensors:
        nbytes = kv[1].numel() * kv[1].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(kv)
        size += nbytes

    with atomic_dir(path, carry_over=True) as tmp:
        n = len(shards)
        wmap = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(dict(shard), str(tmp / fname), metadata={"format": "pt"})
            wmap.update({k: fname for k, _ in shard})
        if n > 1:
            total = sum(t.numel() * t.element_size() for _, t in tensors)
            index = {"metadata": {"total_size": total}, "weight_map": wmap}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        stored = dtype or model.embed_tokens.weight.dtype
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.cfg, fp8=fp8, dtype=stored), indent=2))
