"""Crash-safe writes: build a directory or file under a temporary name, then rename it into place.

A rename within one filesystem is atomic, so a kill at any moment leaves either the previous version or the
new one, never a half-written mix.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: str | Path, carry_over: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `target`; on success it replaces `target`.

    With `carry_over`, plain files of an existing target that the new version does not write are copied in
    (e.g. a tokenizer.json beside exported weights), except stale weight shards and indexes.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdir_unique(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        # safetensors writes its files 0600: give them the mode a plain new file gets (0666 & ~umask)
        file_mode = tmp.stat().st_mode & 0o666
        for f in tmp.iterdir():
            if f.is_file() and not f.is_symlink():
                f.chmod(f.stat().st_mode | file_mode)
        if target.exists():
            if carry_over:
                for f in target.iterdir():
                    stale = f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json"
                    if f.is_file() and not stale and not (tmp / f.name).exists():
                        shutil.copy2(f, tmp / f.name)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _mkdir_unique(parent: Path, prefix: str) -> Path:
    """A new directory with the normal mode (0777 & ~umask, applied by mkdir), not mkdtemp's 0700: it is
    renamed into place as the user's output directory."""
    while True:
        d = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `path` whole or not at all (a kill mid-write leaves the old file); a failed write leaves no
    temporary file behind either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def free_space_note(path: str | Path) -> str:
    """Text like " (N MiB free on its disk)" for an error message about a failed write: libraries' own messages
    (torch.save's "unexpected pos") rarely say that the disk is full. Empty when it cannot be told."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            try:
                return f" ({shutil.disk_usage(p).free / 2**20:,.0f} MiB free on its disk)"
            except OSError:
                return ""
    return ""
