"""Inference engine: cached decoding, padded batches, sampling, stop strings, streaming, MTP speculative
decoding (greedy equality, cache consistency after rejections, distribution preservation), and the CLI.

Run: python -m pytest -q tests/test_engine.py   (random micro models; a few seconds plus one subprocess)
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import numpy as np
import pytest
import torch
from conftest import micro_config, randomize_bias

from nanoseek import NanoseekError
from nanoseek.checkpoint import save_model
from nanoseek.engine import Engine, RowOutput
from nanoseek.model import Transformer
from nanoseek.sampling import SamplingParams, TextStream, draw, probs
from nanoseek.speculative import accept_drafts, speculative_generate

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n"
    "        self.x = x\n        self.y = y\n\n    def __repr__(self):\n        return f'Point({self.x}, {self.y})'\n"
    "import os\nimport sys\nfor i in range(10):\n    print(i, os.path.join('a', str(i)))\n"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def micro(**kw):
    return micro_config(**{"num_nextn_predict_layers": 2, "max_position_embeddings": 256, **kw})


def engine(dtype="fp32", attn_impl="absorb", tokenizer=None, **kw):
    torch.manual_seed(0)
    m = Transformer(micro(**kw))
    randomize_bias(m)
    return Engine(m, tokenizer, dtype=dtype, attn_impl=attn_impl)


@pytest.fixture(scope="module")
def tok():
    from nanoseek.tokenizer import train_tokenizer

    return train_tokenizer([TEXT] * 4, vocab_size=300)


def prompt(n, seed=1):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- cached decoding -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_cached_decode_logits_equal_full_forward(attn_impl):
    e = engine(attn_impl=attn_impl)
    rows = [prompt(30, 1), prompt(22, 2)]  # different lengths: left padding, key_valid, per-row positions
    with torch.inference_mode():
        tokens, st = e.start([r[:12] for r in rows[:1]] + [rows[1][:6]], capacity=40)
        _, first = e.forward(tokens, st)
        steps = [first[:, -1]]
        for t in range(18):
            nxt = torch.tensor([rows[0][12 + t], rows[1][6 + t] if 6 + t < len(rows[1]) else 0])
            steps.append(e.decode(nxt, st))
        got = torch.stack(steps, 1)  # [2, 19, V]: logits after prefix lengths 12.. / 6..
        for i, (r, p0) in enumerate(zip(rows, (12, 6), strict=True)):
            n = min(19, len(r) - p0 + 1)
            full = e.model(torch.tensor([r[: p0 + n - 1]]))[0, p0 - 1 :]
            assert (got[i, :n] - full).abs().max() < 1e-4
    assert st.key_valid is not None  # the padded path was exercised


def test_batch_of_mixed_lengths_equals_each_prompt_alone():
    e = engine()
    ps = [prompt(17, 3), prompt(5, 4), prompt(11, 5), prompt(1, 6)]
    batch = e.generate(ps, max_new_tokens=12)
    for p, toks in zip(ps, batch.tokens, strict=True):
        assert e.generate(p, max_new_tokens=12).tokens[0] == toks
    assert all(len(t) == 12 for t in batch.tokens) and batch.finish_reasons == ["length"] * 4


def test_exceeding_max_length_is_a_clear_error():
    e = engine()
    e.max_len = 20
    with pytest.raises(NanoseekError, match="exceeds the maximum length 20"):
        e.generate(prompt(15), max_new_tokens=6)
    with pytest.raises(NanoseekError, match="exceeds the maximum length 20"):
        e.generate(prompt(15), max_new_tokens=6, speculative=2)
    assert len(e.generate(prompt(15), max_new_tokens=5).tokens[0]) == 5  # exactly at the limit is fine
    with pytest.raises(NanoseekError, match="empty"):
        e.generate([[]], max_new_tokens=3)
    with pytest.raises(NanoseekError, match="token ids"):
        e.generate([5, 300], max_new_tokens=3)
    with pytest.raises(NanoseekError, match="max_new_tokens must be >= 1, got 0"):  # not one token generated anyway
        e.generate(prompt(4), max_new_tokens=0)


def test_kv_cache_bytes_match_the_formula():
    cfg = micro()
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    p = prompt(6)
    assert engine("bf16").generate(p, max_new_tokens=2).kv_cache_bytes_per_token == latent * L * 2
    assert engine("fp32").generate(p, max_new_tokens=2).kv_cache_bytes_per_token == latent * L * 4
    spec = engine("bf16").generate(p, max_new_tokens=3, speculative=3)  # k <= max_new_tokens
    assert spec.kv_cache_bytes_per_token == latent * (L + D) * 2  # the MTP blocks' latent caches too
    naive = engine("bf16", attn_impl="naive").generate(p, max_new_tokens=2)
    heads = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    assert naive.kv_cache_bytes_per_token == heads * L * 2
    # plain decoding does not allocate the MTP blocks' caches at all
    assert len(engine("bf16").start([p], capacity=8)[1].caches) == L
    assert len(engine("bf16").start([p], capacity=8, mtp=True)[1].caches) == L + D


def test_a_cache_can_be_filled_to_its_last_slot():
    """A prefill of exactly the cache's capacity fits (slots 0..7 of 8) and computes the uncached forward; one
    token more is the capacity error."""
    e = engine()
    x = torch.tensor([prompt(8)])
    with torch.inference_mode():
        caches = e.model.make_caches(batch=1, max_len=8)
        got = e.model(x, caches=caches)
        assert (got - e.model(x)).abs().max() < 1e-5
        with pytest.raises(NanoseekError, match="sequence length 9 exceeds the KV cache capacity 8"):
            e.model(torch.tensor([prompt(9)]), caches=e.model.make_caches(batch=1, max_len=8))


def test_generation_speeds():
    """tokens_per_s counts every new token over prefill + decode time; decode_tokens_per_s leaves out each row's
    first token (it comes from the prefill) and the prefill time."""
    from nanoseek.engine import Generation

    g = Generation([[1] * 5, [1] * 3], None, ["length"] * 2, [3, 3], prefill_s=1.0, decode_s=2.0, main_forwards=5,
                   kv_cache_bytes_per_token=0)  # fmt: skip
    assert g.new_tokens == 8
    assert g.tokens_per_s == pytest.approx(8 / 3) and g.decode_tokens_per_s == pytest.approx(6 / 2)
    d = g.to_dict()
    assert d["tokens_per_s"] == 2.67 and d["decode_tokens_per_s"] == 3.0


def test_bf16_engine_runs_and_mostly_agrees_with_fp32():
    p = prompt(9)
    a = engine("fp32").generate(p, max_new_tokens=8).tokens[0]
    b = engine("bf16").generate(p, max_new_tokens=8).tokens[0]
    assert a[:2] == b[:2]  # rounding may flip a near-tie later on


# --- sampling ------------------------------------------------------------------------------------------------
def test_sampling_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p > 0).sum() == 2 and torch.allclose(p.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)  # [0.64, 0.23, 0.09, ...]
    p = probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert (p > 0).tolist() == [True, True, False, False, False]
    assert torch.allclose(p[:2], full[:2] / full[:2].sum())
    p = probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert (p > 0).sum() == 1
    hot, cold = probs(logits, SamplingParams(temperature=2.0)), probs(logits, SamplingParams(temperature=0.5))
    assert hot.max() < full.max() < cold.max()
    with pytest.raises(NanoseekError):
        SamplingParams(top_p=0.0)
    three = torch.tensor([0.5, 0.3, 0.2]).log()
    assert torch.allclose(probs(three, SamplingParams(1.0, top_k=10)), torch.tensor([0.5, 0.3, 0.2]))  # k > V: off
    assert torch.allclose(probs(three, SamplingParams(1.0, top_k=3)), torch.tensor([0.5, 0.3, 0.2]))  # k = V: off
    # top_p exactly reached by the tokens above: the next one is dropped (4 equal tokens, 0.75 = the first 3)
    p = probs(torch.zeros(4), SamplingParams(1.0, top_p=0.75))
    assert torch.allclose(p, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_tokens_follow_the_tempered_softmax(temperature):
    """sample() applies the temperature once: 40k draws against softmax(logits / T) (total variation)."""
    from nanoseek.sampling import sample

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    ids = sample(logits.expand(40000, 4), SamplingParams(temperature=temperature), g)
    freq = torch.bincount(ids, minlength=4) / ids.numel()
    assert (freq - (logits / temperature).softmax(-1)).abs().sum() / 2 < 0.01


def test_temperature_must_be_finite_and_tiny_ones_are_safe():
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(NanoseekError, match="temperature must be a finite number >= 0"):
            SamplingParams(temperature=t)
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 5
    hot = torch.nn.functional.one_hot(logits.argmax(-1), 300).float()
    for t in (1e-45, 1e-300, 5e-324):  # below float32's smallest number, and float64's
        assert torch.equal(probs(logits, SamplingParams(temperature=t)), hot), t
        assert torch.equal(
            probs(logits.bfloat16(), SamplingParams(temperature=t, top_p=0.5)).argmax(-1), hot.argmax(-1)
        )
    e = engine()
    tiny = e.generate(prompt(6), max_new_tokens=10, sampling=SamplingParams(1e-45, seed=0), speculative=2)
    assert tiny.tokens == e.generate(prompt(6), max_new_tokens=10).tokens  # sampling that close to 0 is greedy


def test_seeded_sampling_is_reproducible():
    e = engine()
    p = prompt(8)
    for k in (0, 2):
        runs = [
            e.generate(p, max_new_tokens=16, sampling=SamplingParams(1.0, top_k=50, seed=s), speculative=k).tokens
            for s in (7, 7, 8)
        ]
        assert runs[0] == runs[1] and runs[0] != runs[2]


def test_seeded_sampling_of_a_row_does_not_depend_on_its_batch():
    """Row i samples with seed + i: it equals its prompt alone with that seed, whatever the other rows hold, and
    a prompt repeated in one batch gets different samples."""
    e = engine("fp32")
    a, b = prompt(8), prompt(5, seed=2)
    sp = lambda seed: SamplingParams(1.0, top_k=50, seed=seed)
    both = e.generate([a, b], max_new_tokens=12, sampling=sp(7)).tokens
    assert both[0] == e.generate(a, max_new_tokens=12, sampling=sp(7)).tokens[0]
    assert both[1] == e.generate(b, max_new_tokens=12, sampling=sp(8)).tokens[0]
    assert e.generate([a, prompt(3, seed=3)], max_new_tokens=12, sampling=sp(7)).tokens[0] == both[0]
    same = e.generate([a, a], max_new_tokens=12, sampling=sp(7)).tokens
    assert same[0] == both[0] and same[1] != same[0]


def test_stop_strings_and_streaming(tok):
    e = engine(tokenizer=tok)
    p = tok.encode("def add(a, b):\n")
    full = e.generate(p, max_new_tokens=40, ignore_eos=True)
    text = full.texts[0]
    assert len(text) > 12
    stop = text[8:11]
    chunks = []
    res = e.generate(p, max_new_tokens=40, stop=[stop], on_text=lambda row, s: chunks.append(s), ignore_eos=True)
    assert res.texts[0] == text[: text.find(stop)] and res.finish_reasons == ["stop"]
    assert "".join(chunks) == res.texts[0]
    # streaming without stop strings reproduces decode() of the generated ids
    chunks = []
    res = e.generate(p, max_new_tokens=40, on_text=lambda row, s: chunks.append(s), ignore_eos=True)
    assert "".join(chunks) == res.texts[0] == tok.decode(res.tokens[0])
    # a batch: each row's text is streamed under its own row index
    rows = {0: [], 1: []}
    q = tok.encode("import os\n")
    res = e.generate([p, q], max_new_tokens=20, on_text=lambda row, s: rows[row].append(s), ignore_eos=True)
    assert ["".join(rows[0]), "".join(rows[1])] == res.texts and all(res.texts) and res.texts[0] != res.texts[1]


def test_text_stream_waits_for_whole_characters_and_hides_stop_strings(tok):
    text = "print('héllo ☃ wörld 日本')\nx = 1 # STOP here"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) / 3  # multi-byte characters span several tokens
    s = TextStream(tok.decode)
    chunks = [s.push([i]) for i in ids] + [s.finish()]
    assert all("\ufffd" not in c for c in chunks) and "".join(chunks) == text
    s = TextStream(tok.decode, stop=["STOP"])
    chunks = [s.push([i]) for i in ids] + [s.finish()]
    assert "".join(chunks) == s.text == text[: text.index("STOP")] and s.stopped
    assert all("ST" not in c for c in chunks)


def test_text_stream_flushes_only_the_held_back_tail_and_stops_at_the_first_stop_string():
    """finish() returns just the text not yet emitted (an incomplete character as U+FFFD), not the emitted text
    again; with several stop strings in the new text, the earliest one ends it."""
    s = TextStream(lambda ids: bytes(ids).decode(errors="replace"))
    assert s.push([97, 98]) == "ab" and s.push([0xC3]) == ""  # the first byte of a 2-byte character: held back
    assert s.finish() == "\ufffd" and s.text == "ab\ufffd"
    s = TextStream(lambda ids: "".join(map(chr, ids)), stop=["b", "c"])
    assert s.push([ord(c) for c in "acdb"]) == "a" and s.text == "a" and s.stopped


def test_row_ending_by_eos_or_stop_string_on_its_last_allowed_token():
    """An EOS or a stop string arriving as exactly the max_new-th token is the finish reason, not "length"."""
    r = RowOutput(2, eos_id=5)
    assert r.add(1) is False and r.add(5) is True and r.finish_reason == "eos" and r.tokens == [1, 5]
    assert r.add(7) is True and r.tokens == [1, 5]  # later ids are ignored
    chars = SimpleNamespace(decode=lambda ids: "".join(map(chr, ids)))
    r = RowOutput(2, None, chars, stop=["b"])
    assert r.add(ord("a")) is False and r.add(ord("b")) is True and r.finish_reason == "stop" and r.text == "a"
    r = RowOutput(2, None, chars, stop=["b"])
    assert r.add(ord("a")) is False and r.add(ord("c")) is True and r.finish_reason == "length" and r.text == "ac"


def with_eos(tok, eos_id, directory):
    """`tok` with token `eos_id` as its EOS: saved with a tokenizer_config.json naming it (as a model directory
    has), loaded back by `Tokenizer.from_file`. Lets a test make any token of a known continuation the EOS."""
    from nanoseek.tokenizer import Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tok.save(directory / "tokenizer.json")
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    name = next(s for s, i in vocab.items() if i == eos_id)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": name}))
    eos_tok = Tokenizer.from_file(directory / "tokenizer.json")
    assert eos_tok.eos_id == eos_id
    return eos_tok


def first_new(ids, start, avoid=()):
    """Index of the first id at or after `start` that occurs neither earlier in `ids` nor in `avoid`: made
    the EOS, it ends the continuation exactly there."""
    return next(i for i in range(start, len(ids)) if ids[i] not in ids[:i] and ids[i] not in avoid)


def test_eos_ends_its_row_only(tok, tmp_path):
    """Greedy continuations are known (ignore_eos); then their 3rd-or-so token is made the EOS. A row stops
    right after it (the EOS included in its tokens, not in its text, finish reason "eos") and collects nothing
    later, while the other row of the batch runs to its full length; speculative decoding stops there too."""
    e = engine(tokenizer=tok)
    p, q = tok.encode("def add(a, b):\n"), tok.encode("import os\n")
    full = e.generate([p, q], max_new_tokens=20, ignore_eos=True).tokens
    vocab = set(range(tok.vocab_size))
    n = first_new(full[0], 2, avoid=set(full[1]) | (set(range(300)) - vocab))
    assert n < 10, full
    e.tokenizer = with_eos(tok, full[0][n], tmp_path)
    want = full[0][: n + 1]
    res = e.generate(p, max_new_tokens=20)
    assert res.tokens == [want] and res.finish_reasons == ["eos"]
    assert res.texts == [tok.decode(want[:-1])]
    batch = e.generate([p, q], max_new_tokens=20)
    assert batch.tokens == [want, full[1]] and batch.finish_reasons == ["eos", "length"]
    assert e.generate(p, max_new_tokens=20, speculative=2).tokens == [want]
    assert e.generate([p, q], max_new_tokens=20, ignore_eos=True).tokens == full  # ignore_eos still ignores it


def test_held_back_text_is_flushed_when_a_row_ends(tok):
    """A stop string that begins with the last generated character but never completes: that character is held
    back (it could start the stop string) and must still be emitted, in the text and the stream, when the row
    ends by length."""
    e = engine(tokenizer=tok)
    p = tok.encode("def add(a, b):\n")
    text = e.generate(p, max_new_tokens=40, ignore_eos=True).texts[0]
    chunks = []
    stop = [text[-1] + "\x01"]
    res = e.generate(p, max_new_tokens=40, stop=stop, on_text=lambda row, s: chunks.append(s), ignore_eos=True)
    assert res.finish_reasons == ["length"]
    assert res.texts[0] == text == tok.decode(res.tokens[0]) and "".join(chunks) == text


def test_ids_the_tokenizer_lacks_are_never_generated():
    """The head has 300 rows, the tokenizer 280 ids (a BPE trained on a small corpus stops early): no path
    (greedy, chunked-eager greedy, sampling, speculative greedy and sampled) emits an id >= 280, which would
    decode to nothing. The same model without a tokenizer (id prompts) does emit them, so the check can fail;
    greedy then is the argmax over the tokenizer's ids. A later engine without a tokenizer lifts the limit."""
    from nanoseek.tokenizer import train_tokenizer

    small = train_tokenizer([TEXT] * 4, vocab_size=280)
    assert small.vocab_size == 280
    p = [prompt(9, seed) for seed in range(4)]
    hot = SamplingParams(2.0, seed=0)

    def ids(e):
        runs = [e.generate(p, max_new_tokens=24, ignore_eos=True), e.generate(p, 24, hot, ignore_eos=True)]
        for q in p[:2]:
            runs += [e.generate(q, 24, speculative=2, ignore_eos=True)]
            runs += [e.generate(q, 24, SamplingParams(2.0, seed=1), speculative=1, ignore_eos=True)]
        return [t for r in runs for row in r.tokens for t in row]

    free = engine()
    assert max(ids(free)) >= 280  # random weights: ~7% of the mass sits above the tokenizer's ids
    limited = Engine(free.model, small, dtype="fp32")
    assert max(ids(limited)) < 280
    with torch.inference_mode():
        full = free.model(torch.tensor(p))[:, -1]  # [4, 300]; the hook masks it too
    assert torch.isinf(full[:, 280:]).all()
    assert limited.generate(p, max_new_tokens=1).tokens == full[:, :280].argmax(-1)[:, None].tolist()
    assert max(ids(Engine(free.model, None, dtype="fp32"))) >= 280


# --- speculative decoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mtp_layers", "k"), [(2, 1), (2, 2), (2, 3), (1, 2)])
def test_speculative_greedy_equals_plain_greedy(mtp_layers, k):
    e = engine(num_nextn_predict_layers=mtp_layers)
    for p in (prompt(13, 1), prompt(3, 2)):
        plain = e.generate(p, max_new_tokens=30)
        spec = e.generate(p, max_new_tokens=30, speculative=k)
        assert spec.tokens == plain.tokens
        assert spec.acceptance_rate is not None and len(spec.acceptance_per_position) == k
        assert spec.main_forwards <= plain.main_forwards


def test_speculative_greedy_equals_plain_greedy_on_a_trained_model():
    """A micro model with two MTP modules, trained until main model and MTP heads know a deterministic rule
    (x_{i+1} = 7 x_i + 3 mod 50): drafts are then accepted, and the accepting paths (k <= D and k > D, where the
    last module is chained) must still reproduce plain greedy decoding token for token."""
    from nanoseek.train import lm_losses

    torch.manual_seed(0)
    m = Transformer(micro())
    g = torch.Generator().manual_seed(0)

    def rule(n: int, T: int) -> torch.Tensor:
        cols = [torch.randint(0, 50, (n, 1), generator=g)]
        for _ in range(T):
            cols.append((cols[-1] * 7 + 3) % 50)
        return torch.cat(cols, 1)

    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(150):
        s = rule(16, 48)
        ce, mtps = lm_losses(m, s[:, :-1], s[:, 1:], use_mtp=True)
        opt.zero_grad()
        (ce + 0.3 * sum(mtps) / len(mtps)).backward()
        opt.step()
    assert ce.item() < 0.2 and max(x.item() for x in mtps) < 0.1  # trained: the rule is learned
    e = Engine(m, dtype="fp32")
    p = rule(1, 10)[0].tolist()
    plain = e.generate(p, max_new_tokens=30)
    for k in (1, 2, 3):
        spec = e.generate(p, max_new_tokens=30, speculative=k)
        assert spec.tokens == plain.tokens
        assert spec.acceptance_rate > 0.9 and spec.tokens_per_forward > k  # drafts were accepted
        # every position, the chained one (k = 3 > D = 2) included: a draft written to the wrong cache slot
        # would still give the right tokens, only fewer accepted
        assert min(spec.acceptance_per_position) > 0.9, spec.acceptance_per_position
        # the one-call greedy step and the general rejection loop (a tiny temperature) make the same drafts
        loop = e.generate(p, max_new_tokens=30, speculative=k, sampling=SamplingParams(1e-45, seed=0))
        assert loop.tokens == plain.tokens and loop.main_forwards == spec.main_forwards
        assert loop.acceptance_per_position == spec.acceptance_per_position


@pytest.mark.parametrize(("mtp_layers", "k"), [(2, 2), (2, 3), (1, 1)])
def test_mtp_caches_stay_consistent_after_rejections(mtp_layers, k):
    """After speculative decoding on a random model (drafts mostly rejected), every final MTP cache entry
    equals what an MTP pass over the committed text computes."""
    e = engine(num_nextn_predict_layers=mtp_layers)
    m, L, D = e.model, e.model.cfg.num_hidden_layers, mtp_layers
    p = prompt(9)
    caches = m.make_caches(1, 64, torch.float32)
    with torch.inference_mode():
        res = speculative_generate(e, p, 30, k, SamplingParams(), RowOutput(30, None), caches=caches)
        seq = torch.tensor([p + res.tokens[0]])
        n = seq.shape[1]
        h = m.hidden(seq)
        checked = n - k - 2 - D  # slots certainly final (the last step may have been cut by max_new_tokens)
        for j in range(D):
            ref = m.make_caches(1, 64, torch.float32)[L + j]
            h = m.mtp_step(j, h[:, : n - j - 1], seq[:, j + 1 :], cache=ref)
            for name, buf in caches[L + j].store.items():
                assert (buf[:, :checked] - ref.store[name][:, :checked]).abs().max() < 1e-5
    assert res.acceptance_rate < 0.5  # rejections did happen


@pytest.mark.parametrize("k", [2, 3])
def test_one_call_greedy_path_drafts_exactly_like_the_general_loop(k):
    """V3's single MTP module chained for k > 1: the one-call greedy path and the general loop (a tiny
    temperature) must verify the same drafts at the same slots, step by step. Mostly rejected on a random
    model, so each next chain starts from a mid-step slot (a draft from the wrong slot keeps the output
    tokens right, only the drafts change)."""
    e = engine(num_nextn_predict_layers=1)
    seen = {}
    for name, sampling in (("one-call", None), ("loop", SamplingParams(1e-45, seed=0))):
        calls = []

        def record(real, calls=calls):
            def wrapped(tokens, start, *a):
                calls.append((start, tokens[0, 1:].tolist()))
                return real(tokens, start, *a)

            return wrapped

        with patch.object(e, "verify", record(e.verify)), patch.object(e, "greedy_step", record(e.greedy_step)):
            r = e.generate(prompt(9), max_new_tokens=40, speculative=k, sampling=sampling)
        seen[name] = calls, r.tokens
    assert len(seen["loop"][0]) > 10 and seen["one-call"] == seen["loop"]


@pytest.mark.parametrize("greedy_path", [True, False])
def test_chained_drafts_equal_an_uncached_chain(greedy_path):
    """k = 3 with one MTP module: drafts 2 and 3 chain the module on its own output at the next positions.
    Every step's draft logits must equal that chain computed without any cache over the committed text (a
    draft computed at another cache slot or position keeps the output tokens right; only the drafts change)."""
    e = engine(num_nextn_predict_layers=1)
    m, k = e.model, 3

    def uncached_chain(seq: list[int]) -> list[torch.Tensor]:  # seq = t_0 .. t_N, t_N committed, not yet fed
        x = torch.tensor([seq])
        hid, toks, out = m.hidden(x[:, :-1]), x[:, 1:], []
        for _ in range(k):
            g = m.mtp_step(0, hid, toks)  # position i reads (input hidden i, token i + 1)
            out.append(m.mtp_logits_from_hidden(0, g[:, -1])[0])
            d = torch.tensor([[int(out[-1].argmax())]])
            hid, toks = torch.cat([hid, g[:, -1:]], 1), torch.cat([toks, d], 1)
        return out

    steps, drafted = [], []  # per verify call: (slot, [t_N, drafts...]); the draft calls' logits before it

    def record_verify(real):
        def wrapped(tokens, start, *a):
            steps.append((start, tokens[0].tolist(), drafted[:]))
            drafted.clear()
            return real(tokens, start, *a)

        return wrapped

    def record_draft(j, x, toks, start, cache):
        x, logits = real_draft(j, x, toks, start, cache)
        drafted.append(logits.reshape(-1, logits.shape[-1])[-1].clone())
        return x, logits

    real_draft = e.draft
    p = prompt(9)
    sampling = None if greedy_path else SamplingParams(1e-45, seed=0)
    with (
        patch.object(e, "verify", record_verify(e.verify)),
        patch.object(e, "greedy_step", record_verify(e.greedy_step)),
        patch.object(e, "draft", record_draft),
    ):
        out = e.generate(p, max_new_tokens=30, speculative=k, sampling=sampling).tokens[0]
    seq = p + out
    with torch.inference_mode():
        for start, (pending, *drafts), logits in steps:
            want = uncached_chain(seq[: start + 1])
            assert seq[start] == pending and drafts == [int(w.argmax()) for w in want], start
            # the one-call path gets draft 1 from its verify call; the chained drafts come from `draft`
            for got, ref in zip(logits, want[k - len(logits) :], strict=True):
                assert (got - ref).abs().max() < 1e-4, start
    assert len(steps) > 5


def test_acceptance_per_position_never_increases():
    """Draft j + 1 counts as accepted only after draft j was. Sampling at T = 1 on a random model accepts
    part of the drafts (measured [0.6, 0.52, 0.24] at k = 3)."""
    e = engine(num_nextn_predict_layers=2)
    for k in (2, 3):
        pos = e.generate(prompt(9), max_new_tokens=60, speculative=k, sampling=SamplingParams(1.0, seed=0))
        pos = pos.acceptance_per_position
        assert 0 < pos[-1] < pos[0] < 1 and all(a >= b for a, b in itertools.pairwise(pos)), pos


def copycat(k_layers=1):
    """A model whose main output depends only on the current token and whose MTP module predicts exactly
    what the main model will predict next: every (greedy) draft is accepted."""
    e = engine(num_nextn_predict_layers=k_layers)
    m = e.model
    with torch.no_grad():
        for b in m.blocks():
            b.self_attn.o_proj.weight.zero_()
            if hasattr(b.mlp, "experts"):
                b.mlp.experts.w2.zero_()
                b.mlp.shared_experts.down_proj.weight.zero_()
            else:
                b.mlp.down_proj.weight.zero_()
        d = m.cfg.hidden_size
        for layer in m.mtp:  # h' = enorm(Emb(t_{i+1})): the draft is the main model's guess for t_{i+1}
            layer.eh_proj.weight.copy_(torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1))
    return e


@pytest.mark.parametrize(("mtp_layers", "k"), [(1, 1), (1, 3), (2, 2)])
def test_acceptance_statistics_on_a_perfect_draft(mtp_layers, k):
    e = copycat(mtp_layers)
    p = prompt(5)
    plain = e.generate(p, max_new_tokens=25)
    spec = e.generate(p, max_new_tokens=25, speculative=k)
    assert spec.tokens == plain.tokens
    assert spec.acceptance_rate == 1.0 and spec.acceptance_per_position == [1.0] * k
    assert spec.tokens_per_forward == k + 1
    assert spec.main_forwards == 1 + -(-24 // (k + 1))  # the prefill, then k+1 tokens per forward
    sampled = e.generate(p, max_new_tokens=25, speculative=k, sampling=SamplingParams(1.0, seed=0))
    assert sampled.acceptance_rate > 0.95  # q == p up to rounding
    # 26 tokens: after the first, 25 in ceil(25 / (k+1)) steps; the last step's drafts past the end are dropped
    # and must not count as tokens per forward (all drafts are still right: the acceptance stays 1)
    for sampling in (None, SamplingParams(1e-45, seed=0)):  # the one-call greedy loop and the general one
        short = e.generate(p, max_new_tokens=26, speculative=k, sampling=sampling)
        steps = -(-25 // (k + 1))
        assert short.tokens == e.generate(p, max_new_tokens=26).tokens and short.main_forwards == 1 + steps
        assert short.tokens_per_forward == pytest.approx(25 / steps) and short.acceptance_rate == 1.0


def test_rejection_sampling_preserves_the_target_distribution():
    """Drafts from q, verified against p: the committed tokens must follow p (position 0 always; position 1
    given that draft 0 was accepted; the bonus token given both were)."""
    g = torch.Generator().manual_seed(0)
    V, n = 5, 12000
    p_logits = torch.randn(3, V, generator=g) * 1.5
    q = torch.randn(2, V, generator=g).mul(1.5).softmax(-1)
    params = SamplingParams(temperature=1.0, seed=0)
    p = probs(p_logits, params)
    gen = params.generator()
    first, second, bonus = torch.zeros(V), torch.zeros(V), torch.zeros(V)
    for _ in range(n):
        drafts = [int(draw(q[0], gen)), int(draw(q[1], gen))]
        a, nxt = accept_drafts(p_logits, drafts, [q[0], q[1]], params, gen)
        out = [*drafts[:a], nxt]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
        if len(out) > 2:
            bonus[out[2]] += 1
    for counts, target in ((first, p[0]), (second, p[1]), (bonus, p[2])):
        assert counts.sum() > 1000
        tv = 0.5 * (counts / counts.sum() - target).abs().sum()
        assert tv < 0.03, (counts / counts.sum(), target)
    assert (first / n - q[0]).abs().sum() / 2 > 0.1  # the drafts alone would have been detectably wrong


def test_one_draft_speculative_sampling_samples():
    """k = 1 (one MTP depth) with temperature 1 goes through the rejection-sampling loop, not the greedy
    one-call path: seeded runs are reproducible, differ between seeds and from greedy decoding, and the first
    token (from the prefill) is what plain sampling with the same seed draws."""
    e = engine()
    p = prompt(8)
    greedy = e.generate(p, max_new_tokens=16).tokens[0]
    runs = [e.generate(p, max_new_tokens=16, speculative=1, sampling=SamplingParams(1.0, seed=s)) for s in (0, 0, 1)]
    assert runs[0].tokens == runs[1].tokens != runs[2].tokens
    assert all(r.tokens[0] != greedy for r in runs)
    plain = e.generate(p, max_new_tokens=16, sampling=SamplingParams(1.0, seed=0)).tokens[0]
    assert runs[0].tokens[0][0] == plain[0]


def test_speculative_errors():
    e = engine(num_nextn_predict_layers=0)
    with pytest.raises(NanoseekError, match="MTP"):
        e.generate(prompt(4), max_new_tokens=3, speculative=1)
    e = engine()
    with pytest.raises(NanoseekError, match="batch 1"):
        e.generate([prompt(4), prompt(5)], max_new_tokens=3, speculative=1)
    for k in (-4, 4, 100_000):  # more drafts than new tokens would only allocate (100_000: out of memory)
        with pytest.raises(NanoseekError, match=r"--draft-tokens must be in \[1, --max-new-tokens = 3\], got"):
            e.generate(prompt(4), max_new_tokens=3, speculative=k)


@pytest.mark.parametrize("sampling", [None, SamplingParams(1.0, seed=0)])
def test_no_speculative_step_reports_no_acceptance(sampling):
    """One new token comes from the prefill: no draft was proposed, so there is no acceptance rate (not 0)."""
    res = engine().generate(prompt(4), max_new_tokens=1, speculative=1, sampling=sampling)
    assert len(res.tokens[0]) == 1 and res.extra["speculative_steps"] == 0 and res.main_forwards == 1
    d = res.to_dict()
    assert d["acceptance_rate"] is None and d["acceptance_per_position"] is None and d["tokens_per_forward"] == 1.0


def test_decode_moe_gather_path_matches_the_sorted_path():
    """The static-shape gather path that decoding (and the compiled step) takes computes what the sorted
    grouped-GEMM path computes."""
    e = engine(dtype="fp32")
    moe = e.model.moe_layers()[0]
    x = torch.randn(3, 1, e.model.cfg.hidden_size)
    with torch.inference_mode():
        moe.experts.impl = "auto"  # 3 tokens x top-2 <= 16 experts: the gather path
        got = moe(x)
        moe.experts.impl = "loop"
        ref = moe(x)
        moe.experts.impl = "auto"
    assert (got - ref).abs().max() < 1e-5 and ref.abs().max() > 0


# --- CLI -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_model(Transformer(micro()), d)
    tok.save(d / "tokenizer.json")
    return d


def test_generate_into_a_closed_pipe_stops_quietly(saved_model):
    """`nanoseek generate ... | head -c 3`: when stdout's reader has gone, the streamed text stops without a
    BrokenPipeError traceback, with the exit status of a process killed by SIGPIPE."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "nanoseek", "generate", "--model", str(saved_model), "--max-new-tokens", "20"]
    args = [*cmd, "--prompt", "def", "--threads", "1"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first token is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_generate_cli_json_end_to_end(saved_model):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "nanoseek", "generate", "--model", str(saved_model), "--max-new-tokens", "6"]
    cmd += ["--threads", "1"]
    r = subprocess.run(
        [*cmd, "--prompt", "def add(", "--json", "--speculative", "mtp", "--draft-tokens", "2", "--ignore-eos"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    keys = {"text", "tokens", "tokens_per_s", "acceptance_rate", "kv_cache_bytes_per_token"}
    assert keys | {"acceptance_per_position", "tokens_per_forward"} <= out.keys()
    assert len(out["tokens"]) == 6 and isinstance(out["text"], str) and out["acceptance_rate"] is not None
    assert len(out["acceptance_per_position"]) == 2


def test_generate_cli_plain_chat_and_errors(saved_model, capsys, monkeypatch, tmp_path):
    import io

    from nanoseek.cli import main

    base = ["generate", "--model", str(saved_model), "--max-new-tokens", "4", "--dtype", "fp32", "--ignore-eos"]
    assert main([*base, "--prompt", "x = ", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["acceptance_rate"] is None and out["tokens_per_forward"] == 1.0 and len(out["tokens"]) == 4
    monkeypatch.setattr(sys, "stdin", io.StringIO("import os\nprint(\n"))
    assert main([*base, "--chat", "--json"]) == 0
    turns = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(turns) == 2 and turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] + 4  # history kept
    assert main([*base, "--prompt", "x", "--top-p", "0"]) == 2
    bare = tmp_path / "bare"
    torch.manual_seed(0)
    save_model(Transformer(micro()), bare)
    assert main(["generate", "--model", str(bare), "--prompt", "x"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["generate", "--model", str(bare), "--prompt", "x", "--tokenizer", str(saved_model / "tokenizer.json"),
                 "--max-new-tokens", "3"]) == 0  # fmt: skip


def test_generate_cli_refuses_bad_flags_in_one_line(saved_model, capsys, monkeypatch):
    import io

    from nanoseek.cli import main

    base = ["generate", "--model", str(saved_model), "--max-new-tokens", "4", "--prompt", "x"]
    bad = {
        ("--threads", "-2"): "--threads must be >= 1, got -2",
        ("--threads", "0"): "--threads must be >= 1, got 0",
        ("--max-new-tokens", "0"): "--max-new-tokens must be >= 1, got 0",
        ("--draft-tokens", "2"): "--draft-tokens applies to --speculative mtp only",
        ("--speculative", "mtp", "--draft-tokens", "-4"): "--draft-tokens must be in [1, --max-new-tokens = 4], got -4",
        ("--speculative", "mtp", "--draft-tokens", "100000"): "must be in [1, --max-new-tokens = 4], got 100000",
        ("--speculative", "mtp", "--draft-tokens", "0"): "--draft-tokens must be in [1, --max-new-tokens = 4], got 0",
        ("--temperature", "nan"): "temperature must be a finite number >= 0, got nan",
        ("--prompt", "abc\udcff"): "--prompt is not valid UTF-8 (at position 3)",  # argv's escape of byte 0xff
        ("--prompt", "y", "--speculative", "mtp"): "--speculative mtp decodes one prompt at a time",
        ("--chat", "--prompt", "y"): "--chat reads its turns from stdin: give at most one --prompt",
        ("--prompt", "-", "--prompt", "-"): "--prompt - (stdin) can be given once",
    }
    for flags, msg in bad.items():
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (flags, err)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"abc\xff\n")))
    assert main([*base[:-1], "-"]) == 2
    assert "error: the prompt on stdin is not valid UTF-8 (at position 3)" in capsys.readouterr().err


def test_generate_cli_batch_chat_prompt_and_no_speculative_step(saved_model, tok, capsys, monkeypatch):
    import io

    from nanoseek.cli import main

    base = ["generate", "--model", str(saved_model), "--max-new-tokens", "4", "--dtype", "fp32", "--ignore-eos"]
    singles = []
    for p in ("x = ", "def add("):
        assert main([*base, "--prompt", p, "--json"]) == 0
        singles.append(json.loads(capsys.readouterr().out))
    assert main([*base, "--prompt", "x = ", "--prompt", "def add(", "--json"]) == 0
    batch = json.loads(capsys.readouterr().out)
    assert batch["tokens"] == [s["tokens"] for s in singles] and batch["text"] == [s["text"] for s in singles]
    assert main([*base, "--prompt", "x = ", "--prompt", "def add("]) == 0
    out = capsys.readouterr().out
    assert out == f"=== prompt 1 ===\n{singles[0]['text']}\n=== prompt 2 ===\n{singles[1]['text']}\n"  # not streamed
    # --chat: --prompt is the first turn, then stdin's lines
    monkeypatch.setattr(sys, "stdin", io.StringIO("def add(\n"))
    assert main([*base, "--chat", "--json", "--prompt", "x = "]) == 0
    turns = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(turns) == 2 and turns[0]["prompt_tokens"] == len(tok.encode("x = \n"))  # a line, as the others
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] + 4
    # one new token: no speculative step, so no acceptance rate (n/a), not 0
    assert main([*base[:-3], "--max-new-tokens", "1", "--prompt", "x", "--speculative", "mtp"]) == 0
    assert "acceptance n/a (no speculative step)" in capsys.readouterr().err


def test_generate_cli_stops_at_eos(saved_model, tok, capsys, tmp_path):
    """Without --ignore-eos the CLI stops at the tokenizer's EOS: here a --tokenizer whose EOS is a token of
    the known greedy continuation (the same vocabulary, so the ids before it are unchanged)."""
    from nanoseek.cli import main

    base = ["generate", "--model", str(saved_model), "--max-new-tokens", "12", "--dtype", "fp32"]
    base += ["--prompt", "def add(", "--json"]
    assert main([*base, "--ignore-eos"]) == 0
    full = json.loads(capsys.readouterr().out)["tokens"]
    n = first_new(full, 2, avoid=set(range(300)) - set(range(tok.vocab_size)))
    with_eos(tok, full[n], tmp_path)
    assert main([*base, "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == full[: n + 1] and out["finish_reason"] == "eos"
    assert main([*base, "--tokenizer", str(tmp_path / "tokenizer.json"), "--ignore-eos"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == full and out["finish_reason"] == "length"


def test_generate_cli_chat_keeps_the_newest_tokens(tok, capsys, monkeypatch, tmp_path):
    """A chat turn whose conversation does not fit (max_position_embeddings - --max-new-tokens = 28 tokens of
    room) drops the oldest tokens: it generates what the engine generates from the last 28."""
    import io

    from nanoseek.cli import main

    torch.manual_seed(0)
    m = Transformer(micro(max_position_embeddings=32))
    randomize_bias(m)
    save_model(m, tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    ids = tok.encode(TEXT)
    assert len(ids) > 2 * 28
    e = Engine.load(tmp_path, dtype="fp32")
    newest = e.generate(ids[-28:], max_new_tokens=4, ignore_eos=True).tokens[0]
    assert e.generate(ids[:28], max_new_tokens=4, ignore_eos=True).tokens[0] != newest  # the test can tell
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    argv = ["generate", "--model", str(tmp_path), "--max-new-tokens", "4", "--dtype", "fp32", "--ignore-eos"]
    assert main([*argv, "--chat", "--json", "--prompt", TEXT]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] == 28 and out["tokens"] == newest


def record_prompts(monkeypatch, stdin: str) -> list[list[int]]:
    """Chat turns read from `stdin`; returns the list that receives each `Engine.generate` call's prompt ids."""
    import io

    seen: list[list[int]] = []
    real = Engine.generate

    def recording(self, prompts, **kw):
        seen.append(list(prompts))
        return real(self, prompts, **kw)

    monkeypatch.setattr(Engine, "generate", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return seen


def test_generate_cli_chat_history_is_what_the_screen_shows(tok, capsys, monkeypatch, tmp_path):
    """The next turn's prompt is the previous prompt, the reply's tokens, a newline ending the reply's line (as
    printed) and the user's new line."""
    from nanoseek.cli import main

    torch.manual_seed(0)
    save_model(Transformer(micro()), tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    seen = record_prompts(monkeypatch, "hello\n")
    argv = ["generate", "--model", str(tmp_path), "--max-new-tokens", "3", "--dtype", "fp32", "--ignore-eos"]
    assert main([*argv, "--chat", "--json", "--prompt", "def main("]) == 0
    first, second = (json.loads(ln) for ln in capsys.readouterr().out.splitlines())
    assert not first["text"].endswith("\n")  # the case where the newline must be added
    assert seen[1] == seen[0] + first["tokens"] + tok.encode("\n") + tok.encode("hello\n")
    assert seen[0] == tok.encode("def main(\n") and second["prompt_tokens"] == len(seen[1])


def test_generate_cli_chat_history_leaves_out_the_eos(tok, capsys, monkeypatch, tmp_path):
    """A reply that ended with the EOS: the EOS (in its tokens, not on the screen) is not part of the next
    turn's prompt, which holds the reply's other tokens, the newline ending its line and the new line."""
    from nanoseek.cli import main

    torch.manual_seed(0)
    save_model(Transformer(micro()), tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    argv = ["generate", "--model", str(tmp_path), "--max-new-tokens", "12", "--dtype", "fp32", "--json"]
    assert main([*argv, "--prompt", "def main(\n", "--ignore-eos"]) == 0
    full = json.loads(capsys.readouterr().out)["tokens"]
    avoid = set(tok.encode("def main(\n") + tok.encode("\nhello\n")) | set(range(tok.vocab_size, 300))
    n = first_new(full, 2, avoid=avoid)
    eos = with_eos(tok, full[n], tmp_path / "eos").eos_id
    seen = record_prompts(monkeypatch, "hello\n")
    assert main([*argv, "--chat", "--prompt", "def main(", "--tokenizer", str(tmp_path / "eos/tokenizer.json")]) == 0
    first, _ = (json.loads(ln) for ln in capsys.readouterr().out.splitlines())
    assert first["finish_reason"] == "eos" and first["tokens"] == full[: n + 1] and first["tokens"][-1] == eos
    newline = [] if first["text"].endswith("\n") else tok.encode("\n")
    assert seen[1] == seen[0] + full[:n] + newline + tok.encode("hello\n") and eos not in seen[1]


def test_decode_bench_quick_on_a_saved_model(saved_model, tmp_path):
    """`nanoseek bench decode --quick` end to end on a micro model: every arm ran, and the greedy tokens of
    our fp32 engine equal transformers' and plain == speculative (the arms measure the same decoding)."""
    pytest.importorskip("transformers")
    from nanoseek import bench_decode

    r = bench_decode.run(quick=True, out_dir=tmp_path, model=str(saved_model))
    assert json.loads((tmp_path / "bench_decode.json").read_text())["tokens_per_s"] == r["tokens_per_s"]
    want = {f"ours_{d}_{arm}" for d in ("bf16", "fp32") for arm in ("b1", "b8", "speculative_k1_b1")}
    assert want | {"transformers_fp32_b1", "transformers_bf16_b8"} <= r["tokens_per_s"].keys()
    assert r["arms_compared"]["ours_eager"] in r["tokens_per_s"] and r["speedup_vs_transformers"] > 0
    agree = r["greedy_agreement"]
    assert agree["ours_fp32_vs_transformers_fp32"] == agree["ours_fp32_b8_vs_transformers_fp32_b8"] == 1.0
    assert agree["speculative_k1_vs_plain_fp32"] == agree["speculative_k2_vs_plain_fp32"] == 1.0
    assert 0 <= r["acceptance_rate"] <= 1 and len(r["acceptance_per_position_k2"]) == 2
    assert r["batch1_prompts"] == 2 and all(g["value"] is None or g["value"] >= 0 for g in r["goals"])


def test_compiled_engine_matches_eager():
    """`compile=True` (torch.compile of the decode step, the greedy chunk of 4 steps, and the speculative steps,
    C++ wrapper): a batch of mixed-length prompts and speculative decoding give the eager engine's greedy
    tokens."""
    torch.manual_seed(0)
    m = Transformer(micro_config(vocab_size=256)).eval()
    randomize_bias(m)
    eager, comp = Engine(m, None, dtype="fp32"), Engine(m, None, dtype="fp32", compile=True)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    want = eager.generate(prompts, max_new_tokens=12, ignore_eos=True).tokens
    with patch.object(comp, "greedy_chunk", wraps=comp.greedy_chunk) as chunk:
        got = comp.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert got.tokens == want and got.main_forwards == 12
    assert chunk.call_count == 2  # 11 decode steps: two compiled chunks of 4 greedy steps, then 3 single steps
    spec = comp.generate(prompts[0], max_new_tokens=12, ignore_eos=True, speculative=2)
    assert spec.tokens == [want[0]]


def test_decode_bench_pools_acceptance_over_speculative_steps_only():
    """The decode bench's pooled acceptance weighs each prompt by its speculative steps; a prompt that ended
    before any step (acceptance None: nothing was proposed) counts for nothing instead of breaking the mean."""
    from nanoseek.bench_decode import Pooled
    from nanoseek.engine import Generation

    def gen(steps, acc, per_pos, tpf):
        return Generation([[1] * 5], None, ["length"], [3], 0.1, 0.4, 1 + steps, 80, acc, per_pos, tpf,
                          {"speculative_steps": steps})  # fmt: skip

    p = Pooled([gen(3, 0.5, [0.5], 1.5), gen(0, None, None, 1.0), gen(1, 1.0, [1.0], 2.0)])
    assert p.acceptance_rate == pytest.approx(0.625) and p.acceptance_per_position == [pytest.approx(0.625)]
    assert p.tokens_per_forward == pytest.approx(1.625)
    assert Pooled([gen(0, None, None, 1.0)]).acceptance_rate is None


def test_engine_api_input_errors_and_tensor_prompts():
    """The Python API's own checks: a max_len past the model's positions, an unknown dtype name and a
    non-integer top_k are NanoseekErrors before anything runs; tensor prompts work like lists."""
    m = Transformer(micro_config(max_position_embeddings=16)).eval()
    with pytest.raises(NanoseekError, match="max_len 1000 must be in"):
        Engine(m, None, dtype="fp32", max_len=1000)
    with pytest.raises(NanoseekError, match="dtype must be one of bf16, fp32, got 'fp16'"):
        Engine(m, None, dtype="fp16")
    with pytest.raises(NanoseekError, match="top_k must be an integer"):
        SamplingParams(top_k=1.5)
    assert Engine(m, None, dtype="fp32", max_len=16).max_len == 16  # the whole context is allowed
    eng = Engine(m, None, dtype="fp32")
    want = eng.generate([[1, 2, 3], [4, 5, 6]], max_new_tokens=4).tokens
    assert eng.generate(torch.tensor([1, 2, 3]), max_new_tokens=4).tokens == want[:1]
    assert eng.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=4).tokens == want
    assert eng.generate(np.array([1, 2, 3]), max_new_tokens=4).tokens == want[:1]  # numpy ids and arrays
    assert eng.generate([np.int64(1), np.int64(2), np.int64(3)], max_new_tokens=4).tokens == want[:1]
    assert eng.generate(np.array([[1, 2, 3], [4, 5, 6]]), max_new_tokens=4).tokens == want
