"""Byte-level BPE tokenizer: a thin wrapper over HF `tokenizers`, plus training and an on-disk cache.

Why a wrapper: the rest of nanoseek needs only five things (encode, encode_batch, decode, vocab_size, eos_id),
and it must work the same for a tokenizer we train on the fly and for a downloaded `tokenizer.json` such as
DeepSeek's own. Text is always encoded *literally*: a corpus that contains the string "<|endoftext|>" gets
ordinary byte tokens for it, and only the data packer inserts the real EOS id between documents.

Byte-level BPE (as DeepSeek-V3 uses, spec §7) maps every UTF-8 byte to a base token, so
decode(encode(x)) == x for any string, and no text is ever out of vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.errors import NanoseekError

if TYPE_CHECKING:
    from nanoseek.data import Corpus

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# Checked in order when loading a foreign tokenizer.json without a tokenizer_config.json next to it.
EOS_CANDIDATES = (
    "<|endoftext|>",  # GPT-2 / Qwen / ours
    "<｜end▁of▁sentence｜>",  # DeepSeek V2/V3/R1
    "<|end_of_text|>",  # Llama 3
    "</s>",  # Llama 2 / Mistral / T5
    "<eos>",  # Gemma
    "<|eos|>",
)
# Beginning-of-sequence tokens named in an exported tokenizer_config.json when the vocabulary has one.
BOS_CANDIDATES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>")
# Text a lossless tokenizer must give back exactly: printable ASCII, Latin, CJK, an emoji, tabs, runs of spaces.
ROUND_TRIP_PROBE = "".join(map(chr, range(32, 127))) + "\t\n  éß ÆØ 漢字 🦊  \r\n x"
# Tokenizer training reads at most this many bytes of the training split (a deterministic, spread-out subset,
# see `Corpus.sample_texts`). BPE statistics saturate long before this; it keeps training at a few seconds
# on 2 cores (the whole ~30 MB Python stdlib fits) and bounded on multi-GB corpora.
TRAIN_BYTES = 32 << 20
# Bump when the training recipe changes so that stale cached tokenizers are not reused.
RECIPE_VERSION = "bpe-bytelevel-v1"


class Tokenizer:
    """A byte-level BPE tokenizer with a known end-of-sequence id.

    `source` is where it came from (a file path or "<trained in memory>") so that errors can name it.
    """

    def __init__(self, tok: tokenizers.Tokenizer, eos_token: str, source: str = "<trained in memory>"):
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise NanoseekError(f"tokenizer {source}: EOS token {eos_token!r} is not in the vocabulary")
        self._tok = tok
        # Special-token strings inside the text are encoded as plain text (see module docstring).
        self._tok.encode_special_tokens = True
        self._eos_id = eos_id
        self.eos_token = eos_token
        self.source = source

    def round_trip_loss(self) -> str | None:
        """None if decode(encode(text)) == text on ROUND_TRIP_PROBE (always, for byte-level BPE), else a short
        example of what is lost. A tokenizer without byte fallback drops or alters characters it lacks, in the
        training data and in prompts alike: callers say so rather than train on silently altered text."""
        back = self.decode(self.encode(ROUND_TRIP_PROBE))
        if back == ROUND_TRIP_PROBE:
            return None
        i = next(
            (i for i, (a, b) in enumerate(zip(ROUND_TRIP_PROBE, back)) if a != b), min(len(back), len(ROUND_TRIP_PROBE))
        )
        return f"{ROUND_TRIP_PROBE[max(0, i - 4) : i + 8]!r} comes back as {back[max(0, i - 4) : i + 8]!r}"

    @property
    def vocab_size(self) -> int:
        """Number of ids it can emit, special tokens included (the model's vocab_size must be >= this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, without BOS/EOS. With allow_special, special-token strings in the text map to
        their ids (useful for chat templates at serving time); otherwise they are encoded literally."""
        if not allow_special:
            return self._tok.encode(text, add_special_tokens=False).ids
        self._tok.encode_special_tokens = False
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once; the Rust side parallelises across texts, so pass many at a time."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (e.g. EOS) are kept as their strings so that nothing is hidden."""
        if hasattr(ids, "tolist"):  # torch / numpy
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def hf_config(self, model_max_length: int | None = None) -> dict:
        """A minimal tokenizer_config.json, so that transformers' AutoTokenizer knows the EOS (and BOS, when
        the vocabulary has one; ours has none) and decodes text unchanged."""
        bos = next((c for c in BOS_CANDIDATES if self._tok.token_to_id(c) is not None), None)
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "bos_token": bos,
            "clean_up_tokenization_spaces": False,
        }
        return cfg if model_max_length is None else {**cfg, "model_max_length": model_max_length}

    def save(self, path: str | os.PathLike) -> None:
        """Write a standard tokenizer.json (loadable by HF `tokenizers`/`transformers` and `from_file`)."""
        self._tok.save(str(path))

    def save_to_dir(self, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
        """tokenizer.json plus a tokenizer_config.json naming the EOS: a tokenizer.json alone does not say which
        special token ends a document, and a foreign one whose EOS came from its own config would come back
        with another EOS (or none) when loaded from a run or checkpoint."""
        directory = Path(directory)
        self.save(directory / "tokenizer.json")
        cfg = json.dumps(self.hf_config(model_max_length), indent=2, ensure_ascii=False)
        (directory / "tokenizer_config.json").write_text(cfg + "\n", encoding="utf-8")

    def same_as(self, other: Tokenizer) -> bool:
        """Whether both map text to the same ids and end documents with the same EOS."""
        return self.eos_token == other.eos_token and self._tok.to_str() == other._tok.to_str()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load any tokenizer.json. The EOS token comes from a sibling tokenizer_config.json ("eos_token") if
        there is one, else from the first of EOS_CANDIDATES that the vocabulary contains."""
        path = Path(path)
        if path.is_dir():  # a model or run directory: its tokenizer.json
            if not (path / "tokenizer.json").is_file():
                raise NanoseekError(f"tokenizer path {path} is a directory without a tokenizer.json")
            path = path / "tokenizer.json"
        if not path.is_file():
            raise NanoseekError(f"tokenizer file {path} does not exist")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise NanoseekError(f"tokenizer file {path} is not a valid tokenizer.json ({msg})") from None
        eos = _eos_from_config(path.parent / "tokenizer_config.json")
        if eos is None or tok.token_to_id(eos) is None:
            eos = next((c for c in EOS_CANDIDATES if tok.token_to_id(c) is not None), None)
        if eos is None:
            raise NanoseekError(
                f"tokenizer file {path}: no end-of-sequence token found "
                f"(looked for tokenizer_config.json 'eos_token' and {', '.join(EOS_CANDIDATES)})"
            )
        return cls(tok, eos, source=str(path))


def _eos_from_config(config_path: Path) -> str | None:
    """The "eos_token" of an HF tokenizer_config.json (a string or {"content": ...}), if readable."""
    try:
        eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` ids in total: <|endoftext|> (id 0), the 256 byte tokens, and
    vocab_size - 257 merges. A corpus too small to support that many merges yields fewer, never more."""
    n_base = 1 + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_base:
        raise NanoseekError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {n_base}")
    tok = tokenizers.Tokenizer(models.BPE())
    # No prefix space: " x" and "x" stay distinct, and decode(encode(x)) == x exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # All 256 bytes even if the corpus lacks some, so that any text is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok, EOS_TOKEN)


def default_cache_dir() -> Path:
    """$NANOSEEK_CACHE/tokenizers if NANOSEEK_CACHE is set, else ~/.cache/nanoseek/tokenizers."""
    root = os.environ.get("NANOSEEK_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "nanoseek"
    return base / "tokenizers"


def get_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The BPE tokenizer for `corpus`, trained once and then reused from the cache.

    The cache key hashes the training files (paths, sizes, mtimes, split ranges), vocab_size, the training
    byte budget and RECIPE_VERSION, so editing the corpus or changing the recipe retrains, and nothing else
    does. Only the training split is used, so validation text never leaks into the merges.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{RECIPE_VERSION}|{TRAIN_BYTES}|{vocab_size}|{corpus.fingerprint()}".encode())
    path = cache / f"bpe{vocab_size}-{key.hexdigest()[:16]}.json"
    if path.is_file():
        return Tokenizer.from_file(path)
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus.sample_texts(TRAIN_BYTES), vocab_size)
    log.info("trained a %d-token BPE on %s in %.1fs", tok.vocab_size, corpus.name, time.perf_counter() - t0)
    tmp = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Write to a temp file and rename, so a concurrent run never reads a half-written tokenizer.
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
        os.close(fd)
        tok.save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise NanoseekError(
            f"cannot write the tokenizer cache {path}: {e.strerror} (set NANOSEEK_CACHE to a writable dir)"
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    tok.source = str(path)
    return tok


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int, source: str | os.PathLike) -> None:
    """Refuse a tokenizer whose ids would index past the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise NanoseekError(
            f"tokenizer {source} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_vocab_size}; use a model config with vocab_size >= {tokenizer.vocab_size}"
        )
