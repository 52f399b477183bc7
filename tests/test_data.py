"""Tokenizer and streaming data pipeline: exact round trips, exact packing, bit-identical resume, clear errors."""

import json
import os
import random
from pathlib import Path

import pytest
import torch

import nanoseek.data as data
import nanoseek.tokenizer as tokmod
from nanoseek.data import TokenStream, _make_corpus, corpus_from_spec, default_corpus, val_batches
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import Tokenizer, check_vocab_fits, get_tokenizer, train_tokenizer

WORDS = ["def", "class", "return", "self", "import", "for", "while", "lambda", "yield", "None", "data"]
TRICKY = [
    "",
    "hello world",
    "  two leading spaces, trailing spaces  ",
    "\n\n\t\r\n mixed\twhitespace \x0b\x0c\n",
    "naïve café, Straße, ΑΒΓ, кириллица",
    "日本語のテキストと中文",
    "emoji 🚀 and a family 👩\u200d👩\u200d👧 and e\u0301 combining",
    "control \x00\x01\x7f bytes",
    "مرحبا بالعالم",
    "literal <|endoftext|> in text",
    "    def f(x):\n        return x ** 2  # comment\n",
]


def _text(seed: int, n_lines: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        indent = "    " * rng.randrange(3)
        lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 9))))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([_text(i, 200) for i in range(20)] + TRICKY, 400)


def _make_dir(root, n_files=12, n_lines=60):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (root / f"f{i:02d}.py").write_text(_text(i, n_lines + 7 * i), encoding="utf-8")
    return root


def _docs_of(tok, sources):
    return {tuple(tok.encode(s.path.read_bytes()[s.start : s.end].decode("utf-8", "replace"))) for s in sources}


def _split_docs(flat, eos):
    docs, cur = [], []
    for t in flat:
        if t == eos:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return docs


# ---------------------------------------------------------------------------------------------- tokenizer


def test_roundtrip_tricky_strings(tok):
    for s in TRICKY:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode_batch(TRICKY) == [tok.encode(s) for s in TRICKY]
    # Special-token text is encoded literally; only the packer emits the EOS id.
    assert tok.eos_id not in tok.encode("a <|endoftext|> b")
    assert tok.encode("<|endoftext|>", allow_special=True) == [tok.eos_id]
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_trained_vocab_exact_and_too_small(tok):
    assert tok.vocab_size == 400
    assert tok.eos_id == 0
    assert train_tokenizer([_text(1, 300)], 300).vocab_size == 300
    with pytest.raises(NanoseekError, match="vocab_size 100"):
        train_tokenizer(["abc"], 100)
    # EOS plus the 256 byte tokens: 257 is the smallest vocabulary that still encodes any text
    assert train_tokenizer([_text(1, 50)], 257).vocab_size == 257
    with pytest.raises(NanoseekError, match="vocab_size 256 is too small: byte-level BPE needs at least 257"):
        train_tokenizer([_text(1, 50)], 256)


def test_save_and_from_file(tok, tmp_path):
    assert tok.hf_config()["bos_token"] is None  # ours has no BOS: naming one would point at a missing token
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = Tokenizer.from_file(path)
    assert back.vocab_size == tok.vocab_size and back.eos_id == tok.eos_id
    assert [back.encode(s) for s in TRICKY] == [tok.encode(s) for s in TRICKY]


def test_hf_config_decodes_unchanged_and_keeps_the_context_length(tok):
    """transformers' default clean-up would strip spaces before punctuation on decode, breaking exact round trips
    through an exported tokenizer; model_max_length tells it the context the model was trained for."""
    cfg = tok.hf_config(4096)
    assert cfg["clean_up_tokenization_spaces"] is False and cfg["model_max_length"] == 4096


def test_from_file_finds_foreign_eos(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    def save(specials, folder):
        t = tokenizers.Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
        t.train_from_iterator([_text(0, 50)], trainer)
        folder.mkdir()
        t.save(str(folder / "tokenizer.json"))
        return folder / "tokenizer.json"

    ds = save(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"], tmp_path / "ds")
    assert Tokenizer.from_file(ds).eos_id == 1
    cfg = save(["<s>", "</s>", "<|im_end|>"], tmp_path / "cfg")
    assert Tokenizer.from_file(cfg).eos_id == 1  # "</s>" from the candidate list
    (cfg.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert Tokenizer.from_file(cfg).eos_id == 2  # the config wins
    assert Tokenizer.from_file(cfg).hf_config()["bos_token"] == "<s>"  # the vocabulary has a BOS: name it
    # Candidates are tried in order, not by id: "<|endoftext|>" beats an earlier "</s>".
    both = save(["</s>", "<|endoftext|>"], tmp_path / "both")
    loaded = Tokenizer.from_file(both)
    assert (loaded.eos_token, loaded.eos_id) == ("<|endoftext|>", 1)
    # A config EOS that the vocabulary lacks falls back to the candidates (not a hard error).
    (both.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    loaded = Tokenizer.from_file(both)
    assert (loaded.eos_token, loaded.eos_id) == ("<|endoftext|>", 1)
    # So does a config that is valid JSON but not an object (no .get: it must not escape as an AttributeError).
    (both.parent / "tokenizer_config.json").write_text("[]")
    assert Tokenizer.from_file(both).eos_token == "<|endoftext|>"
    # Same ids but another EOS ends documents differently: not the same tokenizer.
    assert loaded.same_as(Tokenizer(loaded._tok, "<|endoftext|>"))
    assert not loaded.same_as(Tokenizer(loaded._tok, "</s>"))
    none = save(["<pad>"], tmp_path / "none")
    with pytest.raises(NanoseekError, match=r"none/tokenizer\.json: no end-of-sequence token"):
        Tokenizer.from_file(none)
    with pytest.raises(NanoseekError, match=r"missing\.json does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(NanoseekError, match=r"bad\.json is not a valid tokenizer\.json"):
        Tokenizer.from_file(tmp_path / "bad.json")


def test_foreign_tokenizer_counts_added_tokens_and_gets_no_bos(tmp_path):
    """A downloaded tokenizer.json may add special tokens after its base vocabulary (the model's embedding must
    cover them) and carry a post-processor that prepends BOS: the packer adds only EOS, so no encode may add it."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, processors

    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    t.train_from_iterator([_text(0, 50)], trainer)
    base = t.get_vocab_size(with_added_tokens=False)
    t.add_special_tokens(["<|im_end|>"])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    t.save(str(tmp_path / "tokenizer.json"))
    foreign = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert foreign.vocab_size == base + 1
    assert foreign.encode_batch(["def f"]) == [foreign.encode("def f")]
    assert 0 not in foreign.encode_batch(["def f"])[0]  # no "<s>" (id 0) from the post-processor


def test_lossy_tokenizers_are_detected_and_a_directory_finds_its_tokenizer(tok, tmp_path):
    """Ours gives any text back exactly; a BPE with a whitespace pre-tokenizer and no byte fallback drops what
    its vocabulary lacks ("ZZZ", the emoji) and the spaces: round_trip_loss names an example, so `train` and
    `generate` can say so. A model or run directory given as the tokenizer path means its tokenizer.json."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    assert tok.round_trip_loss() is None
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False)
    t.train_from_iterator([_text(0, 50).lower()], trainer)
    (tmp_path / "ws").mkdir()
    t.save(str(tmp_path / "ws" / "tokenizer.json"))
    lossy = Tokenizer.from_file(tmp_path / "ws")
    assert lossy.source == str(tmp_path / "ws" / "tokenizer.json")
    lost = lossy.round_trip_loss()
    assert lost is not None and "comes back as" in lost
    with pytest.raises(NanoseekError, match=r"tokenizer path .*empty is a directory without a tokenizer\.json"):
        (tmp_path / "empty").mkdir()
        Tokenizer.from_file(tmp_path / "empty")


def test_get_tokenizer_caches(tmp_path, monkeypatch):
    corpus = corpus_from_spec(str(_make_dir(tmp_path / "c")))
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    first = get_tokenizer(corpus, 300)
    files = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(files) == 1 and first.source == str(files[0]) and first.vocab_size == 300

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a cached tokenizer exists")

    monkeypatch.setattr(tokmod, "train_tokenizer", no_training)
    again = get_tokenizer(corpus, 300)
    assert again.source == first.source and again.encode(TRICKY[6]) == first.encode(TRICKY[6])
    # A different vocab size or a changed training file is a different tokenizer: it must train.
    with pytest.raises(AssertionError, match="retrained"):
        get_tokenizer(corpus, 301)
    # Same size, other content: only the mtime tells (set explicitly: a fast rewrite may keep the old one).
    path = tmp_path / "c" / corpus.train[-1].rel
    st = path.stat()
    path.write_bytes(path.read_bytes().upper())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    edited = corpus_from_spec(str(tmp_path / "c"))
    assert [(s.rel, s.start, s.end) for s in edited.train] == [(s.rel, s.start, s.end) for s in corpus.train]
    assert edited.fingerprint() != corpus.fingerprint()
    with pytest.raises(AssertionError, match="retrained"):
        get_tokenizer(edited, 300)
    (tmp_path / "c" / corpus.train[0].rel).write_text("changed\n" * 50)
    with pytest.raises(AssertionError, match="retrained"):
        get_tokenizer(corpus_from_spec(str(tmp_path / "c")), 300)


def test_check_vocab_fits(tok):
    check_vocab_fits(tok, 400, "tok.json")
    with pytest.raises(NanoseekError, match=r"tokenizer tok\.json has 400 tokens .* vocab_size is 399"):
        check_vocab_fits(tok, 399, "tok.json")


# ---------------------------------------------------------------------------------------------- corpus


def test_default_corpus_stdlib_split():
    a, b = default_corpus(), default_corpus()
    assert len(a.train) + len(a.val) > 500
    assert [s.rel for s in a.train] == [s.rel for s in b.train] and [s.rel for s in a.val] == [s.rel for s in b.val]
    assert not {s.rel for s in a.train} & {s.rel for s in a.val}
    assert 0.01 < len(a.val) / (len(a.train) + len(a.val)) < 0.08
    assert all(s.rel.endswith(".py") and "site-packages" not in s.rel for s in a.train + a.val)


def test_directory_split_deterministic_disjoint(tmp_path):
    root = _make_dir(tmp_path / "c", n_files=60, n_lines=5)
    (root / "sub").mkdir()
    (root / "sub" / "notes.md").write_text("# notes\n")
    (root / "sub" / "docs.jsonl").write_text('{"text": "a"}\n')
    (root / "skip.bin").write_text("not a text suffix")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden")
    (root / ".secret.md").write_text("x\n" * 100)  # hidden files are skipped like hidden directories
    (root / "empty.txt").write_text("")
    a, b = corpus_from_spec(str(root)), corpus_from_spec(str(root) + "/")
    rels = lambda ss: [s.rel for s in ss]
    assert rels(a.train) == rels(b.train) and rels(a.val) == rels(b.val)
    assert len(a.val) >= 1 and not set(rels(a.train)) & set(rels(a.val))
    expected = {f"f{i:02d}.py" for i in range(60)} | {"sub/notes.md", "sub/docs.jsonl"}
    assert set(rels(a.train)) | set(rels(a.val)) == expected
    # Pinned: the split hash must never change, or existing runs would validate on files they trained on.
    assert set(rels(a.val)) == {"f26.py", "f36.py"}
    # A glob of the same files gives the same split (same paths relative to their common folder).
    g = corpus_from_spec(str(root / "*.py"))
    assert set(rels(g.val)) == {r for r in rels(a.val) if r.endswith(".py")}


def test_glob_brackets_and_a_root_common_to_all_matches(tmp_path):
    """A spec with [..] is a pattern, not a missing file; a glob's root is the common directory of all its
    matches (the first match's folder made relative_to fail with a traceback for files in sibling folders)."""
    _make_dir(tmp_path / "c", n_files=4)
    c = corpus_from_spec(str(tmp_path / "c" / "f0[12].py"))
    assert {s.rel for s in c.train} == {"f01.py", "f02.py"}
    _make_dir(tmp_path / "d" / "a", n_files=2)
    _make_dir(tmp_path / "d" / "b", n_files=2)
    c = corpus_from_spec(str(tmp_path / "d") + "/*/*.py")
    assert {s.rel for s in c.train + c.val} == {"a/f00.py", "a/f01.py", "b/f00.py", "b/f01.py"}


def test_two_files_and_single_file_splits(tmp_path):
    _make_dir(tmp_path / "two", n_files=2)
    two = corpus_from_spec(str(tmp_path / "two"))  # by file, one of two files (~50%) would be validation
    assert [s.rel for s in two.train] == [s.rel for s in two.val] == ["f00.py", "f01.py"]
    for tr, va in zip(two.train, two.val):  # each file split inside: its last ~4% is validation
        assert tr.start == 0 and tr.end == va.start and 0.01 < (va.end - va.start) / va.end < 0.1
    # one big file among small ones: whichever hashes to validation, the split must stay near 4% of the bytes
    big = tmp_path / "big"
    big.mkdir()
    (big / "data.txt").write_text(_text(0, 20000))
    (big / "notes.md").write_text("tiny\n")
    (big / "x.md").write_text("x")  # one byte, too small to cut: stays whole in training, not dropped
    c = corpus_from_spec(str(big))
    val_bytes = sum(s.end - s.start for s in c.val)
    train_bytes = sum(s.end - s.start for s in c.train)
    assert 0.01 < val_bytes / (val_bytes + train_bytes) < 0.16, (c.train, c.val)
    assert {s.rel for s in c.train} == {"data.txt", "notes.md", "x.md"}
    assert {s.rel for s in c.val} == {"data.txt", "notes.md"}  # split inside files ("tiny\n" still cuts)
    assert next((s.start, s.end) for s in c.train if s.rel == "x.md") == (0, 1)
    text = _text(3, 500)
    (tmp_path / "one.txt").write_text(text)
    one = corpus_from_spec(str(tmp_path / "one.txt"))
    (tr,), (va,) = one.train, one.val
    assert tr.start == 0 and tr.end == va.start and va.end == len(text.encode())
    assert 0.02 < (va.end - va.start) / va.end < 0.08 and text.encode()[va.start - 1] == ord("\n")
    lines = [json.dumps({"text": f"doc {i} " + "é" * i}) for i in range(100)]
    (tmp_path / "one.jsonl").write_text("\n".join(lines) + "\n")
    split = corpus_from_spec(str(tmp_path / "one.jsonl"))
    (tr,), (va,) = split.train, split.val
    n_val = (tmp_path / "one.jsonl").read_bytes()[va.start :].count(b"\n")
    assert tr.end == va.start and 1 <= n_val <= 8
    (tmp_path / "line.txt").write_text("x" * 1000)  # no newline at all: cut inside the line
    split = corpus_from_spec(str(tmp_path / "line.txt"))
    (tr,), (va,) = split.train, split.val
    assert 0 < tr.end == va.start < 1000


def test_file_rule_fallbacks_and_its_byte_fraction_bounds(tmp_path):
    """The file rule is kept only while validation holds 1% to 16% of the bytes (else every file is split
    inside); when every file hashes to validation, the one with the highest hash goes back to train; and a
    corpus with nothing to cut is a clear error, not an empty validation split. d90.txt and d19.txt both hash
    below VAL_FRACTION, big.txt above."""

    def split(name, sizes):
        (tmp_path / name).mkdir()
        for rel, size in sizes.items():
            (tmp_path / name / rel).write_text("line 1\n" * (size // 7))
        c = corpus_from_spec(str(tmp_path / name))
        return sorted((s.rel, s.start, s.end) for s in c.train), sorted((s.rel, s.start, s.end) for s in c.val)

    assert split("all_val", {"d90.txt": 154, "d19.txt": 9856}) == ([("d19.txt", 0, 9856)], [("d90.txt", 0, 154)])
    # 1.5% of the bytes: just above the 1% bound, so the file rule holds
    assert split("low", {"d90.txt": 154, "big.txt": 9856}) == ([("big.txt", 0, 9856)], [("d90.txt", 0, 154)])
    # 20%: above the 16% bound, so each file is split inside
    assert split("high", {"d90.txt": 2002, "big.txt": 7994})[1] == [("big.txt", 7679, 7994), ("d90.txt", 1925, 2002)]
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("x")
    (tmp_path / "tiny" / "b.txt").write_text("y")
    with pytest.raises(NanoseekError, match="every file is too small"):
        corpus_from_spec(str(tmp_path / "tiny"))


def test_in_file_cut_points(tmp_path):
    """Without a newline the cut lands on a UTF-8 character start (not inside "é", which would garble both
    halves); a line start exactly at the 96% target is used, not the next one."""
    (tmp_path / "e.txt").write_text("é" * 1000)
    c = corpus_from_spec(str(tmp_path / "e.txt"))
    assert c.train[0].end == c.val[0].start == 1920
    (tmp_path / "l.txt").write_text("abc\n" * 25)
    c = corpus_from_spec(str(tmp_path / "l.txt"))
    assert c.train[0].end == c.val[0].start == 96


def test_a_long_last_line_does_not_become_the_validation_split(tmp_path):
    """With no line start after the 96% target the cut fell back to the last one before it: 40 short lines and
    one 47 KB last line put 96% of the file into validation. Plain text is cut inside that line now; a .jsonl
    whose last document is that large is refused alone and stays whole in training among other files."""
    head = "".join(f"line {i}\n" for i in range(40))
    (tmp_path / "last.txt").write_text(head + "y" * 47000)
    (tr,), (va,) = (c := corpus_from_spec(str(tmp_path / "last.txt"))).train, c.val
    size = (tmp_path / "last.txt").stat().st_size
    assert tr.end == va.start and 0.03 < (size - va.start) / size < 0.05
    docs = [json.dumps({"text": f"doc {i}"}) for i in range(50)] + [json.dumps({"text": "z" * 42000})]
    (tmp_path / "big.jsonl").write_text("\n".join(docs) + "\n")
    with pytest.raises(NanoseekError, match=r"big\.jsonl: its last document is 98% of the file, too much for a"):
        corpus_from_spec(str(tmp_path / "big.jsonl"))
    (tmp_path / "d").mkdir()
    (tmp_path / "big.jsonl").rename(tmp_path / "d" / "big.jsonl")
    (tmp_path / "d" / "other.txt").write_text(_text(1, 20000))
    c = corpus_from_spec(str(tmp_path / "d"))
    assert [(s.rel, s.start) for s in c.train if s.rel == "big.jsonl"] == [("big.jsonl", 0)]
    assert [s.rel for s in c.val] == ["other.txt"]


def test_symlinked_directories_are_followed_once(tmp_path):
    """A --data directory assembled from links reads the linked directories (a glob always did), each real
    directory once: a link back up the tree does not loop."""
    real = _make_dir(tmp_path / "real", n_files=3)
    top = tmp_path / "top"
    top.mkdir()
    (top / "own.txt").write_text(_text(9, 300))
    (top / "sub").symlink_to(real, target_is_directory=True)
    (top / "twice").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(top, target_is_directory=True)
    c = corpus_from_spec(str(top))
    rels = sorted({s.rel for s in c.train + c.val})
    assert rels == ["own.txt", "sub/f00.py", "sub/f01.py", "sub/f02.py"], rels


def test_a_plain_text_bom_is_skipped_and_a_pipe_is_named(tok, tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("".join(f"doc line {i}\n" for i in range(200)).encode("utf-8-sig"))
    c = corpus_from_spec(str(path))
    assert c.train[0].start == 3
    assert tok.decode(TokenStream(c, tok, 7).next_batch(3).flatten()).startswith("doc line 0")
    (tmp_path / "only.txt").write_bytes(data.BOM)  # nothing but a BOM is an empty file
    with pytest.raises(NanoseekError, match=r"all 1 file\(s\) are empty"):
        corpus_from_spec(str(tmp_path / "only.txt"))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NanoseekError, match=r"fifo: not a regular file or directory \(a pipe or device"):
        corpus_from_spec(str(tmp_path / "fifo"))


def test_corpus_errors(tmp_path):
    cases = {
        str(tmp_path / "nope"): "nope: no such file or directory",
        str(_make_dir(tmp_path / "nousable", 0)): "nousable: no .txt/.py/.md/.jsonl files",
        str(tmp_path / "*.nothing"): r"\*\.nothing: the pattern matches no files",
    }
    (tmp_path / "empties").mkdir()
    (tmp_path / "empties" / "a.txt").write_text("")
    (tmp_path / "empties" / "b.md").write_text("")
    cases[str(tmp_path / "empties")] = r"all 2 file\(s\) are empty, e\.g\. .*empties/a\.txt"
    (tmp_path / "single.jsonl").write_text('{"text": "only one"}\n')
    cases[str(tmp_path / "single.jsonl")] = r"single\.jsonl: a single \.jsonl file needs at least 2 lines"
    for spec, pattern in cases.items():
        with pytest.raises(NanoseekError, match=pattern):
            corpus_from_spec(spec)


def test_binary_files_are_refused_and_suffixes_ignore_case(tok, tmp_path):
    import gzip

    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello"}\n' * 50))
    with pytest.raises(NanoseekError, match=r"docs\.jsonl\.gz is gzip-compressed; decompress it first"):
        corpus_from_spec(str(tmp_path / "docs.jsonl.gz"))
    pkg = _make_dir(tmp_path / "pkg", n_files=3)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "f00.cpython-312.pyc").write_bytes(b"\xcb\r\r\n\0\0\0\0" + b"x" * 100)
    with pytest.raises(NanoseekError, match=r"f00\.cpython-312\.pyc is not text \(a NUL byte at offset 4\)"):
        corpus_from_spec(str(pkg) + "/**")  # a glob takes what it matches: refused, not trained on as noise
    assert len(corpus_from_spec(str(pkg)).train) >= 2  # the directory walk skips __pycache__
    # upper-case suffixes: found by the directory walk, and read as .jsonl (one document per line)
    up = tmp_path / "up"
    up.mkdir()
    (up / "DOCS.JSONL").write_text("".join(json.dumps({"text": f"line {i} ok"}) + "\n" for i in range(60)))
    corpus = corpus_from_spec(str(up))
    assert corpus.train[0].is_jsonl
    assert '"text"' not in tok.decode(TokenStream(corpus, tok, 15).next_batch(4).flatten())


def test_jsonl_with_a_byte_order_mark(tok, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40)).encode("utf-8-sig"))
    flat = TokenStream(corpus_from_spec(str(path)), tok, 7).next_batch(3).flatten()
    assert tok.decode(flat).startswith("doc 0")


def test_jsonl_lone_surrogates_become_question_marks(tok, tmp_path):
    """JSON may escape a lone surrogate ("\\ud800", e.g. half an emoji cut by a scraper); the tokenizer cannot take
    one, so it is replaced rather than stopping the run."""
    (tmp_path / "s.jsonl").write_text('{"text": "a\\ud800b"}\n' * 30)
    stream = TokenStream(corpus_from_spec(str(tmp_path / "s.jsonl")), tok, 3)
    assert tok.decode(stream.next_batch(1)[0]).startswith("a?b")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("space", ["\u00a0", "\u3000", "\u2028", " "])
def test_pieces_of_a_long_document_encode_like_the_whole(tmp_path, monkeypatch, space, newline):
    # Pieces end before a newline (CRLF: before its "\r") that follows a non-space character; a Unicode space
    # before the newline would be absorbed with it into one pre-token, so no cut may fall there. (CRLF files
    # were cut inside words before: the "\r" before every "\n" counts as a space.)
    monkeypatch.setattr(data, "PIECE_BYTES", 200)
    text = "".join(f"word{i} here{space if i % 3 else ''}{newline}   x{i}{newline}" for i in range(300))
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode())
    size = path.stat().st_size
    pieces, end, _ = data._read_source(data.Source(path, "doc.txt", 0, size), 0, 0, 10**9)
    assert end == size and len(pieces) > 20 and [d for _, d in pieces].count(True) == 1
    tok = train_tokenizer([text], 400)  # knows merges across "<space>\n" (a generic one might not)
    assert [i for piece, _ in pieces for i in tok.encode(piece)] == tok.encode(text)


def test_safe_cut_skips_newlines_after_spaces_and_backs_off_to_a_character_start():
    # every newline that follows a space is passed over, back to the first one after a word
    assert data._safe_cut(b"a\nb \nc \n") == 1
    # no newline: end before the last (maybe partial) character, not inside it
    assert data._safe_cut("é".encode() * 10) == 18


def test_unreadable_file_error(tmp_path, monkeypatch):
    root = _make_dir(tmp_path / "c", n_files=3)
    target = root / "f01.py"
    target.chmod(0)
    if os.geteuid() == 0:  # root reads anything: pretend the permission check fails
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != target and real_access(p, mode))
    with pytest.raises(NanoseekError, match=r"cannot read .*f01\.py: Permission denied"):
        corpus_from_spec(str(root))


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ("{broken", "line {}: invalid JSON"),
        ('{"txt": "x"}', "line {}: expected .* 'text'"),
        ("[1]", "line {}: "),
        ('{"text": 5}', "line {}: expected a JSON object with a string field 'text'"),  # not a traceback
    ],
)
def test_jsonl_errors_name_file_and_line(tok, tmp_path, line, pattern):
    good = '{"text": "a"}\n'
    for bad_line, split in ((3, "train"), (99, "val")):  # the val range starts mid-file: lines still count
        path = tmp_path / f"bad{bad_line}.jsonl"
        path.write_text(good + "\n" + good * (bad_line - 3) + line + "\n" + good * (100 - bad_line))
        match = rf"bad{bad_line}\.jsonl " + pattern.format(bad_line)
        with pytest.raises(NanoseekError, match=match):  # found up front, before any training step
            corpus_from_spec(str(path))
        # ...and by the stream too (a file edited after the run started)
        corpus = _make_corpus("--data x", tmp_path, [path], check=False)
        with pytest.raises(NanoseekError, match=match):
            if split == "train":
                TokenStream(corpus, tok, 8).next_batch(2)
            else:
                val_batches(corpus, tok, 8, 2, 100)


def test_deleted_file_and_bad_utf8(tok, tmp_path):
    root = _make_dir(tmp_path / "c", n_files=3)
    (root / "latin1.txt").write_bytes("café\n".encode("latin-1") * 200)  # undecodable: replaced, not fatal
    corpus = corpus_from_spec(str(root))
    flat = TokenStream(corpus, tok, 63, split="train").next_batch(16).flatten().tolist()
    assert "caf\ufffd" in tok.decode(flat)
    gone = corpus.train[0].path
    gone.unlink()
    with pytest.raises(NanoseekError, match=f"cannot read {gone}"):
        stream = TokenStream(corpus, tok, 63, seed=1)
        for _ in range(40):
            stream.next_batch(4)


@pytest.mark.timeout(30)  # the failure this guards against was an endless loop
def test_a_file_that_shrank_while_streaming_is_an_error(tok, tmp_path):
    corpus = corpus_from_spec(str(_make_dir(tmp_path / "c", n_files=3)))
    path = corpus.train[0].path
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(NanoseekError, match="shrank while reading"):
        stream = TokenStream(corpus, tok, 15)
        for _ in range(50):
            stream.next_batch(4)


# ---------------------------------------------------------------------------------------------- packing


def test_packing_reproduces_eos_joined_stream(tok, tmp_path, monkeypatch):
    # Small pieces and groups so that documents are split across pieces, groups and rows.
    monkeypatch.setattr(data, "PIECE_BYTES", 300)
    root = _make_dir(tmp_path / "c", n_files=14)
    (root / "data.jsonl").write_text("".join(json.dumps({"text": _text(100 + i, 3)}) + "\n" for i in range(30)))
    corpus = corpus_from_spec(str(root))
    stream = TokenStream(corpus, tok, seq_len=31, seed=3, group_bytes=700)
    batches = [stream.next_batch(5) for _ in range(120)]
    assert all(b.shape == (5, 32) and b.dtype == torch.long for b in batches)
    flat = torch.cat(batches).flatten().tolist()
    assert len(flat) == 120 * 5 * 32
    # Files are whole documents, .jsonl lines are documents; each epoch has each of them exactly once.
    file_docs = _docs_of(tok, [s for s in corpus.train if not s.is_jsonl])
    jsonl = next(s for s in corpus.train if s.is_jsonl)
    line_docs = [tuple(tok.encode(json.loads(line)["text"])) for line in jsonl.path.read_text().splitlines()]
    docs = _split_docs(flat, tok.eos_id)
    per_epoch = len(file_docs) + len(line_docs)
    assert len(docs) >= 2 * per_epoch
    epochs = [docs[i * per_epoch : (i + 1) * per_epoch] for i in range(2)]
    for ep in epochs:
        assert sorted(ep) == sorted(file_docs | set(line_docs)) and len(set(ep)) == len(ep)
        start = ep.index(line_docs[0])
        assert ep[start : start + len(line_docs)] == line_docs  # a .jsonl file's documents stay in order
    assert epochs[0] != epochs[1]  # a fresh file order each epoch
    again = TokenStream(corpus, tok, seq_len=31, seed=3, group_bytes=700)
    assert all(torch.equal(again.next_batch(5), b) for b in batches[:20])
    other = TokenStream(corpus, tok, seq_len=31, seed=4, group_bytes=700)
    assert not all(torch.equal(other.next_batch(5), b) for b in batches[:20])


@pytest.mark.parametrize("group_bytes", [500, data.GROUP_BYTES])
def test_resume_is_bit_identical(tok, tmp_path, group_bytes):
    corpus = corpus_from_spec(str(_make_dir(tmp_path / "c", n_files=10)))
    ref = TokenStream(corpus, tok, seq_len=47, seed=7, group_bytes=group_bytes)
    states, batches = [], []
    for _ in range(60):  # well past one epoch (~10k tokens)
        states.append(ref.state_dict())
        batches.append(ref.next_batch(3))
    for i in (0, 1, 17, 33, 55):
        state = json.loads(json.dumps(states[i]))  # plain ints and strings, as stored in a checkpoint
        assert len(json.dumps(state)) < 400
        resumed = TokenStream(corpus, tok, seq_len=47, seed=0)
        resumed.load_state_dict(state)
        assert resumed.tokens_served == i * 3 * 48  # the token counter resumes too
        for b in batches[i:]:
            assert torch.equal(resumed.next_batch(3), b)
    other = corpus_from_spec(str(_make_dir(tmp_path / "d", n_files=9)))
    with pytest.raises(NanoseekError, match="differ from those of the checkpoint"):
        TokenStream(other, tok, seq_len=47).load_state_dict(states[5])


def test_resume_refuses_another_split_or_tokenizer(tok, tmp_path):
    """A validation stream's state resumed as the train stream, or a stream re-tokenised with another tokenizer,
    would continue from the wrong place: both are refused rather than silently training on other data."""
    corpus = corpus_from_spec(str(_make_dir(tmp_path / "c", n_files=10)))
    stream = TokenStream(corpus, tok, 15)
    stream.next_batch(2)
    with pytest.raises(NanoseekError, match="version-1 train stream"):
        TokenStream(corpus, tok, 15).load_state_dict({**stream.state_dict(), "split": "val"})
    other = train_tokenizer([_text(1, 50)], 300)
    with pytest.raises(NanoseekError, match="re-reading the data"):
        TokenStream(corpus, other, 15).load_state_dict(stream.state_dict())


def test_shuffled_windows_permute_rows_and_resume_exactly(tok, tmp_path):
    """--shuffle-rows: within each window of W rows the stream serves exactly the rows the unshuffled stream
    would, in a seeded random order (so one batch spans the window, not a few adjacent rows); resuming anywhere,
    mid-window included, continues bit-identically, from a state that stays small."""
    corpus = corpus_from_spec(str(_make_dir(tmp_path / "c", n_files=10)))
    W = 12
    plain = TokenStream(corpus, tok, seq_len=31, seed=5, group_bytes=500)
    shuffled = TokenStream(corpus, tok, seq_len=31, seed=5, group_bytes=500, shuffle_rows=W)
    rows_plain = plain.next_batch(3 * W)
    states, batches = [], []
    for _ in range(3 * W // 4):
        states.append(shuffled.state_dict())
        batches.append(shuffled.next_batch(4))
    rows_shuffled = torch.cat(batches)
    perms = []
    for w in range(3):
        a, b = rows_plain[w * W : (w + 1) * W], rows_shuffled[w * W : (w + 1) * W]
        assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))  # the same rows
        assert not torch.equal(a, b)  # in another order
        where = {row: k for k, row in enumerate(map(tuple, a.tolist()))}
        assert len(where) == W
        perms.append(tuple(where[row] for row in map(tuple, b.tolist())))
    assert len(set(perms)) == 3  # each window its own permutation (seeded by the window's number)
    assert shuffled.state_dict()["window"] == {"index": 2, "served": W}
    again = TokenStream(corpus, tok, seq_len=31, seed=5, group_bytes=500, shuffle_rows=W)
    assert torch.equal(again.next_batch(5), rows_shuffled[:5])  # seeded
    for i in (0, 1, 4, 7):  # window boundaries and mid-window
        state = json.loads(json.dumps(states[i]))
        assert len(json.dumps(state)) < 500
        resumed = TokenStream(corpus, tok, seq_len=31, seed=0, shuffle_rows=W)
        resumed.load_state_dict(state)
        for b in batches[i:]:
            assert torch.equal(resumed.next_batch(4), b)
    with pytest.raises(NanoseekError, match="--shuffle-rows must match"):
        TokenStream(corpus, tok, seq_len=31).load_state_dict(states[3])


def test_the_window_permutation_depends_on_the_seed(tok, tmp_path):
    """Runs with other seeds must see other row orders: with one file the rows are the same whatever the seed
    (no file order to shuffle), so only the window's permutation can differ."""
    (tmp_path / "one.txt").write_text(_text(0, 2000))
    corpus = corpus_from_spec(str(tmp_path / "one.txt"))
    a = TokenStream(corpus, tok, 15, seed=5, shuffle_rows=12).next_batch(12)
    b = TokenStream(corpus, tok, 15, seed=6, shuffle_rows=12).next_batch(12)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist())) and not torch.equal(a, b)


def test_token_stream_argument_checks(tok, tmp_path):
    """Validation is read in file order (comparable losses across runs), whatever shuffle_rows says; a negative
    window is a mistake, not "no shuffling"."""
    corpus = corpus_from_spec(str(_make_dir(tmp_path / "c", n_files=6, n_lines=300)))
    assert TokenStream(corpus, tok, 15, split="val", shuffle_rows=8).shuffle_rows == 0
    with pytest.raises(ValueError, match="shuffle_rows must be >= 0"):
        TokenStream(corpus, tok, 15, shuffle_rows=-1)


def test_val_batches(tok, tmp_path):
    corpus = corpus_from_spec(str(_make_dir(tmp_path / "c", n_files=6, n_lines=300)))
    a = val_batches(corpus, tok, seq_len=15, batch_size=4, max_tokens=16 * 10 + 5)
    b = val_batches(corpus, tok, seq_len=15, batch_size=4, max_tokens=16 * 10 + 5)
    assert [x.shape for x in a] == [(4, 16), (4, 16), (2, 16)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    flat = torch.cat(a).flatten().tolist()
    expected = [t for s in corpus.val for t in (*_docs_of(tok, [s]).pop(), tok.eos_id)]
    assert flat == expected[:160]
    everything = val_batches(corpus, tok, seq_len=15, batch_size=1000, max_tokens=10**9)
    assert sum(x.numel() for x in everything) == len(expected) // 16 * 16
    with pytest.raises(NanoseekError, match="less than one row"):
        val_batches(corpus, tok, seq_len=10**6, batch_size=1, max_tokens=10**7)
    # exactly one row is enough
    assert [x.shape for x in val_batches(corpus, tok, seq_len=15, batch_size=4, max_tokens=16)] == [(1, 16)]


def test_shuffle_window_stops_at_the_epoch_end(tok, tmp_path):
    """A window larger than the corpus holds about one epoch (it stops once the stream wraps), not the corpus
    re-read many times over; its rows are still the plain stream's first rows, permuted, stored as int32."""
    corpus = corpus_from_spec(str(_make_dir(tmp_path / "c", n_files=4)))
    big = TokenStream(corpus, tok, seq_len=31, seed=5, group_bytes=500, shuffle_rows=10**6)
    first = big.next_batch(2)
    n = len(big._window)
    plain = TokenStream(corpus, tok, seq_len=31, seed=5, group_bytes=500)
    epoch_rows = 0
    while plain._pos[0] == 0:
        plain.next_batch(1)
        epoch_rows += 1
    assert epoch_rows <= n <= epoch_rows + 1024  # read in chunks of 1024 rows until the epoch wrapped
    assert big._window.dtype == torch.int32 and first.dtype == torch.int64
    rows = TokenStream(corpus, tok, seq_len=31, seed=5, group_bytes=500).next_batch(n)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, big._window.long().tolist()))
