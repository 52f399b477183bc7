"""Token sampling, stop conditions and streaming text for `nanoseek.engine`.

- `SamplingParams`: greedy (temperature 0) or temperature / top-k / top-p sampling with an optional seed.
  Any finite temperature > 0 samples: logits are scaled in float64 with their maximum subtracted first, so a
  tiny one (even 1e-300) cannot overflow; it tends to greedy, with exact ties shared.
- `probs(logits, params)`: the exact distribution a token is drawn from after temperature, top-k and top-p.
  Speculative decoding needs this distribution itself (not just a sample) for its acceptance rule.
- `TextStream`: incremental detokenisation. Byte-level BPE splits multi-byte characters over several
  tokens, and some tokenizers change how a token prints depending on its neighbours, so the new text of a
  step is `decode(window + new) - decode(window)` over a short window of recent ids, and nothing is emitted
  while the decoded tail is an incomplete UTF-8 sequence (U+FFFD). Text that could be the start of a stop
  string is held back until it is known not to be one, so a stop string never reaches the screen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import NanoseekError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise NanoseekError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise NanoseekError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k < 0:
            raise NanoseekError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise NanoseekError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, row: int = 0) -> torch.Generator:
        """The generator of batch row `row`, seeded with seed + row: a row's tokens then depend only on its own
        prompt and index (row i decodes as its prompt alone with seed + i), never on the other rows."""
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed + row)
        else:
            g.seed()
        return g


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> fp32 probabilities [..., V] after temperature, top-k and top-p (not for greedy)."""
    # float64 and max subtracted: (x - max) / T is <= 0 and never NaN for any T > 0 (a float32 T may round to 0)
    x = logits.double()
    x = (x - x.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = x.topk(params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = x.softmax(dim=-1)
    if params.top_p < 1.0:
        sp, order = p.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the first one is always kept)
        drop = (sp.cumsum(dim=-1) - sp) >= params.top_p
        p = p.scatter(-1, order, sp.masked_fill(drop, 0.0))
        p = p / p.sum(dim=-1, keepdim=True)
    return p.float()


def draw(p: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of p [..., V] -> ids [...]; with a list of generators, row i draws from generator i."""
    flat = p.reshape(-1, p.shape[-1])
    if isinstance(generator, torch.Generator):
        return torch.multinomial(flat, 1, generator=generator).view(p.shape[:-1])
    if len(generator) != len(flat):
        raise ValueError(f"{len(generator)} generators for {len(flat)} rows")
    return torch.cat([torch.multinomial(r[None], 1, generator=g) for r, g in zip(flat, generator)]).view(p.shape[:-1])


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | Sequence[torch.Generator] | None
) -> torch.Tensor:
    """logits [..., V] -> token ids [...] (argmax when greedy)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return draw(probs(logits, params), generator)


class TextStream:
    """Turns the ids of one sequence into text as they arrive; see the module docstring.

    `push(ids)` returns the newly printable text; `finish()` returns what was held back. `text` is everything
    emitted so far (stop string excluded) and `stopped` says whether a stop string was found.
    """

    WINDOW = 6  # ids of left context re-decoded with the new ones

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_at = 0  # ids[prefix_at:read_at] is the context window, already turned into text
        self.read_at = 0
        self.pending = ""  # decoded but not yet emitted (may be the start of a stop string)
        self.text = ""
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        before = self.decode(self.ids[self.prefix_at : self.read_at])
        after = self.decode(self.ids[self.prefix_at :])
        if after.endswith("\ufffd") or not after.startswith(before):
            return ""  # an incomplete character: wait for the next token
        self.pending += after[len(before) :]
        self.prefix_at = max(self.read_at, len(self.ids) - self.WINDOW)
        self.read_at = len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush everything held back (an incomplete trailing character is printed as U+FFFD)."""
        if not self.stopped and self.read_at < len(self.ids):
            before = self.decode(self.ids[self.prefix_at : self.read_at])
            self.pending += self.decode(self.ids[self.prefix_at :])[len(before) :]
            self.read_at = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # Emitted text never ends with the start of a stop string (that part is held back in `pending`), so
        # a stop string, if any, lies entirely inside `pending`.
        hits = [i for s in self.stop if (i := self.pending.find(s)) >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending, self.stopped = "", True
        else:
            keep = 0 if final else min(self._partial_stop_len(self.text + self.pending), len(self.pending))
            out = self.pending[: len(self.pending) - keep]
            self.pending = self.pending[len(out) :]
        self.text += out
        return out

    def _partial_stop_len(self, s: str) -> int:
        """Length of the longest suffix of s that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(s)), best, -1):
                if s.endswith(stop[:n]):
                    best = n
                    break
        return best
