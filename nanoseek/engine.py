"""Inference engine: prefill + incremental decoding over a preallocated latent KV cache.

- The cache is `model.make_caches(...)`: with absorbed MLA (the default) each layer stores only the normalised
  latent c_KV [kv_lora_rank] and the shared rotated key k_pe [qk_rope_head_dim] per token.
- Batches of prompts with different lengths are left-padded to a common length. All rows share cache slot
  indices; padding slots are masked with `key_valid` [B, S] and each row gets its own RoPE positions, so a
  row decodes exactly as it would alone.
- bf16 by default (fp32 on request), always under `torch.inference_mode()`. Per step the only host sync is
  reading the sampled ids (for EOS / stop strings); the Python per step is the model's own forward.
- `compile=True` compiles the decode step with `torch.compile` (opt-in: ~40-100 s the first time; greedy
  decoding compiles a chunk of GREEDY_CHUNK steps as one graph, so the per-call costs are paid per chunk,
  and greedy speculative decoding its one-call step). With few tokens per forward the MoE takes its gather
  path (each token's K experts' weights gathered and applied with one bmm: static shapes, no host sync),
  which dynamo traces. The eager path is the reference.
- Speculative decoding with the model's own MTP modules lives in `nanoseek.speculative`; sampling, stop
  strings and streaming text in `nanoseek.sampling`.

Legend: B batch, P (padded) prompt length, T new tokens in a forward, V vocabulary, d hidden size.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import NanoseekError
from .sampling import SamplingParams, TextStream, sample

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GREEDY_CHUNK = 4  # greedy decode steps per call of the compiled engine (see `Engine._greedy_chunk_eager`)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise NanoseekError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return dtype


@dataclass
class Generation:
    """The result of `Engine.generate` (one entry per prompt in the list fields)."""

    tokens: list[list[int]]  # generated ids (an EOS that ended a row is included)
    texts: list[str] | None  # decoded generated text, stop string excluded (None without a tokenizer)
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    prompt_tokens: list[int]
    prefill_s: float
    decode_s: float
    main_forwards: int  # forwards of the main model, the prefill included
    kv_cache_bytes_per_token: int  # per batch row, summed over the layers whose cache was used
    acceptance_rate: float | None = None  # speculative only: accepted drafts / proposed drafts
    acceptance_per_position: list[float] | None = None  # P(draft j accepted) per speculative step
    tokens_per_forward: float = 1.0  # tokens committed per main-model decode forward
    extra: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second of wall time, prefill included."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one, per second of decoding (prefill excluded)."""
        return (self.new_tokens - len(self.tokens)) / max(self.decode_s, 1e-9)

    def to_dict(self) -> dict:
        return {
            "text": self.texts[0] if self.texts and len(self.texts) == 1 else self.texts,
            "tokens": self.tokens[0] if len(self.tokens) == 1 else self.tokens,
            "finish_reason": self.finish_reasons[0] if len(self.finish_reasons) == 1 else self.finish_reasons,
            "prompt_tokens": self.prompt_tokens[0] if len(self.prompt_tokens) == 1 else self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "prefill_s": round(self.prefill_s, 5),
            "decode_s": round(self.decode_s, 5),
            "main_forwards": self.main_forwards,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "acceptance_rate": None if self.acceptance_rate is None else round(self.acceptance_rate, 4),
            "acceptance_per_position": (
                None if self.acceptance_per_position is None else [round(a, 4) for a in self.acceptance_per_position]
            ),
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
            **self.extra,
        }


class RowOutput:
    """Collects the generated ids of one row and decides when it is finished (EOS, stop string, length)."""

    def __init__(self, max_new: int, eos_id: int | None, tokenizer=None, stop: Sequence[str] = (), on_text=None):
        self.max_new, self.eos_id = max_new, eos_id
        self.tokens: list[int] = []
        self.stream = TextStream(tokenizer.decode, stop) if tokenizer is not None else None
        self.on_text = on_text
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, tok: int) -> bool:
        """Append one generated id; True once the row is finished (later ids are ignored)."""
        if self.done:
            return True
        self.tokens.append(tok)
        if tok == self.eos_id:
            self.finish_reason = "eos"
        elif self.stream is not None:
            self._emit(self.stream.push([tok]))
            if self.stream.stopped:
                self.finish_reason = "stop"
        if not self.done and len(self.tokens) >= self.max_new:
            self.finish_reason = "length"
        if self.done and self.stream is not None:
            self._emit(self.stream.finish())
        return self.done

    def _emit(self, text: str) -> None:
        if text and self.on_text is not None:
            self.on_text(text)

    @property
    def text(self) -> str | None:
        return self.stream.text if self.stream is not None else None


class DecodeState:
    """Caches and masking of one batch being decoded: the next write slot, and for left-padded batches the
    padding per row (`key_valid` [B, capacity], RoPE positions = slot - pad)."""

    def __init__(self, caches, pad: torch.Tensor | None, capacity: int):
        self.caches = caches
        self.pos = 0  # next cache slot to write
        self.pad = pad  # [B, 1] left padding per row, None when no row is padded
        self.key_valid = None
        if pad is not None:
            self.key_valid = torch.arange(capacity)[None, :] >= pad  # [B, capacity]

    def positions(self, T: int) -> torch.Tensor | None:
        if self.pad is None:
            return None
        return (torch.arange(self.pos, self.pos + T)[None, :] - self.pad).clamp_min(0)  # [B, T]


class Engine:
    def __init__(
        self,
        model,
        tokenizer=None,
        dtype: torch.dtype | str = torch.bfloat16,
        attn_impl: str = "absorb",
        max_len: int | None = None,
        compile: bool = False,
    ):
        dtype = _dtype(dtype)
        if model.cfg.attn_type == "mla":
            model.set_attn_impl(attn_impl)  # before any cache is made: the layout depends on it
        self.model = model.to(dtype).eval()  # the routing bias stays fp32 (Gate._apply)
        self.tokenizer = tokenizer
        self.dtype = dtype
        if max_len is not None and not 1 <= max_len <= model.cfg.max_position_embeddings:
            raise NanoseekError(
                f"max_len {max_len} must be in [1, max_position_embeddings = {model.cfg.max_position_embeddings}]"
            )
        self.max_len = max_len or model.cfg.max_position_embeddings
        self._limit_vocab(tokenizer)
        self.compiled = compile
        self._step, self.verify, self.draft = self._decode_eager, self._verify_eager, self._draft_eager
        self.greedy_step, self.greedy_chunk = self._greedy_step_eager, self._greedy_chunk_eager
        if compile:
            # cpp_wrapper: inductor calls its kernels from generated C++ instead of Python, which removes most of
            # the per-call Python overhead of a decode step (batch 1, 2 threads, interleaved: 789 -> 872 decode
            # tokens/s); the first compile takes longer (a C++ build)
            opts = {"cpp_wrapper": True} if next(model.parameters()).device.type == "cpu" else {}
            self._step, self.verify, self.draft, self.greedy_step, self.greedy_chunk = (
                torch.compile(fn, dynamic=True, options=opts)
                for fn in (self._step, self.verify, self.draft, self.greedy_step, self.greedy_chunk)
            )

    def _limit_vocab(self, tokenizer) -> None:
        """Never emit an id the tokenizer does not have. The head can have more rows than the tokenizer has ids
        (a BPE trained on a small corpus stops early; V3 pads 128k tokens to 129,280): those rows never saw a
        target, a weakly trained model's argmax can still land on them, and they decode to nothing. Their
        logits are -inf at every head (main and MTP), so greedy, sampling, drafts and verification all see the
        same restricted distribution; a hook on the heads reaches the compiled steps too. No tokenizer (id
        prompts): the whole vocabulary. An earlier engine's limit on the same model is replaced."""
        for handle in getattr(self.model, "_vocab_limit_hooks", ()):
            handle.remove()
        self.model._vocab_limit_hooks = []
        n, V = (tokenizer.vocab_size if tokenizer is not None else None), self.model.cfg.vocab_size
        if n is None or n >= V:
            return
        beyond = torch.arange(V) >= n  # [V]

        def mask(_module, _inputs, logits):
            return logits.masked_fill(beyond.to(logits.device), float("-inf"))

        heads = [self.model.lm_head, *(layer.shared_head.head for layer in self.model.mtp)]
        for head in {id(h): h for h in heads if h is not None}.values():
            self.model._vocab_limit_hooks.append(head.register_forward_hook(mask))

    @classmethod
    def load(
        cls,
        path: str | Path,
        tokenizer: str | Path | None = None,
        dtype: torch.dtype | str = torch.bfloat16,
        attn_impl: str = "absorb",
        compile: bool = False,
    ) -> Engine:
        """An engine for a run, checkpoint or HF directory; `tokenizer` overrides the directory's own."""
        from .checkpoint import load_model

        dtype = _dtype(dtype)
        model, tok = load_model(path, dtype=dtype, attn_impl=attn_impl)
        if tokenizer is not None:
            from .tokenizer import Tokenizer

            tok = Tokenizer.from_file(tokenizer)
        return cls(model, tok, dtype=dtype, attn_impl=attn_impl, compile=compile)

    # --- low level: prefill and one decode step ----------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise NanoseekError("a text prompt needs a tokenizer (pass --tokenizer PATH)")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise NanoseekError("the prompt is empty: give at least one token")
        if prompt_len + max_new_tokens > self.max_len:
            raise NanoseekError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                f"{prompt_len + max_new_tokens} exceeds the maximum length {self.max_len}"
            )

    def start(self, prompts: Sequence[Sequence[int]], capacity: int, mtp: bool = False):
        """Left-pad the prompts: (tokens [B, P], DecodeState with caches of `capacity` slots).

        The MTP blocks' caches are allocated only when `mtp` (speculative decoding) needs them."""
        lens = [len(p) for p in prompts]
        P = max(lens)
        tokens = torch.zeros(len(prompts), P, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        caches = self.model.make_caches(len(prompts), capacity, self.dtype, mtp=mtp)
        pad = None
        if min(lens) != P:
            pad = torch.tensor([P - n for n in lens])[:, None]
        return tokens, DecodeState(caches, pad, capacity)

    def forward(self, tokens: torch.Tensor, st: DecodeState, last_only: bool = True):
        """Run tokens [B, T] at the state's next slots: (hidden [B, T, d], logits [B, T or 1, V])."""
        h = self.model.hidden(
            tokens, start_pos=st.pos, caches=st.caches, positions=st.positions(tokens.shape[1]), key_valid=st.key_valid
        )
        st.pos += tokens.shape[1]
        return h, self.model.logits(h[:, -1:] if last_only else h)

    def _decode_eager(self, tokens, start_pos: int, caches, positions, key_valid) -> torch.Tensor:
        logits = self.model(tokens, start_pos=start_pos, caches=caches, positions=positions, key_valid=key_valid)
        return logits[:, -1]

    # the two forwards of a speculative step (compiled with the decode step when `compile`)
    def _verify_eager(self, tokens, start_pos: int, caches) -> tuple[torch.Tensor, torch.Tensor]:
        """Main model over tokens [1, T] at slots start_pos.. -> (hidden [1, T, d], logits [1, T, V])."""
        h = self.model.hidden(tokens, start_pos=start_pos, caches=caches)
        return h, self.model.logits(h)

    def _draft_eager(self, depth: int, h_prev, tokens, start_pos: int, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` over (h_prev [1, T, d], tokens [1, T]) -> (h [1, T, d], last logits [1, V])."""
        h = self.model.mtp_step(depth, h_prev, tokens, start_pos=start_pos, cache=cache)
        return h, self.model.mtp_logits_from_hidden(depth, h[:, -1])

    def _greedy_step_eager(self, tokens, start_pos: int, caches, mtp_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole greedy speculative step in one call: the main model over tokens [1, T] = [t_N, d_1..] at
        slots start_pos.., then MTP depth 0 over the same slots fed with the main model's own argmaxes.
        -> (ids [2, T]: row 0 the main argmax at each slot, row 1 depth 0's draft from there; h^1 [1, T, d]).

        Why this is exact: if the first a drafts are accepted, the committed tokens after slot N+j (j <= a) are
        the main argmaxes, so depth 0's entries at those slots are the final ones and its output at slot N+a is
        the next step's first draft. Entries past N+a are rewritten by the next step."""
        h = self.model.hidden(tokens, start_pos=start_pos, caches=caches)
        target = self.model.logits(h).argmax(dim=-1)  # [1, T]
        g = self.model.mtp_step(0, h, target, start_pos=start_pos, cache=mtp_cache)
        draft = self.model.mtp_logits_from_hidden(0, g).argmax(dim=-1)  # [1, T]
        return torch.cat([target, draft]), g

    def _greedy_chunk_eager(self, tokens, start_pos: int, caches, positions, key_valid) -> torch.Tensor:
        """GREEDY_CHUNK greedy decode steps in one call: the last ids [B] -> the next ids [B, GREEDY_CHUNK].

        Compiled, this is one graph for several tokens, so the per-call costs of a compiled step (dynamo's
        guards, flattening ~100 parameter and cache tensors, the host sync) are paid once per chunk rather
        than per token. A row that ends inside a chunk (EOS, stop string) ignores the rest of it; the extra
        cache writes land in slots nobody reads."""
        out = []
        for i in range(GREEDY_CHUNK):
            pos = None if positions is None else positions + i
            logits = self._decode_eager(tokens[:, None], start_pos + i, caches, pos, key_valid)
            tokens = logits.argmax(dim=-1)
            out.append(tokens)
        return torch.stack(out, dim=1)

    def decode(self, tokens: torch.Tensor, st: DecodeState) -> torch.Tensor:
        """One step: the last sampled ids [B] -> next-token logits [B, V]."""
        logits = self._step(tokens[:, None], st.pos, st.caches, st.positions(1), st.key_valid)
        st.pos += 1
        return logits

    # --- generation ----------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]] | str,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[int, str], None] | None = None,
        speculative: int = 0,
        ignore_eos: bool = False,
    ) -> Generation:
        """Generate for one prompt (a string or a list of ids) or a batch of them.

        `speculative=k` drafts k tokens per step with the model's MTP modules (batch 1 only).
        `on_text(row, text)` receives streamed text as it becomes printable (needs a tokenizer)."""
        if hasattr(prompts, "tolist"):  # a tensor or numpy array: [P] ids, or [B, P] (equal-length prompts)
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        ids = [self.encode(p) for p in prompts]
        if not ids:
            raise NanoseekError("no prompt given")
        if max_new_tokens < 1:
            raise NanoseekError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for p in ids:
            self.check_length(len(p), max_new_tokens)
        vocab = self.model.cfg.vocab_size
        if any(t < 0 or t >= vocab for p in ids for t in p):
            raise NanoseekError(f"prompt token ids must be in [0, {vocab})")
        if stop and self.tokenizer is None:
            raise NanoseekError("stop strings need a tokenizer")
        sampling = sampling or SamplingParams()
        eos = None if ignore_eos or self.tokenizer is None else self.tokenizer.eos_id
        rows = [
            RowOutput(
                max_new_tokens,
                eos,
                self.tokenizer,
                stop,
                (lambda text, i=i: on_text(i, text)) if on_text is not None else None,
            )
            for i in range(len(ids))
        ]
        with torch.inference_mode():
            if speculative:
                if len(ids) != 1:
                    raise NanoseekError("speculative decoding supports one prompt at a time (batch 1)")
                from .speculative import speculative_generate

                return speculative_generate(self, ids[0], max_new_tokens, speculative, sampling, rows[0])
            return self._generate_plain(ids, max_new_tokens, sampling, rows)

    def _generate_plain(self, ids, max_new_tokens, sampling, rows) -> Generation:
        gen = None if sampling.greedy else [sampling.generator(i) for i in range(len(ids))]  # one per row
        t0 = time.perf_counter()
        tokens, st = self.start(ids, capacity=max(len(p) for p in ids) + max_new_tokens)
        _, logits = self.forward(tokens, st)
        tok = sample(logits[:, -1], sampling, gen)  # [B]
        done = [r.add(t) for r, t in zip(rows, tok.tolist(), strict=True)]
        t1 = time.perf_counter()
        forwards = 1
        chunk = GREEDY_CHUNK if self.compiled and sampling.greedy else 1
        while not all(done):
            if chunk > 1 and max_new_tokens - forwards >= chunk:  # `forwards - 1` decode steps made so far
                nxt = self.greedy_chunk(tok, st.pos, st.caches, st.positions(1), st.key_valid)  # [B, chunk]
                st.pos += chunk
                forwards += chunk
                for step in zip(*nxt.tolist()):  # the one host sync per chunk
                    done = [r.add(t) for r, t in zip(rows, step, strict=True)]
                tok = nxt[:, -1]
                continue
            tok = sample(self.decode(tok, st), sampling, gen)
            forwards += 1
            done = [r.add(t) for r, t in zip(rows, tok.tolist(), strict=True)]  # the one host sync per step
        t2 = time.perf_counter()
        return Generation(
            tokens=[r.tokens for r in rows],
            texts=[r.text for r in rows] if self.tokenizer is not None else None,
            finish_reasons=[r.finish_reason for r in rows],
            prompt_tokens=[len(p) for p in ids],
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            main_forwards=forwards,
            kv_cache_bytes_per_token=sum(c.bytes_per_token() for c in st.caches),
        )
