"""`nanoseek convert`: between nanoseek's native checkpoint format and the Hugging Face format.

    nanoseek convert runs/tiny exported-hf --to hf [--dtype bf16] [--fp8]
    nanoseek convert exported-hf back-native --to native

The source may be a run directory (newest checkpoint), a checkpoint directory or an HF directory (FP8
included). Everything is kept: the MTP layer(s), the routing bias (always fp32), the config (nanoseek fields
without an HF key ride along under config.json's "nanoseek" key) and tokenizer.json / tokenizer_config.json
(an HF export without one gets a minimal tokenizer_config.json naming the EOS token). Weights are read in
fp32, so with `--dtype fp32` (the default) native -> hf -> native is bit-exact.

The destination is written under a temporary name and renamed into place (`atomic_dir`). It may be new, an
empty directory or a model directory holding only model files (config.json, weights, tokenizer files),
which is replaced; anything else is refused rather than deleted: a directory with other files, a file, the
source, a directory above the source or above the current directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from .atomic import atomic_dir, free_space_note
from .errors import NanoseekError

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# what a model directory holds, besides *.safetensors: an existing DST made only of these may be replaced
_MODEL_FILES = {"config.json", "model.safetensors.index.json", "generation_config.json", "special_tokens_map.json"}
_MODEL_FILES |= set(_TOKENIZER_FILES)


def add_cli(sub) -> None:
    p = sub.add_parser("convert", help="convert a model between nanoseek's native format and the HF format")
    p.add_argument("src", help="run dir, checkpoint dir or HF-format dir")
    p.add_argument("dst", help="output directory: new, empty, or a model directory (replaced atomically); nothing else")
    p.add_argument("--to", choices=["hf", "native"], required=True)
    p.add_argument("--dtype", choices=list(_DTYPES), default="fp32", help="storage dtype of the weights")
    p.add_argument("--fp8", action="store_true", help="hf only: E4M3 linear weights with 128x128 scales")
    p.set_defaults(func=lambda a: convert(a.src, a.dst, a.to, a.dtype, a.fp8))


def check_destination(dst: Path, protected: dict[str, Path]) -> Path:
    """The resolved `dst` if writing it loses nothing, else a one-line refusal. `protected` names directories
    (the source, the current directory) that DST must neither be nor contain."""
    try:
        full = dst.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise NanoseekError(f"destination {dst}: {e}") from None
    for what, p in protected.items():
        if full == p or full in p.parents:
            raise NanoseekError(f"destination {dst} is {what} or a directory above it; choose another directory")
    if full.is_dir():
        names = sorted(f.name for f in full.iterdir())
        other = [n for n in names if n not in _MODEL_FILES and not n.endswith(".safetensors")]
        has_weights = any(n.endswith(".safetensors") for n in names)
        if names and (other or "config.json" not in names or not has_weights):
            lost = other or names
            lost = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            raise NanoseekError(
                f"destination {dst} exists and is not a model directory: replacing it would delete {lost}; "
                "remove it or choose another directory"
            )
    elif full.exists() or full.is_symlink():
        raise NanoseekError(f"destination {dst} exists and is not a directory; choose another path")
    return full


def convert(src: str | Path, dst: str | Path, to: str, dtype: str = "fp32", fp8: bool = False) -> Path:
    from .checkpoint import resolve, save_model
    from .hf import load_pretrained, save_pretrained

    if to not in ("hf", "native"):
        raise NanoseekError(f"--to must be hf|native, got {to!r}")
    if fp8 and to != "hf":
        raise NanoseekError("--fp8 applies to --to hf only")
    src, dst = Path(src), Path(dst)
    kind, directory = resolve(src)
    protected = {
        "the source": src.resolve(),
        "the source checkpoint": directory.resolve(),
        "the current directory": Path.cwd().resolve(),
    }
    out = check_destination(dst, protected)
    if kind == "hf":
        model = load_pretrained(directory, dtype=torch.float32, attn_impl=None)  # the exported attn_impl
    else:
        from .checkpoint import load_native

        model = load_native(directory, dtype=torch.float32)  # keeps its config as is
    try:
        with atomic_dir(out) as tmp:
            if to == "hf":
                save_pretrained(model, tmp, dtype=_DTYPES[dtype], fp8=fp8)
            else:
                save_model(model.to(_DTYPES[dtype]), tmp)  # the routing bias stays fp32
            for name in _TOKENIZER_FILES:
                for candidate in (directory / name, src / name):  # a run dir keeps its tokenizer at the top
                    if candidate.is_file():
                        shutil.copy2(candidate, tmp / name)
                        break
            if to == "hf" and (tmp / "tokenizer.json").is_file() and not (tmp / "tokenizer_config.json").exists():
                from .tokenizer import Tokenizer

                tok_cfg = Tokenizer.from_file(tmp / "tokenizer.json").hf_config(model.cfg.max_position_embeddings)
                (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    except OSError as e:  # e.g. a parent that is a file, a read-only or full disk
        where = f" ({e.filename})" if e.filename else ""
        raise NanoseekError(f"cannot write {dst}: {e.strerror or e}{where}") from None
    except SafetensorError as e:  # safetensors' own write errors (a full disk)
        raise NanoseekError(f"cannot write {dst}: {e}{free_space_note(out)}") from None
    return dst
