"""nanoseek's native model format, and one loader for every kind of model directory.

A native model directory holds `config.json` (our ModelConfig plus `"format": "nanoseek"`),
`model.safetensors` (our state dict: stacked experts, fp32 master weights, routing bias) and usually
`tokenizer.json`. A training run directory (`nanoseek train --out DIR`) keeps such directories under
`DIR/checkpoints/step_XXXXXXX/` (plus the trainer state); `resolve()` picks the newest complete one.
`load_model()` also accepts an HF-format directory (config.json with a `model_type`), FP8 weights included.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import FORMAT, ModelConfig, config_fields
from .errors import NanoseekError
from .model import Transformer
from .model.layers import Linear

_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_model(model: Transformer, directory: str | Path, state_dict: dict | None = None) -> None:
    """Write config.json + model.safetensors into `directory` (callers make it atomic with `atomic_dir`).
    `state_dict` replaces the model's own (e.g. the gathered full state of an expert-parallel model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": FORMAT})
    (directory / "config.json").write_text(json.dumps({"format": FORMAT, **model.cfg.to_dict()}, indent=2) + "\n")


def read_config(directory: str | Path) -> ModelConfig:
    f = Path(directory) / "config.json"
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise NanoseekError(f"cannot read {f}: {e}") from None
    return ModelConfig.from_dict(config_fields(d, str(f), require_format=True), str(f))


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored in a native model directory."""
    f = Path(directory) / "model.safetensors"
    if not f.exists():
        raise NanoseekError(f"{directory}: no model.safetensors")
    try:
        with safe_open(f, "pt") as h:
            return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:  # truncated, empty or not a safetensors file
        raise NanoseekError(f"cannot read {f}: {e}") from None


def load_native(
    directory: str | Path, dtype: torch.dtype = torch.float32, attn_impl: str | None = None, device: str = "cpu"
) -> Transformer:
    directory = Path(directory)
    cfg = read_config(directory)
    if attn_impl:
        cfg = cfg.replace(attn_impl=attn_impl)
    weights = directory / "model.safetensors"
    sd = {k: v.to(device) for k, v in read_weights(directory).items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    for k, layer in enumerate(model.mtp):  # MTP layers that keep their own embedding/head copies
        if f"mtp.{k}.embed_tokens.weight" in sd:
            layer.embed_tokens = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if f"mtp.{k}.shared_head.head.weight" in sd:
            layer.shared_head.head = Linear(cfg.hidden_size, cfg.vocab_size)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    bad = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(sd) & set(expected)
        if sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or bad:
        parts = [
            f"{t}: {', '.join(v[:10])}"
            for t, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad))
            if v
        ]
        raise NanoseekError(f"{weights}: does not match its config.json ({'; '.join(parts)})")
    for k, v in sd.items():
        if v.is_floating_point() and not k.endswith("e_score_correction_bias"):
            sd[k] = v.to(dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    for mod in model.modules():  # non-persistent buffers (expert load counters)
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                mod.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype, device=device), persistent=False)
    model.source = str(directory)
    return model


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temporary/partial ones are ignored)."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckdir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "model.safetensors").exists()]


def recover_interrupted_saves(run_dir: str | Path) -> list[str]:
    """Clean up after a process killed while saving a checkpoint (see `atomic_dir`): a `.step_X.old-*` whose
    `step_X` is missing is the previous version, caught between the two renames, and is put back; the
    temporary `.step_X.tmp-*` / `.step_X.old-*` directories left behind are removed. Returns what was done."""
    ckdir = Path(run_dir) / "checkpoints"
    done: list[str] = []
    if not ckdir.is_dir():
        return done
    for p in sorted(ckdir.iterdir()):
        m = re.match(r"^\.(step_\d+)\.(tmp|old)-", p.name)
        if not m or not p.is_dir():
            continue
        target = ckdir / m.group(1)
        if m.group(2) == "old" and not target.exists():
            p.rename(target)
            done.append(f"restored {target.name} from an interrupted save")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name} (left by an interrupted save)")
    return done


def resolve(path: str | Path) -> tuple[str, Path]:
    """("hf" | "native", directory) for a run directory, a checkpoint directory or an HF directory."""
    path = Path(path)
    if not path.exists():
        raise NanoseekError(f"model path {path} does not exist")
    cfg = path / "config.json"
    weights = (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    if cfg.exists() and weights:
        try:
            d = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise NanoseekError(f"cannot read {cfg}: {e}") from None
        if not isinstance(d, dict):
            raise NanoseekError(f"{cfg}: expected a JSON object, got {type(d).__name__}")
        kind = "native" if d.get("format") == FORMAT else "hf"
        return kind, path
    ckpts = list_checkpoints(path)
    if ckpts:
        return "native", ckpts[-1]
    raise NanoseekError(f"{path}: not a model directory (no config.json + weights, and no checkpoints/step_*)")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, attn_impl: str = "absorb", device: str = "cpu"):
    """(model, tokenizer or None) from any model directory; the tokenizer is the directory's tokenizer.json."""
    kind, directory = resolve(path)
    if kind == "hf":
        from .hf import load_pretrained

        model = load_pretrained(directory, dtype=dtype, attn_impl=attn_impl, device=device)
    else:
        model = load_native(directory, dtype=dtype, attn_impl=attn_impl, device=device)
    tok = None
    for candidate in (directory / "tokenizer.json", Path(path) / "tokenizer.json"):
        if candidate.exists():
            from .tokenizer import Tokenizer

            tok = Tokenizer.from_file(candidate)
            break
    return model, tok
