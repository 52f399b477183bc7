"""`nanoseek generate`: text generation from a nanoseek run/checkpoint directory or an HF-format directory.

    nanoseek generate --model runs/tiny --prompt "def main(" --max-new-tokens 64
    nanoseek generate --model runs/tiny --prompt "import os" --speculative mtp --draft-tokens 2 --json
    nanoseek generate --model runs/tiny --chat

Text streams to stdout as it is generated (a summary line goes to stderr); `--json` prints one JSON object
instead, last. Several `--prompt`s are decoded as one batch (printed at the end, not streamed; `--json` gives
per-prompt lists; not with `--speculative`). `--chat` reads prompts from stdin, one per line (a `--prompt` is
the first turn), and keeps the conversation: each turn's prompt is the whole conversation so far (plain
concatenation, no chat template; each turn and reply ends with a newline, as on the screen; the oldest tokens
are dropped when it would not fit the context). Prompts must be valid UTF-8; anything else is an error, not a
guess.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from .cli import set_threads
from .errors import NanoseekError


def add_cli(sub) -> None:
    p = sub.add_parser("generate", help="generate text (latent KV cache, sampling, MTP speculative decoding)")
    p.add_argument("--model", required=True, help="run dir, checkpoint dir or HF-format dir (FP8 included)")
    p.add_argument("--tokenizer", help="tokenizer.json, or a directory with one (needed when the model dir has none)")
    p.add_argument(
        "--prompt",
        action="append",
        help="prompt text, UTF-8 ('-' reads it from stdin; invalid UTF-8 is an error). Repeat it for a batch "
        "(no streaming, no --speculative; --json gives per-prompt lists); with --chat, the first turn",
    )
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); finite, >= 0")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, help="seed of the sampler (reproducible output)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    g = p.add_argument_group("engine")
    g.add_argument("--speculative", choices=["mtp", "none"], default="none", help="draft with the MTP module(s)")
    g.add_argument(
        "--draft-tokens",
        type=int,
        help="with --speculative mtp: tokens drafted per step, 1..--max-new-tokens (default 1; > D chains the last)",
    )
    g.add_argument("--attn-impl", choices=["absorb", "naive"], default="absorb", help="absorb = latent KV cache")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    g.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object (no streaming)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="interactive: read prompts from stdin, one per line, keep the conversation (--prompt: the first turn)",
    )
    p.set_defaults(func=run)


def _utf8(text: str | bytes, what: str) -> str:
    """`text` as str, or a one-line error: invalid UTF-8 reaches us as bytes, or in argv as lone surrogates."""
    try:
        if isinstance(text, bytes):
            return text.decode()
        text.encode()
        return text
    except UnicodeError as e:
        raise NanoseekError(f"{what} is not valid UTF-8 (at position {e.start}); re-encode it as UTF-8") from None


def _stdin(what: str, line: bool = False) -> str:
    f = getattr(sys.stdin, "buffer", sys.stdin)  # bytes where there are: decoded (and checked) here
    return _utf8(f.readline() if line else f.read(), what)


def run(args: argparse.Namespace) -> None:
    from .engine import Engine
    from .sampling import SamplingParams

    prompts = args.prompt or []
    set_threads(args.threads)
    if args.max_new_tokens < 1:
        raise NanoseekError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.chat and not prompts:
        raise NanoseekError("give --prompt TEXT (or --chat)")
    if args.chat and (len(prompts) > 1 or "-" in prompts):
        raise NanoseekError("--chat reads its turns from stdin: give at most one --prompt (the first turn), not '-'")
    if prompts.count("-") > 1:
        raise NanoseekError("--prompt - (stdin) can be given once")
    if len(prompts) > 1 and args.speculative == "mtp":
        raise NanoseekError("--speculative mtp decodes one prompt at a time: give a single --prompt")
    if args.draft_tokens is not None and args.speculative != "mtp":
        raise NanoseekError("--draft-tokens applies to --speculative mtp only")
    k = (1 if args.draft_tokens is None else args.draft_tokens) if args.speculative == "mtp" else 0
    if args.speculative == "mtp" and not 1 <= k <= args.max_new_tokens:
        raise NanoseekError(f"--draft-tokens must be in [1, --max-new-tokens = {args.max_new_tokens}], got {k}")
    prompts = [_stdin("the prompt on stdin") if p == "-" else _utf8(p, "--prompt") for p in prompts]
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    engine = Engine.load(args.model, args.tokenizer, dtype=args.dtype, attn_impl=args.attn_impl, compile=args.compile)
    if engine.tokenizer is None:
        raise NanoseekError(f"{args.model} has no tokenizer.json: pass --tokenizer PATH")
    from .tokenizer import check_vocab_fits

    check_vocab_fits(engine.tokenizer, engine.model.cfg.vocab_size, engine.tokenizer.source)
    lost = engine.tokenizer.round_trip_loss()
    if lost:
        print(f"note: tokenizer {engine.tokenizer.source} is lossy ({lost}): prompts may lose text", file=sys.stderr)
    if k:
        engine.model.require_mtp()
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop, speculative=k)
    kw["ignore_eos"] = args.ignore_eos

    def stream(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if not args.chat:
        batch = len(prompts) > 1  # not streamed: rows finish in any order
        res = engine.generate(prompts if batch else prompts[0], on_text=None if args.json or batch else stream, **kw)
        if batch and not args.json:
            for i, text in enumerate(res.texts):
                print(f"=== prompt {i + 1} ===\n{text}")
        _report(res, args, engine)
        return

    history: list[int] = []
    room = engine.max_len - args.max_new_tokens
    if room < 1:
        raise NanoseekError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt")
    for turn in itertools.count(1):
        if prompts:
            line = prompts.pop()  # --prompt: the first turn
        else:
            if sys.stdin.isatty():
                print("> ", end="", file=sys.stderr, flush=True)
            line = _stdin(f"chat turn {turn}", line=True)
            if not line:
                break
        history += engine.tokenizer.encode(line if line.endswith("\n") else line + "\n")
        history = history[-room:]
        res = engine.generate(history, on_text=None if args.json else stream, **kw)
        history += [t for t in res.tokens[0] if t != engine.tokenizer.eos_id]
        if not res.texts[0].endswith("\n"):  # the screen ends the reply's line: so does what the model reads
            history += engine.tokenizer.encode("\n")
        _report(res, args, engine)


def _report(res, args, engine) -> None:
    d = res.to_dict()
    d.update(
        model=str(args.model),
        dtype=args.dtype,
        attn_impl=args.attn_impl,
        speculative=args.speculative,
        compile=args.compile,
    )
    if args.json:
        print(json.dumps(d), flush=True)
        return
    if len(res.tokens) == 1:
        print(flush=True)  # end the streamed line (a batch was printed line by line)
    spec = ""
    if res.acceptance_rate is not None:
        per = ", ".join(f"{a:.2f}" for a in res.acceptance_per_position)
        spec = f", acceptance {res.acceptance_rate:.2f} [{per}], {res.tokens_per_forward:.2f} tokens/forward"
    elif args.speculative == "mtp":
        spec = ", acceptance n/a (no speculative step)"
    print(
        f"[{res.new_tokens} tokens ({'/'.join(res.finish_reasons)}), {res.tokens_per_s:.1f} tok/s, "
        f"prefill {res.prefill_s * 1e3:.1f} ms{spec}, KV cache {res.kv_cache_bytes_per_token} B/token]",
        file=sys.stderr,
        flush=True,
    )
