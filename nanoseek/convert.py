"""`nanoseek convert`: between nanoseek's native checkpoint format and the Hugging Face format.

    nanoseek convert runs/tiny exported-hf --to hf [--dtype bf16] [--fp8]
    nanoseek convert exported-hf back-native --to native

The source may be a run directory (newest checkpoint), a checkpoint directory or an HF directory (FP8
included). Everything is kept: the MTP layer(s), the routing bias (always fp32), and tokenizer.json /
tokenizer_config.json. Weights are read in fp32, so with `--dtype fp32` (the default) native -> hf -> native
is bit-exact. The destination is written under a temporary name and renamed into place (`atomic_dir`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .atomic import atomic_dir
from .errors import NanoseekError

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def add_cli(sub) -> None:
    p = sub.add_parser("convert", help="convert a model between nanoseek's native format and the HF format")
    p.add_argument("src", help="run dir, checkpoint dir or HF-format dir")
    p.add_argument("dst", help="output directory (replaced atomically)")
    p.add_argument("--to", choices=["hf", "native"], required=True)
    p.add_argument("--dtype", choices=list(_DTYPES), default="fp32", help="storage dtype of the weights")
    p.add_argument("--fp8", action="store_true", help="hf only: E4M3 linear weights with 128x128 scales")
    p.set_defaults(func=lambda a: convert(a.src, a.dst, a.to, a.dtype, a.fp8))


def convert(src: str | Path, dst: str | Path, to: str, dtype: str = "fp32", fp8: bool = False) -> Path:
    from .checkpoint import resolve, save_model
    from .hf import load_pretrained, save_pretrained

    if to not in ("hf", "native"):
        raise NanoseekError(f"--to must be hf|native, got {to!r}")
    if fp8 and to != "hf":
        raise NanoseekError("--fp8 applies to --to hf only")
    src, dst = Path(src), Path(dst)
    kind, directory = resolve(src)
    if dst.resolve() in (src.resolve(), directory.resolve()):
        raise NanoseekError(f"destination {dst} is the source; choose another directory")
    if kind == "hf":
        model = load_pretrained(directory, dtype=torch.float32, attn_impl="absorb")
    else:
        from .checkpoint import load_native

        model = load_native(directory, dtype=torch.float32)  # keeps its config as is
    with atomic_dir(dst) as tmp:
        if to == "hf":
            save_pretrained(model, tmp, dtype=_DTYPES[dtype], fp8=fp8)
        else:
            save_model(model.to(_DTYPES[dtype]), tmp)  # the routing bias stays fp32
        for name in _TOKENIZER_FILES:
            for candidate in (directory / name, src / name):  # a run dir keeps its tokenizer at the top
                if candidate.is_file():
                    shutil.copy2(candidate, tmp / name)
                    break
    return dst
