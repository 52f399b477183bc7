"""Text corpora and the streaming token packer.

A `Corpus` is a list of byte ranges of files, split deterministically into train and validation. The
`TokenStream` reads it lazily (~`GROUP_BYTES` of text at a time, so multi-GB corpora are fine),
tokenises it in batches, joins documents with EOS and cuts the stream into rows of seq_len + 1 tokens. As in
DeepSeek-V3 (spec §7), documents are packed *without* cross-document attention masking.

Split rule (files): a file is validation if the first 8 bytes of md5(path relative to the corpus root), read
as a fraction of 2**64, are below VAL_FRACTION. The hash depends only on the relative path (for a glob, relative
to the matched files' common directory, which a file matched elsewhere can change), so the split is the same on
every machine and run, and adding files never moves existing ones. If no file falls below, the
file with the lowest hash is validation; if all do, the one with the highest goes back to train. VAL_FRACTION
is 4% rather than 2% because 2% of the Python stdlib gives only ~460 KB (~130k tokens); 4% gives 73 files,
~1.1 MB: 373k tokens with a 2k BPE vocab, 306k with 8k, 283k with 32k.

Split rule (inside files): a corpus of one file, or one whose file split would hold less than a quarter or more
than four times VAL_FRACTION of the bytes (a few files, or one big file among small ones: by file, two files
would put half the data, or 37 bytes, into validation), is split inside every file instead: the last ~4% of
each (cut after a newline, so whole .jsonl lines) is validation; files too small to cut stay in training.
Adding files to such a corpus can switch it to the file rule (and back).

Undecodable UTF-8 is decoded with errors="replace" rather than rejected: the stdlib itself ships deliberately
mis-encoded test files, and one bad byte in a multi-GB corpus should not stop a training run. A UTF-8 byte
order mark at the start of a --data file (or of a .jsonl line) is skipped; the default corpus is read as is.

Directories are walked recursively, following symlinked directories (each real directory once); hidden files
and directories and `site-packages`, `dist-packages`, `__pycache__` and `node_modules` are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nanoseek.errors import NanoseekError

if TYPE_CHECKING:
    from nanoseek.tokenizer import Tokenizer

VAL_FRACTION = 0.04
DIR_SUFFIXES = (".txt", ".py", ".md", ".jsonl")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "node_modules"}
PIECE_BYTES = 64 << 10  # a long document is encoded in pieces of at most this size (see _safe_cut)
GROUP_BYTES = 512 << 10  # text read and tokenised per encode_batch call (~150k tokens, ~0.1 s on 2 cores)
# file signatures that are never valid UTF-8 text (others, e.g. bzip2's "BZh", could start a text file)
BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, as editors on Windows write it
BINARY_MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass(frozen=True)
class Source:
    """Bytes [start, end) of one file. A .jsonl source holds whole lines, each one document; any other file
    is one document of plain UTF-8 text."""

    path: Path
    rel: str  # path relative to the corpus root: the split hash and the shuffle use it
    start: int
    end: int
    mtime_ns: int = 0

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix.lower() == ".jsonl"


def _hash01(key: str) -> float:
    """A stable hash in [0, 1) (Python's hash() is salted per process, so it cannot be used)."""
    digest = hashlib.md5(key.encode("utf-8", "surrogateescape"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class Corpus:
    """Document sources split into train and validation by file, or inside files (the module docstring)."""

    name: str  # for messages: "--data <spec>" or "the Python standard library (<path>)"
    train: list[Source]
    val: list[Source]

    def fingerprint(self) -> str:
        """Changes when a training file is added, removed, resized or touched (keys the tokenizer cache)."""
        h = hashlib.sha256(f"val_fraction={VAL_FRACTION}".encode())
        for s in self.train:
            h.update(f"\n{s.path.resolve()}|{s.start}|{s.end}|{s.mtime_ns}".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def sample_texts(self, max_bytes: int) -> Iterator[str]:
        """About the first `max_bytes` of training text, for tokenizer training. Files come in stable-hash
        order so that a capped sample spreads over the whole corpus, not its alphabetically first folder."""
        budget = max_bytes
        for src in sorted(self.train, key=lambda s: (_hash01(s.rel), s.rel)):
            if budget <= 0:
                return
            pieces, end, _ = _read_source(src, src.start, 0, budget)
            budget -= end - src.start
            yield from (text for text, _ in pieces)


def default_corpus() -> Corpus:
    """All *.py files of the running Python's standard library (site-packages excluded), ~30 MB."""
    root = Path(os.path.realpath(__import__("sysconfig").get_paths()["stdlib"]))
    files = _walk(root, (".py",))
    if not files:
        raise NanoseekError(f"no .py files found in the Python standard library at {root}")
    return _make_corpus(f"the Python standard library ({root})", root, files, check=False)


def corpus_from_spec(spec: str) -> Corpus:
    """The corpus named by --data: a directory (recursive .txt/.py/.md/.jsonl), a glob, or one file."""
    name = f"--data {spec}"
    path = Path(spec).expanduser()
    if path.is_dir():
        root, files = path, _walk(path, DIR_SUFFIXES)
        if not files:
            raise NanoseekError(f"{name}: no {'/'.join(DIR_SUFFIXES)} files in this directory")
    elif path.is_file():
        root, files = path.parent, [path]
    elif path.exists():
        raise NanoseekError(
            f"{name}: not a regular file or directory (a pipe or device cannot be read twice): save it to a file"
        )
    elif any(c in spec for c in "*?["):
        import glob

        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        if not files:
            raise NanoseekError(f"{name}: the pattern matches no files")
        root = Path(os.path.commonpath([f.parent for f in files]))
    else:
        raise NanoseekError(f"{name}: no such file or directory")
    return _make_corpus(name, root, files)


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    def fail(e: OSError) -> None:
        raise NanoseekError(f"cannot read directory {e.filename}: {e.strerror}")

    out, seen = [], {os.path.realpath(root)}
    # symlinked directories are followed (a corpus assembled from links is common), each real directory once,
    # so a link back up the tree cannot loop
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and d not in _SKIP_DIRS and real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        out += [Path(dirpath, f) for f in filenames if f.lower().endswith(suffixes) and not f.startswith(".")]
    return sorted(out)


def _check_text(path: Path, name: str) -> None:
    """Refuse a file that is evidently not text (compressed, or NUL bytes in its first 8 KB): it would decode to
    replacement characters and train the model on noise without a word."""
    head = _read(path, 0, 8192)
    kind = next((k for magic, k in BINARY_MAGIC.items() if head.startswith(magic)), None)
    if kind is not None:
        raise NanoseekError(f"{name}: {path} is {kind}-compressed; decompress it first (--data takes UTF-8 text)")
    if b"\0" in head:
        raise NanoseekError(
            f"{name}: {path} is not text (a NUL byte at offset {head.index(0)}); --data takes UTF-8 text files"
            " (.txt/.py/.md/.jsonl): narrow the pattern or remove the file"
        )


def _check_jsonl(src: Source) -> None:
    """Parse every line of a .jsonl file once, up front, so that a bad line stops the run before training, with
    its line number, rather than at whatever step the stream reaches it (a repaired file then has another size
    and no longer matches the checkpoints)."""
    whole = replace(src, start=0)  # line numbers count from the top of the file
    try:
        with open(src.path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                _jsonl_text(raw, whole, line)
    except OSError as e:
        raise NanoseekError(f"cannot read {src.path}: {e.strerror}") from None


def _make_corpus(name: str, root: Path, files: list[Path], check: bool = True) -> Corpus:
    """`check`: refuse binary files and parse every .jsonl line up front (user data; not the stdlib)."""
    sources = []
    for p in files:
        try:
            st = p.stat()
            if not os.access(p, os.R_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise NanoseekError(f"{name}: cannot read {p}: {e.strerror}") from None
        if st.st_size > 0:
            sources.append(Source(p, p.relative_to(root).as_posix(), 0, st.st_size, st.st_mtime_ns))
            if check:
                _check_text(p, name)
                if sources[-1].is_jsonl:
                    _check_jsonl(sources[-1])  # each line's BOM is dropped as it is parsed
                elif _read(p, 0, 3) == BOM:  # a plain-text file's BOM is not text: its document starts after it
                    sources[-1] = replace(sources[-1], start=len(BOM))
                    if st.st_size == len(BOM):
                        sources.pop()
    if not sources:
        raise NanoseekError(f"{name}: all {len(files)} file(s) are empty, e.g. {files[0]}")
    if len(sources) == 1:
        return Corpus(name, *_split_single(sources[0]))
    h = {s.rel: _hash01(s.rel) for s in sources}
    val = {s.rel for s in sources if h[s.rel] < VAL_FRACTION}
    if not val:
        val = {min(h, key=h.__getitem__)}
    if len(val) == len(sources):
        val.remove(max(val, key=h.__getitem__))
    val_bytes = sum(s.end for s in sources if s.rel in val)
    if not VAL_FRACTION / 4 <= val_bytes / sum(s.end for s in sources) <= VAL_FRACTION * 4:
        return Corpus(name, *_split_each(sources))  # see the module docstring
    return Corpus(name, [s for s in sources if s.rel not in val], [s for s in sources if s.rel in val])


def _split_each(sources: list[Source]) -> tuple[list[Source], list[Source]]:
    """Split every file as `_split_single` does; a file too small to cut stays whole in training."""
    train, val = [], []
    for src in sources:
        try:
            (tr,), (va,) = _split_single(src)
        except NanoseekError:
            train.append(src)
            continue
        train.append(tr)
        val.append(va)
    if not val:
        raise NanoseekError(f"{sources[0].path.parent}: every file is too small to split into train and validation")
    return train, val


def _split_single(src: Source) -> tuple[list[Source], list[Source]]:
    """Split one file so that the last ~VAL_FRACTION (whole lines when possible) is validation.

    With no line start after the target the cut falls back to the last one before it, which a long last line
    makes far (one 50 KB line after 2 KB of short ones would put 96% into validation): if validation would
    get more than four times VAL_FRACTION, plain text is cut inside the line at a character boundary, and a
    .jsonl file, whose documents cannot be cut, is refused (in a corpus of several files it then stays whole
    in training)."""
    size = src.end
    target = int(size * (1 - VAL_FRACTION))
    cut = _find_line_start(src.path, target, size)
    share = None if cut is None else (size - cut) / (size - src.start)
    if cut is None or share > 4 * VAL_FRACTION:
        if src.is_jsonl and cut is None:
            raise NanoseekError(f"{src.path}: a single .jsonl file needs at least 2 lines (documents) to split")
        if src.is_jsonl:
            raise NanoseekError(
                f"{src.path}: its last document is {share:.0%} of the file, too much for a validation split of "
                "whole .jsonl lines: split it into more lines, or add files"
            )
        # No line start near the target: cut at a UTF-8 character boundary near the target.
        window = _read(src.path, target, 4)
        cut = target + next((i for i, b in enumerate(window) if b & 0xC0 != 0x80), len(window))
        if not 0 < cut < size:
            raise NanoseekError(f"{src.path}: too small to split into train and validation ({size} bytes)")
    return [replace(src, end=cut)], [replace(src, start=cut)]


def _find_line_start(path: Path, target: int, size: int, block: int = 1 << 20) -> int | None:
    """The first line start >= target that is not end-of-file, else the last one before target (> 0)."""
    pos = max(target - 1, 0)
    while pos < size - 1:
        data = _read(path, pos, min(block, size - 1 - pos))  # a '\n' at size-1 would leave nothing after it
        i = data.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(data)
    end = max(target - 1, 0)
    while end > 0:
        start = max(end - block, 0)
        i = _read(path, start, end - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return None


def _read(path: Path, offset: int, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(n)
    except OSError as e:
        raise NanoseekError(f"cannot read {path}: {e.strerror}") from None


def _safe_cut(data: bytes) -> int:
    """Where to end a piece of a longer document: just before a '\\n' (or the '\\r' of a '\\r\\n') that follows
    a non-space byte.

    The byte-level pre-tokenizer never merges across such a point (the word before it cannot absorb the
    newline, and the whitespace run starts at it), so encoding the pieces separately gives exactly the same
    ids as encoding the whole document. Without such a point, cut at a UTF-8 character boundary."""
    i = data.rfind(b"\n")
    while i > 0:
        if not _space_before(data, i):
            return i
        if data[i - 1] == 0x0D and i > 1 and not _space_before(data, i - 1):  # CRLF: cut before the "\r"
            return i - 1
        i = data.rfind(b"\n", 0, i)
    j = len(data) - 1
    while j > 0 and data[j] & 0xC0 == 0x80:  # back off to the start of the last (maybe partial) character
        j -= 1
    return j if j > 0 else len(data)


def _space_before(data: bytes, i: int) -> bool:
    """Whether the character ending at byte i is whitespace, Unicode included (NBSP, U+3000, ...): the
    pre-tokenizer's whitespace runs absorb the newline after any of them."""
    j = i - 1
    while j > 0 and data[j] & 0xC0 == 0x80:
        j -= 1
    return data[j:i].decode("utf-8", errors="replace").isspace()


def _read_source(src: Source, offset: int, line: int, budget: int) -> tuple[list[tuple[str, bool]], int, int]:
    """Read from byte `offset` of `src` until about `budget` bytes are read or the source ends.

    Returns ([(text, ends_document), ...], new_offset, new_line); `line` counts lines of `src` read so far
    (.jsonl error messages). A plain-text document is returned in pieces of <= PIECE_BYTES (see _safe_cut)."""
    pieces: list[tuple[str, bool]] = []
    if src.is_jsonl:
        stop = min(src.end, offset + budget)
        try:
            with open(src.path, "rb") as f:
                f.seek(offset)
                while offset < stop:
                    raw = f.readline()
                    if not raw:
                        raise NanoseekError(f"{src.path} shrank while reading (expected {src.end} bytes)")
                    offset, line = offset + len(raw), line + 1
                    text = _jsonl_text(raw, src, line)
                    if text:
                        pieces.append((text, True))
        except OSError as e:
            raise NanoseekError(f"cannot read {src.path}: {e.strerror}") from None
        return pieces, offset, line
    while offset < src.end and budget > 0:
        n = min(PIECE_BYTES, src.end - offset)
        data = _read(src.path, offset, n)
        if len(data) < n:
            raise NanoseekError(f"{src.path} shrank while reading (expected {src.end} bytes)")
        if offset + n < src.end:
            data = data[: _safe_cut(data)]
        offset += len(data)
        budget -= len(data)
        pieces.append((data.decode("utf-8", errors="replace"), offset == src.end))
    return pieces, offset, line


def _jsonl_text(raw: bytes, src: Source, line: int) -> str:
    """The "text" field of one .jsonl line ("" for a blank line); errors name the file and line number."""
    s = raw.decode("utf-8-sig", errors="replace").strip()  # -sig: a BOM, as editors on Windows write
    if not s:
        return ""

    def where() -> str:  # a validation range inside a single file starts mid-file: count the lines before it
        before = sum(_read(src.path, o, min(1 << 20, src.start - o)).count(b"\n") for o in range(0, src.start, 1 << 20))
        return f"{src.path} line {before + line}"

    try:
        obj = json.loads(s)
    except ValueError as e:
        raise NanoseekError(f"{where()}: invalid JSON ({getattr(e, 'msg', e)})") from None
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise NanoseekError(f"{where()}: expected a JSON object with a string field 'text'")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud800"-style escapes; the tokenizer cannot take them
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


WINDOW_CHUNK = 1024  # rows read at a time while filling a shuffle window


class TokenStream:
    """Packs a corpus split into rows of seq_len + 1 tokens: row[:-1] are the inputs, row[1:] the targets.

    Documents are joined with EOS (doc_a EOS doc_b EOS ...), and consecutive rows are consecutive slices of
    that stream, so concatenating rows reproduces it exactly. The train split loops over epochs forever, each
    in its own file order (a hash of seed, epoch and path); the validation split is read once, in file order.

    Text is read and tokenised in groups of ~GROUP_BYTES, on demand. The leftover after a batch is always a
    suffix of the current group, so the resumable state is tiny: where that group started, how many of its
    tokens were consumed, and its length as a check. `load_state_dict` re-reads and re-tokenises that one
    group (deterministic), which keeps checkpoints small however long documents or groups are.

    `shuffle_rows` = W > 0 (train split): rows are served from windows of W consecutive rows (fewer when an
    epoch ends first), each window in a seeded random order, so that a batch samples ~W·seq_len tokens of text
    instead of one or two files: contiguous batches drive the MoE's expert loads (and the routing bias that
    follows them) and the gradient by whatever file is being read. Every row is still served exactly once per
    pass. The state stays small: the stream position where the current window began, the window's number (its
    permutation seed) and how many of its rows were served; resuming re-reads the window.
    """

    def __init__(
        self,
        corpus: Corpus,
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        seed: int = 0,
        split: str = "train",
        group_bytes: int = GROUP_BYTES,
        shuffle_rows: int = 0,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.corpus, self.tokenizer, self.seq_len, self.split = corpus, tokenizer, seq_len, split
        self.seed, self.group_bytes = seed, group_bytes
        self.sources = corpus.train if split == "train" else corpus.val
        self._loop = split == "train"
        self._corpus_id = hashlib.sha256(
            "\n".join(f"{s.rel}|{s.start}|{s.end}" for s in self.sources).encode("utf-8", "surrogateescape")
        ).hexdigest()[:16]
        self._order_cache: tuple[tuple[int, int], list[int]] = ((seed, -1), [])
        # Next read: (epoch, index in the epoch's file order, byte offset, lines read in that file).
        self._pos = (0, 0, self._source(0, 0).start, 0)
        self._group_start = self._pos
        self._group = np.empty(0, dtype=np.int64)  # [group_tokens] ids of the current group
        self._consumed = 0
        self._dry_wraps = 0  # epochs passed without a single token: an empty corpus, not an infinite loop
        self.tokens_served = 0
        if shuffle_rows < 0:
            raise ValueError(f"shuffle_rows must be >= 0, not {shuffle_rows}")
        self.shuffle_rows = shuffle_rows if split == "train" else 0
        self._window: torch.Tensor | None = None  # [W, seq_len + 1] rows of the current window, in serving order
        self._window_next = 0  # rows of the window already served
        self._window_index = -1  # number of the current window (seeds its permutation)
        self._window_start: dict[str, Any] | None = None  # stream state where the current window began

    def _source(self, epoch: int, k: int) -> Source:
        if not self._loop:
            return self.sources[k]
        if self._order_cache[0] != (self.seed, epoch):
            keys = [_hash01(f"{self.seed}:{epoch}:{s.rel}") for s in self.sources]
            self._order_cache = ((self.seed, epoch), sorted(range(len(self.sources)), key=keys.__getitem__))
        return self.sources[self._order_cache[1][k]]

    def _read_group(self) -> np.ndarray:
        """Read ~group_bytes of text from self._pos and tokenise it: [n] int64 ids, EOS after each doc."""
        epoch, k, offset, line = self._group_start = self._pos
        n, pieces, budget = len(self.sources), [], self.group_bytes
        while budget > 0:
            if k == n:
                if not self._loop:
                    break
                epoch, k, line = epoch + 1, 0, 0
                offset = self._source(epoch, 0).start
                self._dry_wraps += 1
                if self._dry_wraps >= 2 and not pieces:
                    raise NanoseekError(f"{self.corpus.name}: the {self.split} split contains no text")
                continue
            src = self._source(epoch, k)
            got, new_offset, line = _read_source(src, offset, line, budget)
            budget -= new_offset - offset
            offset = new_offset
            pieces += got
            if offset >= src.end:
                k += 1
                offset, line = (self._source(epoch, k).start if k < n else 0), 0
        self._pos = (epoch, k, offset, line)
        if not pieces:
            return np.empty(0, dtype=np.int64)
        self._dry_wraps = 0
        ids = self.tokenizer.encode_batch([text for text, _ in pieces])
        eos = self.tokenizer.eos_id
        for piece_ids, (_, ends_doc) in zip(ids, pieces):
            if ends_doc:
                piece_ids.append(eos)
        return np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))

    def _take(self, n: int) -> np.ndarray:
        """The next n tokens of the stream ([n] int64); fewer only at the end of the val split."""
        parts, need = [], n
        while need > 0:
            avail = len(self._group) - self._consumed
            if avail == 0:
                if not self._loop and self._pos[1] >= len(self.sources):
                    break  # end of the validation split
                self._group, self._consumed = self._read_group(), 0
                continue
            take = min(avail, need)
            parts.append(self._group[self._consumed : self._consumed + take])
            self._consumed += take
            need -= take
        out = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        self.tokens_served += len(out)
        return out

    def _rows(self, n: int) -> torch.Tensor:
        """The next n packed rows of the stream, [n, seq_len + 1]."""
        rows = self._take(n * (self.seq_len + 1))
        if len(rows) < n * (self.seq_len + 1):
            raise NanoseekError(f"{self.corpus.name}: the {self.split} split ran out of tokens")
        return torch.from_numpy(rows).view(n, self.seq_len + 1)

    def _fill_window(self, index: int) -> None:
        """Read the next window: W rows, or fewer when the stream wraps into a new epoch first (a small corpus
        then gets one window per epoch instead of re-reading itself many times over)."""
        self._window_start = self._stream_state()
        epoch, parts, need = self._pos[0], [], self.shuffle_rows
        while need > 0 and self._pos[0] == epoch:
            parts.append(self._rows(min(need, WINDOW_CHUNK)))
            need -= len(parts[-1])
        rows = torch.cat(parts)
        g = torch.Generator().manual_seed(int(_hash01(f"{self.seed}:window:{index}") * 2**62))
        # int32 halves the window's memory (token ids < 2^31); batches are handed out as int64
        perm = torch.randperm(len(rows), generator=g)
        self._window, self._window_next, self._window_index = rows[perm].to(torch.int32), 0, index

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next [batch_size, seq_len + 1] LongTensor of packed token ids."""
        if not self.shuffle_rows:
            return self._rows(batch_size)
        parts, need = [], batch_size
        while need:
            if self._window is None or self._window_next == len(self._window):
                self._fill_window(self._window_index + 1)
            take = min(need, len(self._window) - self._window_next)
            parts.append(self._window[self._window_next : self._window_next + take])
            self._window_next += take
            need -= take
        return torch.cat(parts).long()

    def state_dict(self) -> dict[str, Any]:
        """The exact stream position, as a small dict of ints and strings (safe to store in a checkpoint)."""
        if self._window is None:
            return {**self._stream_state(), "shuffle_rows": self.shuffle_rows}
        window = {"index": self._window_index, "served": self._window_next}
        return {**self._window_start, "shuffle_rows": self.shuffle_rows, "window": window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where `state_dict` was taken: the following batches are bit-identical."""
        rows = int(state.get("shuffle_rows", 0))
        if rows != self.shuffle_rows:
            raise NanoseekError(
                f"the checkpoint's data stream shuffles windows of {rows} rows, this run {self.shuffle_rows} "
                "(--shuffle-rows must match to resume; its default follows --seq-len)"
            )
        self._load_stream_state(state)
        self._window, self._window_next, self._window_index = None, 0, -1
        if "window" in state:
            self._fill_window(int(state["window"]["index"]))
            self._window_next = int(state["window"]["served"])

    def _stream_state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "split": self.split,
            "corpus_id": self._corpus_id,
            "seed": self.seed,
            "group_bytes": self.group_bytes,
            "group_start": list(self._group_start),  # (epoch, index in epoch order, byte offset, line)
            "group_tokens": len(self._group),
            "consumed": self._consumed,
            "tokens_served": self.tokens_served,
        }

    def _load_stream_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1 or state.get("split") != self.split:
            raise NanoseekError(f"data state in checkpoint is not a version-1 {self.split} stream state")
        if state["corpus_id"] != self._corpus_id:
            raise NanoseekError(
                f"{self.corpus.name}: the {self.split} files differ from those of the checkpoint being "
                "resumed (different --data, or files were added, removed or resized)"
            )
        self.seed, self.group_bytes = int(state["seed"]), int(state["group_bytes"])
        epoch, index, offset, line = (int(x) for x in state["group_start"])
        self._pos = (epoch, index, offset, line)
        self._group, self._consumed, self._group_start = np.empty(0, dtype=np.int64), 0, self._pos
        if state["group_tokens"]:
            self._group = self._read_group()
            if len(self._group) != state["group_tokens"]:
                raise NanoseekError(
                    f"{self.corpus.name}: re-reading the data at the checkpoint position gave "
                    f"{len(self._group)} tokens, not {state['group_tokens']} (files or tokenizer changed)"
                )
            self._consumed = int(state["consumed"])
        self.tokens_served = int(state["tokens_served"])


def val_batches(
    corpus: Corpus, tokenizer: Tokenizer, seq_len: int, batch_size: int, max_tokens: int
) -> list[torch.Tensor]:
    """The first max_tokens tokens of the validation split as [<=batch_size, seq_len + 1] batches.

    Fixed and finite, so validation losses are comparable across runs and checkpoints. Only whole rows are
    kept (max_tokens // (seq_len + 1) of them, or fewer if the split is shorter); the last batch may be short.
    """
    row = seq_len + 1
    if max_tokens < row:
        raise NanoseekError(f"validation max_tokens {max_tokens} is less than one row of seq_len + 1 = {row}")
    flat = TokenStream(corpus, tokenizer, seq_len, split="val")._take(max_tokens // row * row)
    n_rows = len(flat) // row
    if n_rows == 0:
        raise NanoseekError(
            f"{corpus.name}: the validation split has only {len(flat)} tokens, less than one row of {row}"
        )
    return list(torch.from_numpy(flat[: n_rows * row]).view(n_rows, row).split(batch_size))
