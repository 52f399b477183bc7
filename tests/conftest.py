import atexit
import os
import random
import shutil
import tempfile

import pytest
import torch

from nanoseek.config import ModelConfig, get_preset

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# keep trained tokenizers out of the user's cache, but shared across the tests of one session; the session's own
# folder is removed at exit (each pytest-xdist worker makes one; CI and reruns would otherwise pile them up in /tmp)
if "NANOSEEK_CACHE" not in os.environ:
    os.environ["NANOSEEK_CACHE"] = tempfile.mkdtemp(prefix="nanoseek-test-cache-")
    atexit.register(shutil.rmtree, os.environ["NANOSEEK_CACHE"], ignore_errors=True)

WORDS = [
    "def",
    "class",
    "return",
    "import",
    "self",
    "value",
    "index",
    "data",
    "model",
    "token",
    "expert",
    "layer",
    "cache",
    "yield",
    "lambda",
    "for",
    "while",
    "if",
    "else",
    "try",
    "except",
    "with",
    "as",
    "in",
    "not",
    "and",
    "or",
    "None",
    "True",
    "False",
    "print",
    "list",
    "dict",
    "range",
]


MICRO = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_group=4,
    topk_group=2,
    init_std=0.05,
)


# the same micro model as `--override` flags, for tests that go through TrainConfig / `nanoseek train`
TRAIN_OVERRIDES = [
    "hidden_size=64",
    "intermediate_size=128",
    "num_hidden_layers=3",
    "moe_intermediate_size=32",
    "q_lora_rank=32",
    "kv_lora_rank=16",
    "qk_nope_head_dim=16",
    "qk_rope_head_dim=8",
    "v_head_dim=16",
    "n_routed_experts=8",
    "init_std=0.02",
    "vocab_size=512",
]


def micro_config(**kw) -> ModelConfig:
    """A smaller-than-tiny config with every feature of `tiny` (MLA with q_lora, group-limited MoE, MTP), so
    that model-level tests stay fast; keyword arguments override fields."""
    return get_preset("tiny", **{**MICRO, **kw})


def randomize_bias(model, std: float = 0.05) -> None:
    """A non-zero routing bias, so tests exercise biased expert selection."""
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, std)


def synthetic_text(seed: int, n_docs: int, words_per_doc: int = 200) -> list[str]:
    """Deterministic pseudo-code documents (stable across machines and Python versions)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(words_per_doc // 8):
            indent = "    " * rng.randrange(3)
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(8)) + rng.choice([":", "", "()"]))
        docs.append("\n".join(lines) + "\n")
    return docs


def write_corpus(d, n_docs: int, words_per_doc: int = 200):
    """A directory of synthetic .py documents, usable as `--data`."""
    for i, doc in enumerate(synthetic_text(0, n_docs, words_per_doc)):
        (d / f"doc{i:02d}.py").write_text(doc)
    return d


@pytest.fixture
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), 40)


@pytest.fixture(scope="session")
def session_corpus_dir(tmp_path_factory):
    """One corpus shared by a module's session-scoped fixtures (e.g. the quick bench runs)."""
    return write_corpus(tmp_path_factory.mktemp("session-corpus"), 24, 240)


@pytest.fixture(scope="module")
def one_thread():
    """Micro models gain nothing from a second thread, and on a shared machine it can stall them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
