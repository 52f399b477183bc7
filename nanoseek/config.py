"""One flat model config, with presets.

Field names follow the Hugging Face DeepSeek-V3 `config.json` so that a checkpoint's config maps onto this
dataclass almost key for key (see `nanoseek.hf` for the few renames). Sizes of the official models are in
../shared/reference/deepseek-v3-spec.md §8.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NanoseekError

FORMAT = "nanoseek"  # the marker nanoseek writes beside the fields of its own config.json


def config_fields(d: object, source: str, *, require_format: bool = False) -> dict:
    """The ModelConfig fields of a parsed config.json, without nanoseek's `"format"` marker. One rule for every
    reader: a native model directory's file must carry the marker (`require_format`: it is how an HF config is
    told apart), a hand-written one (`--model-config`, `info --config`) may leave it out, and a marker naming
    another format is refused, not dropped, since the fields around it were written for something else."""
    if not isinstance(d, dict):
        raise NanoseekError(f"{source}: expected a JSON object of model config fields, got {type(d).__name__}")
    if "format" in d and d["format"] != FORMAT:
        raise NanoseekError(f'{source}: "format" is {json.dumps(d["format"])}, not a nanoseek model config')
    if require_format and "format" not in d:
        raise NanoseekError(f'{source} is not a nanoseek model config (no "format": "{FORMAT}")')
    return {k: v for k, v in d.items() if k != "format"}


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def check_type(name: str, value, typ: str):
    """`value` checked against a dataclass field's declared type `typ` ("int", "float | None", "list[str]", ...):
    float fields take ints too (returned as floats), `| None` fields take None, and bools are not numbers nor
    numbers bools (JSON `true` would pass as 1). Raises NanoseekError "<name> must be an integer, got '10'"."""
    base, _, optional = typ.partition(" | ")
    if value is None and optional:
        return None
    if base == "float" and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # a 400-digit integer: no float holds it
            raise NanoseekError(f"{name} must be a finite number, got an integer of {len(str(value))} digits") from None
    if base == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:  # bool subclasses int: a bool passes only where a bool is meant
        ok = isinstance(value, {"int": int, "float": float, "bool": bool, "str": str}[base])
        ok = ok and isinstance(value, bool) == (base == "bool")
    if ok:
        return value
    kind = _KINDS.get(base, "a list of strings") + (" or null" if optional else "")
    raise NanoseekError(f"{name} must be {kind}, got {json.dumps(value, default=repr)}")


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768  # dense SwiGLU width (layers < first_k_dense_replace)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    rms_norm_eps: float = 1e-6
    init_std: float = 0.006  # V3 initialises every learnable parameter with N(0, 0.006)
    tie_word_embeddings: bool = False

    # attention: "mla" (DeepSeek), or the conventional baselines "mha" / "gqa"
    attn_type: str = "mla"
    attn_impl: str = "naive"  # MLA only: "naive" (expanded K/V) or "absorb" (latent attention); runtime switch
    q_lora_rank: int = 128  # 0 = no query compression (V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    num_key_value_heads: int = 0  # gqa/mha only; 0 = num_attention_heads (MHA)
    head_dim: int = 0  # gqa/mha only; 0 = hidden_size // num_attention_heads

    # rope / yarn
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # the V3 weights assume adjacent-pair rotation
    max_position_embeddings: int = 4096
    rope_type: str = "default"  # or "yarn"
    rope_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    # moe (n_routed_experts = 0 gives a dense model: every layer is a SwiGLU of intermediate_size)
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"  # V3 sigmoid; V2 softmax
    topk_method: str = "noaux_tc"  # noaux_tc (V3, bias-corrected), greedy / group_limited_greedy (V2)
    norm_topk_prob: bool = True
    moe_impl: str = "auto"  # routed-expert GEMMs: auto | grouped_mm | bmm | gather | loop (reference)

    # multi-token prediction
    num_nextn_predict_layers: int = 1

    # free-form provenance (e.g. the preset name); not used by the model
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # derived ---------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, idx: int) -> bool:
        """Layer `idx` (MTP layers continue the numbering) uses DeepSeekMoE rather than a dense SwiGLU."""
        return self.n_routed_experts > 0 and idx >= self.first_k_dense_replace and idx % self.moe_layer_freq == 0

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise NanoseekError(f"invalid model config ({self.name}): {msg}")

        fields = dataclasses.fields(self)
        for f in fields:  # JSON files and --override reach here: types first, then ranges
            try:
                setattr(self, f.name, check_type(f.name, getattr(self, f.name), f.type))
            except NanoseekError as e:
                bad(str(e))
        for f in fields:
            v = getattr(self, f.name)
            if f.type == "int" and v < 0:
                bad(f"{f.name} must be >= 0, got {v}")
            if f.type == "float" and not (math.isfinite(v) and v >= 0):
                bad(f"{f.name} must be finite and >= 0, got {v}")
        # sizes a zero would break; zeros that mean "off" (q_lora_rank, n_routed_experts, n_shared_experts,
        # first_k_dense_replace, num_nextn_predict_layers, qk_rope_head_dim, gqa's head_dim/kv heads) stay legal
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        positive += ["moe_layer_freq", "max_position_embeddings", "original_max_position_embeddings"]
        positive += ["rms_norm_eps", "rope_factor", "beta_fast", "beta_slow", "routed_scaling_factor"]
        if self.attn_type == "mla":
            positive += ["kv_lora_rank", "qk_nope_head_dim", "v_head_dim"]
        if self.n_routed_experts:
            positive += ["num_experts_per_tok", "moe_intermediate_size"]
        for name in positive:
            if getattr(self, name) <= 0:
                bad(f"{name} must be > 0, got {getattr(self, name)}")
        if self.rope_theta <= 1:
            bad(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.attn_type not in ("mla", "mha", "gqa"):
            bad(f"attn_type must be mla|mha|gqa, got {self.attn_type!r}")
        if self.attn_impl not in ("naive", "absorb"):
            bad(f"attn_impl must be naive|absorb, got {self.attn_impl!r}")
        if self.attn_type != "mla" and self.num_attention_heads % self.kv_heads:
            bad(f"num_attention_heads {self.num_attention_heads} not divisible by kv heads {self.kv_heads}")
        if self.attn_type != "mla" and self.gqa_head_dim < 1:
            bad(f"head_dim is 0 and hidden_size {self.hidden_size} < num_attention_heads {self.num_attention_heads}")
        if self.qk_rope_head_dim % 2 or (self.attn_type != "mla" and self.gqa_head_dim % 2):
            bad("rotary dims must be even")
        if self.rope_type not in ("default", "yarn"):
            bad(f"rope_type must be default|yarn, got {self.rope_type!r}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad(f"scoring_func must be sigmoid|softmax, got {self.scoring_func!r}")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            bad(f"topk_method must be noaux_tc|greedy|group_limited_greedy, got {self.topk_method!r}")
        if self.tie_word_embeddings:  # no DeepSeek model ties them; refused rather than silently untied
            bad("tie_word_embeddings = true is not supported (the head has its own weight)")
        if self.moe_impl not in ("auto", "grouped_mm", "bmm", "gather", "loop"):
            bad(f"moe_impl must be auto|grouped_mm|bmm|gather|loop, got {self.moe_impl!r}")
        if self.n_routed_experts:
            if self.n_routed_experts % max(self.n_group, 1):
                bad(f"n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}")
            if not 1 <= self.topk_group <= max(self.n_group, 1):
                bad(f"topk_group {self.topk_group} must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // max(self.n_group, 1)
            if self.num_experts_per_tok > self.topk_group * per_group:
                bad(f"num_experts_per_tok {self.num_experts_per_tok} exceeds the experts in the kept groups")

    # io --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        if not isinstance(d, dict):
            raise NanoseekError(f"{source}: expected a JSON object of model config fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise NanoseekError(f"{source}: unknown model config field(s): {', '.join(unknown)}")
        try:
            return cls(**d)
        except NanoseekError as e:  # name the file: a checkpoint's config.json, --model-config, `info --config`
            raise NanoseekError(f"{source}: {e}") from None

    @classmethod
    def parse_override(cls, item: str) -> tuple[str, object]:
        """`KEY=VALUE` (an `--override`) -> (field, value): VALUE is JSON of the field's type (a str field's
        VALUE is taken as is), strictly: 2.9 is not an int, nor true a float."""
        key, _, raw = item.partition("=")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        if key not in types:
            raise NanoseekError(f"--override {item}: {key!r} is not a ModelConfig field")
        try:
            value = raw if types[key] == "str" else json.loads(raw)
        except ValueError:
            raise NanoseekError(f"--override {item}: cannot parse {raw!r} as {types[key]}") from None
        return key, check_type(f"--override {key}", value, types[key])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
            raise NanoseekError(f"cannot read model config {path}: {e}") from None
        return cls.from_dict(config_fields(d, str(path)), source=str(path))

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


_YARN_V3 = dict(
    rope_type="yarn",
    rope_factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32.0,
    beta_slow=1.0,
    max_position_embeddings=163840,
)

PRESETS: dict[str, dict] = {
    # ~8M parameters: the default for CPU training, tests and benches
    "tiny": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        first_k_dense_replace=1,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        n_group=4,
        topk_group=2,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
    ),
    # ~150M parameters
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        first_k_dense_replace=1,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=6,
        moe_intermediate_size=192,
        n_group=8,
        topk_group=4,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
    ),
    # DeepSeek-V2-Lite (config_16B): softmax gate, no query compression, no MTP
    "v2-lite": dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        first_k_dense_replace=1,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        moe_intermediate_size=1408,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        num_nextn_predict_layers=0,
        **_YARN_V3,
        mscale=0.707,
        mscale_all_dim=0.707,
    ),
    # DeepSeek-V3 (671B + a 1-layer MTP module)
    "v3": dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        num_hidden_layers=61,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        first_k_dense_replace=3,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        moe_intermediate_size=2048,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        **_YARN_V3,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with field overrides (e.g. `get_preset("tiny", n_routed_experts=0)`)."""
    if name not in PRESETS:
        raise NanoseekError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], "name": name, **overrides})
