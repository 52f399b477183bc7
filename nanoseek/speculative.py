"""Self-speculative decoding with the model's own multi-token-prediction (MTP) modules (V3 §5.4.3).

Each step drafts k tokens cheaply with the MTP module(s), then the main model checks all of them in ONE
forward over [last token, d_1 .. d_k]. Accepted drafts plus one token from the main model (the correction at
the first rejection, or a bonus token when every draft was accepted) are committed, so a step yields 1 to
k+1 tokens for one main-model forward.

Drafting. MTP depth j (0-based) at position i reads (h^{j}_i, t_{i+j+1}) and predicts t_{i+j+2}, where h^0 is
the main model's last hidden state. With committed tokens t_0..t_N (t_N not yet fed to the main model), depth j
at position N-1 proposes d_{j+1} = t_{N+j+1}. Each depth first re-reads every position whose MTP cache entry is
not final yet (entries computed from a draft token, or new positions), in one forward, so that after any
rejection the MTP caches hold exactly what an MTP pass over the committed text would hold. With k > D
(more drafts than modules) the last module is chained one position further, its own output standing in for
the main model's hidden state (as vLLM does); those cache entries are overwritten by the next step.

Rolling back is free: caches are written at explicit slots, so rejected slots are simply written again by
the next forward, and attention never reads past the slots written in that forward.

Acceptance (Leviathan et al. 2023; Chen et al. 2023). p = the main model's distribution, q = the draft's,
both after temperature / top-k / top-p. Accept d ~ q with probability min(1, p(d)/q(d)); on the first
rejection sample from norm(max(0, p - q)) and stop; if all k are accepted sample a bonus token from p.
The committed tokens are then distributed exactly as if sampled from p token by token. Greedy decoding
accepts d iff it equals the main model's argmax, so the output equals plain greedy decoding.

Greedy with one depth (k = 1, or V3's single module chained for k > 1) takes a shorter loop: one model call
per step verifies the drafts AND runs depth 0 over the same slots on the main model's argmaxes, which are the
committed tokens wherever drafts are accepted, so the next first draft comes out of the same call
(`_greedy_one_depth`). The general loop is the reference for sampling and for several depths.

Batch 1 only: rows of a batch would accept different numbers of drafts and their caches would drift apart.
(The model's key_valid masking could express that as per-row holes in a shared cache; not done here.)
"""

from __future__ import annotations

import time

import torch

from .engine import Generation, RowOutput
from .errors import NanoseekError
from .sampling import SamplingParams, draw, probs


def leading_matches(drafts: list[int], target: list[int]) -> int:
    """Greedy acceptance: how many drafts, from the first, equal the main model's argmax at their slot."""
    a = 0
    while a < len(drafts) and drafts[a] == target[a]:
        a += 1
    return a


def accept_drafts(
    logits: torch.Tensor,
    drafts: list[int],
    q: list[torch.Tensor] | None,
    params: SamplingParams,
    gen: torch.Generator | None,
) -> tuple[int, int]:
    """Main-model logits [k+1, V] at [last, d_1..d_k], the drafts and their distributions q (k x [V]; None
    when greedy) -> (number of accepted drafts a, the token committed after them)."""
    k = len(drafts)
    if params.greedy:
        target = logits.argmax(dim=-1).tolist()
        a = leading_matches(drafts, target)
        return a, target[a]
    p = probs(logits, params)  # [k+1, V]
    for j, d in enumerate(drafts):
        # accept with probability min(1, p/q): u < p(d)/q(d), written without the division (q(d) > 0)
        if torch.rand((), generator=gen) * q[j][d] < p[j, d]:
            continue
        residual = (p[j] - q[j]).clamp_min(0)  # rejected: resample from what p has beyond q
        total = residual.sum()
        residual = residual / total if total > 0 else p[j]  # total = 0 only if p == q up to rounding
        return j, int(draw(residual, gen))
    return k, int(draw(p[k], gen))  # every draft accepted: a bonus token from the main model


def speculative_generate(
    engine,
    prompt: list[int],
    max_new_tokens: int,
    k: int,
    params: SamplingParams,
    out: RowOutput,
    caches: list | None = None,
) -> Generation:
    """Generate for one prompt, drafting k tokens per step. `caches` (from `model.make_caches`, main layers
    then MTP layers) may be passed in to inspect them afterwards."""
    model = engine.model
    model.require_mtp()
    if not 1 <= k <= max_new_tokens:  # more drafts than tokens to generate only costs memory (caches hold k more)
        raise NanoseekError(f"--draft-tokens must be in [1, --max-new-tokens = {max_new_tokens}], got {k}")
    L, D = model.cfg.num_hidden_layers, len(model.mtp)
    depths = min(k, D)  # MTP modules used as such; drafts beyond D chain the last one
    P = len(prompt)
    if caches is None:
        caches = model.make_caches(1, P + max_new_tokens + k + 1, engine.dtype)
    main, mtp = caches[:L], caches[L:]
    gen = None if params.greedy else params.generator()

    def propose(logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if params.greedy:
            return int(logits.argmax()), None
        q = probs(logits, params)
        return int(draw(q, gen)), q

    if params.greedy and depths == 1:
        return _greedy_one_depth(engine, prompt, k, out, main, mtp[0], used_caches=caches[: L + 1])

    t0 = time.perf_counter()
    h = model.hidden(torch.tensor([prompt]), caches=main)  # [1, P, d]
    first = propose(model.logits(h[:, -1])[0])[0]  # from the main model: propose == sample here
    seq = [*prompt, first]  # committed tokens; seq[:N] are in the main cache, seq[N] is pending
    N = P
    h_tail, tail_at = h, 0  # main hidden states of positions [tail_at, N), what the MTP pass re-reads
    done = out.add(first)
    t1 = time.perf_counter()
    steps, committed = 0, 0
    accepted = [0] * k
    while not done:
        # 1) draft: depth j re-reads positions [tail_at, N) with tokens shifted by j+1, then proposes d_{j+1}
        drafts: list[int] = []
        qs: list[torch.Tensor | None] = []
        x = h_tail
        for j in range(depths):
            toks = torch.tensor([(seq + drafts)[tail_at + j + 1 : N + j + 1]])
            x, logits = engine.draft(j, x, toks, tail_at, mtp[j])
            d, q = propose(logits[0])
            drafts.append(d)
            qs.append(q)
        x = x[:, -1:]
        for m in range(D, k):  # more drafts than modules: chain the last module at positions N, N+1, ...
            x, logits = engine.draft(D - 1, x, torch.tensor([[drafts[-1]]]), N + m - D, mtp[D - 1])
            d, q = propose(logits[0])
            drafts.append(d)
            qs.append(q)

        # 2) verify all drafts with one main-model forward over [t_N, d_1 .. d_k] at slots N .. N+k
        hv, logits = engine.verify(torch.tensor([[seq[N], *drafts]]), N, main)
        a, nxt = accept_drafts(logits[0], drafts, qs, params, gen)
        steps += 1
        for j in range(a):
            accepted[j] += 1

        # 3) commit. Main slots N+a+1.. hold rejected drafts: they are overwritten by the next forward.
        # The next MTP pass restarts where an entry of the deepest module used a draft token.
        new_at = max(0, N - (depths - 1))
        h_tail = torch.cat([h_tail[:, new_at - tail_at :], hv[:, : a + 1]], dim=1)
        tail_at = new_at
        new = [*drafts[:a], nxt]
        seq += new
        N += a + 1
        committed, done = _commit(out, new, committed)
    t2 = time.perf_counter()
    return _result(engine, out, P, t1 - t0, t2 - t1, steps, committed, accepted, caches[: L + depths])


def _commit(out: RowOutput, new: list[int], committed: int) -> tuple[int, bool]:
    """Add a step's tokens to the output until it finishes; (tokens kept so far, finished). Tokens past the end
    (max_new_tokens, EOS, a stop string) are dropped, so they do not count in tokens_per_forward."""
    for t in new:
        committed += 1
        if out.add(t):
            return committed, True
    return committed, False


def _result(engine, out: RowOutput, P: int, prefill_s, decode_s, steps, committed, accepted, caches) -> Generation:
    k = len(accepted)
    return Generation(
        tokens=[out.tokens],
        texts=[out.text] if engine.tokenizer is not None else None,
        finish_reasons=[out.finish_reason],
        prompt_tokens=[P],
        prefill_s=prefill_s,
        decode_s=decode_s,
        main_forwards=1 + steps,
        kv_cache_bytes_per_token=sum(c.bytes_per_token() for c in caches),
        # no speculative step (the first token ended it): nothing was proposed, so no rate
        acceptance_rate=sum(accepted) / (k * steps) if steps else None,
        acceptance_per_position=[a / steps for a in accepted] if steps else None,
        tokens_per_forward=committed / steps if steps else 1.0,
        extra={"draft_tokens": k, "speculative_steps": steps},
    )


def _greedy_one_depth(engine, prompt: list[int], k: int, out: RowOutput, main, mtp0, used_caches) -> Generation:
    """Greedy decoding when only MTP depth 0 is used as such (k = 1, or V3's single module chained for k > 1):
    one model call per step (`Engine.greedy_step`: verify + the next first draft) and, for k = 1, one host sync.

    The general loop above needs a draft call and a verify call per step, the draft re-reading the accepted
    positions; here depth 0 runs inside the verify call on the main model's argmaxes, which are the committed
    tokens wherever drafts were accepted (see `Engine._greedy_step_eager`). Drafts 2..k chain depth 0 from
    its output at the last accepted slot, one extra call each, writing slots the next step rewrites."""
    model = engine.model
    P = len(prompt)
    t0 = time.perf_counter()
    h = model.hidden(torch.tensor([prompt]), caches=main)  # [1, P, d]
    first = int(model.logits(h[:, -1]).argmax())
    # depth 0 over the prompt: position i reads (h_i, t_{i+1}); its last output proposes t_{P+1}
    g = model.mtp_step(0, h, torch.tensor([[*prompt[1:], first]]), cache=mtp0)[:, -1:]
    drafts = [int(model.mtp_logits_from_hidden(0, g[:, -1]).argmax())]
    N, pending = P, first  # slots [0, N) are final in both caches; `pending` = t_N is committed but not fed
    done = out.add(first)
    steps, committed = 0, 0
    accepted = [0] * k
    t1 = time.perf_counter()
    while not done:
        for m in range(1, k):  # chain depth 0 beyond its own slot: draft m+1 at slot N + m - 1
            g, logits = engine.draft(0, g, torch.tensor([[drafts[-1]]]), N + m - 1, mtp0)
            drafts.append(int(logits[0].argmax()))
        ids, g_all = engine.greedy_step(torch.tensor([[pending, *drafts]]), N, main, mtp0)
        target, proposed = ids.tolist()  # the one host sync of a step
        a = leading_matches(drafts, target)
        steps += 1
        for j in range(a):
            accepted[j] += 1
        committed, done = _commit(out, target[: a + 1], committed)
        N, pending = N + a + 1, target[a]
        drafts, g = [proposed[a]], g_all[:, a : a + 1]
    t2 = time.perf_counter()
    return _result(engine, out, P, t1 - t0, t2 - t1, steps, committed, accepted, used_caches)
