"""Benches implemented elsewhere in nanoseek (decode engine, communication): import, run, render.

The delegated function returns a JSON-able dict; it is passed through unchanged as the bench result, and
rendered generically into the report (scalars as one table, lists of records as tables, PNGs it wrote into
the output directory as images).
"""

from __future__ import annotations

from pathlib import Path

from .common import Report


def _flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(x, dict) for x in obj):
        pass  # rendered as its own table
    elif isinstance(obj, (list, tuple)):
        out.append((prefix, ", ".join(str(x) for x in obj[:16]) + (" …" if len(obj) > 16 else "")))
    else:
        out.append((prefix, obj))
    return out


def _record_lists(obj, prefix: str = "") -> list[tuple[str, list[dict]]]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _record_lists(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(x, dict) for x in obj):
        out.append((prefix, list(obj)))
    return out


def render(result: dict, report: Report, out_dir: Path, before: set[Path] = frozenset()) -> None:
    """`before`: the files `out_dir` held before the bench ran; only the others are shown as its own."""
    scalars = _flatten(result)
    if scalars:
        report.table(["key", "value"], scalars[:200], title="Result")
    for name, records in _record_lists(result):
        keys = list(dict.fromkeys(k for r in records for k, v in r.items() if not isinstance(v, (dict, list))))
        if keys:
            report.table(keys, [[r.get(k) for k in keys] for r in records], title=name)
    for png in sorted(set(Path(out_dir).glob("*.png")) - before):
        report.plot(png, png.stem)
    for md in sorted(set(Path(out_dir).glob("*.md")) - before):
        if md.name != f"{report.name}.md":
            report.text(f"The delegated bench also wrote [{md.name}]({md.name}).")
