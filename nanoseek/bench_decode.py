"""Decode benchmark: our engine vs transformers' `generate` on the same weights, and MTP speculative decoding.

    python -m nanoseek.bench_decode [--quick] [--model DIR] [--json]     (also `nanoseek bench decode`)

Arms (same prompts, prompt length and number of new tokens; greedy; EOS ignored so every arm makes the
same number of tokens):
- ours, plain decoding: bf16 and fp32, eager and `torch.compile`d (compiling is skipped in --quick: ~40 s
  per engine and shape), batch 1 and 8;
- ours, MTP speculative decoding (batch 1) with k = 1 and k = 2 drafts, on each of those engines;
- transformers `DeepseekV3ForCausalLM.generate(use_cache=True, do_sample=False)` on the same weights exported
  with `save_pretrained`, fp32 and bf16, batch 1 and 8.
Batch 1 means the 8 prompts decoded one after another (so that the acceptance rate pools ~8 x 70 drafts
rather than one prompt's ~70, whose standard error is ~5 points); batch 8 is one call over all of them.
tokens/s = generated tokens / wall time of the calls (prefill included). Arms are interleaved and each keeps
its best of R rounds, because other jobs share the machine and speeds drift.

Headlines, batch 1: `speedup_vs_transformers` is our fastest eager precision over transformers' fastest
(`arms_compared` names them), `speedup_vs_transformers_compiled` the same for our compiled engine; on a CPU
without AMX fp32 wins at `tiny`'s size (bf16 GEMMs carry a fixed ~20 us overhead there).
`speculative_speedup` is over plain decoding on the same engine: the default bf16 eager one, and per engine
in `speculative_speedup_by_engine`.

The model: `--model DIR`, else a `tiny` model trained with the default `nanoseek train --preset tiny` into
runs/bench-decode (reused when present; --quick trains a few steps into runs/bench-decode-quick). If the
training command is unavailable, a random model is used and the result says so (MTP acceptance is then
meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .cli import set_threads
from .errors import NanoseekError

GOAL_VS_TRANSFORMERS = 4.0
GOAL_SPECULATIVE = 1.5
GOAL_ACCEPTANCE = 0.8
DEFAULT_DIR, QUICK_DIR = Path("runs/bench-decode"), Path("runs/bench-decode-quick")
QUICK_TRAIN = ["--steps", "30", "--batch-size", "8", "--seq-len", "128", "--eval-every", "30", "--save-every", "30"]
QUICK_TRAIN += ["--eval-tokens", "4096"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _model_dir(model: str | None, quick: bool) -> tuple[Path | None, str]:
    """(model directory or None for a random model, how it was obtained)."""
    from .checkpoint import list_checkpoints

    if model:
        return Path(model), "given"
    run = QUICK_DIR if quick else DEFAULT_DIR
    if list_checkpoints(run):
        return run, f"cached run {run}"
    try:
        import nanoseek.train  # noqa: F401
    except ModuleNotFoundError:
        return None, "random (nanoseek train is not available)"
    cmd = [sys.executable, "-m", "nanoseek", "train", "--preset", "tiny", "--out", str(run), "--no-progress"]
    cmd += ["--threads", str(torch.get_num_threads())]  # the bench's --threads (set before this) applies here too
    cmd += QUICK_TRAIN if quick else []
    log(f"training the bench model: {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not list_checkpoints(run):
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise NanoseekError(f"training the bench model failed: {' | '.join(tail)}")
    return run, f"trained now ({time.perf_counter() - t0:.0f} s): nanoseek {' '.join(cmd[3:])}"


def _prompts(tok, vocab: int, n: int, length: int) -> list[list[int]]:
    """n prompts of exactly `length` tokens: Python source text when there is a tokenizer, else random ids."""
    if tok is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (n, length), generator=g).tolist()
    import inspect
    import json as json_mod

    ids = tok.encode(inspect.getsource(json_mod.decoder))
    step = max(1, (len(ids) - length) // n)
    return [ids[i * step : i * step + length] for i in range(n)]


def _best(results: dict, key: str, value: float) -> None:
    results[key] = max(results.get(key, 0.0), value)


def agreement(rows_a: list[list[int]], rows_b: list[list[int]]) -> float:
    """Fraction of rows x positions where two arms' greedy tokens agree, each row counted up to its first
    difference: after one differing token the two continuations condition on different text, so later matches
    say nothing about the kernels (rounded to 4 digits)."""
    same = total = 0
    for x, y in zip(rows_a, rows_b, strict=False):
        n = next((i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
        same, total = same + n, total + len(x)
    return round(same / max(total, 1), 4)


def run(
    quick: bool = False, out_dir: str | Path | None = None, model: str | None = None, compile: bool | None = None
) -> dict:
    from .checkpoint import load_model
    from .engine import Engine
    from .hf import save_pretrained

    prompt_len, new = (32, 32) if quick else (64, 128)
    rounds = 1 if quick else 3
    compile = (not quick) if compile is None else compile
    load0 = os.getloadavg()[0]
    path, origin = _model_dir(model, quick)

    def fresh(dtype: torch.dtype):
        if path is None:
            from .config import get_preset
            from .model import Transformer

            torch.manual_seed(0)
            return Transformer(get_preset("tiny")).to(dtype), None
        return load_model(path, dtype=dtype, attn_impl="absorb")

    base, tok = fresh(torch.float32)
    cfg = base.cfg
    prompts = _prompts(tok, cfg.vocab_size, 8, prompt_len)
    singles = prompts[:2] if quick else prompts  # the batch-1 arms decode these one after another
    engines = {
        "bf16": Engine(fresh(torch.bfloat16)[0], tok, dtype="bf16"),
        "fp32": Engine(base, tok, dtype="fp32"),
    }
    if compile:
        engines["compiled_bf16"] = Engine(fresh(torch.bfloat16)[0], tok, dtype="bf16", compile=True)
        engines["compiled_fp32"] = Engine(fresh(torch.float32)[0], tok, dtype="fp32", compile=True)
    has_mtp = len(engines["bf16"].model.mtp) > 0

    hf_models = {}
    try:
        import transformers
        from transformers import DeepseekV3ForCausalLM

        transformers.logging.set_verbosity_error()  # its load report lists the MTP layer it does not use
        transformers.utils.logging.disable_progress_bar()

        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(base, tmp, dtype=torch.float32)
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                hf_models[name] = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=dt).eval()
    except ImportError:
        log("transformers is not installed: no baseline")

    def ours(eng, B, k=0) -> Pooled:
        if B > 1:
            return Pooled([eng.generate(prompts[:B], max_new_tokens=new, speculative=k, ignore_eos=True)])
        return Pooled([eng.generate(p, max_new_tokens=new, speculative=k, ignore_eos=True) for p in singles])

    def theirs(m, B, groups: list | None = None) -> tuple[list, float]:
        rows, n, wall = [], 0, 0.0
        for group in groups or ([prompts[:B]] if B > 1 else [[p] for p in singles]):
            x = torch.tensor(group)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = m.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=0,
                )
            wall += time.perf_counter() - t0
            rows += out[:, x.shape[1] :].tolist()
            n += len(group) * new
        return rows, n / wall

    # warm-up (and compilation) outside the timed rounds
    for name, eng in engines.items():
        for B, k in ((1, 0), (8, 0), (1, 1), (1, 2)):
            if k and not has_mtp:
                continue
            t0 = time.perf_counter()
            eng.generate(prompts[:B], max_new_tokens=new, speculative=k, ignore_eos=True)
            if name.startswith("compiled"):
                what = f"speculative k={k}" if k else f"decode batch {B}"
                log(f"{name} ({what}) in {time.perf_counter() - t0:.0f} s")
    for m in hf_models.values():  # each shape it is timed at, as ours is (a --quick run times one round only)
        for B in (1, 8):
            theirs(m, B, [prompts[:B]])

    tps: dict[str, float] = {}
    decode_tps: dict[str, float] = {}
    spec: dict[tuple[str, int], Pooled] = {}
    tokens: dict[str, list] = {}
    for r in range(rounds):
        log(f"round {r + 1}/{rounds}")
        for name, eng in engines.items():
            for B in (1, 8):
                res = ours(eng, B)
                _best(tps, f"ours_{name}_b{B}", res.tokens_per_s)
                _best(decode_tps, f"ours_{name}_b{B}", res.decode_tokens_per_s)
                tokens[f"ours_{name}_b{B}"] = res.tokens
            for k in (1, 2) if has_mtp else ():
                res = ours(eng, 1, k)
                _best(tps, f"ours_{name}_speculative_k{k}_b1", res.tokens_per_s)
                spec[name, k] = res
                tokens[f"ours_{name}_speculative_k{k}_b1"] = res.tokens
        for name, m in hf_models.items():
            for B in (1, 8):
                toks, t = theirs(m, B)
                _best(tps, f"transformers_{name}_b{B}", t)
                tokens[f"transformers_{name}_b{B}"] = toks

    def ratio(a: str, b: str) -> float | None:
        return round(tps[a] / tps[b], 3) if a in tps and b in tps else None

    def best(names: list[str]) -> str | None:
        """The fastest of these arms (their key in tps), None when none ran."""
        have = [n for n in names if n in tps]
        return max(have, key=tps.get) if have else None

    def agree(a: str, b: str) -> float | None:
        return agreement(tokens[a], tokens[b]) if a in tokens and b in tokens else None

    theirs_best = best([f"transformers_{d}_b1" for d in ("fp32", "bf16")])
    eager_best = best([f"ours_{d}_b1" for d in ("fp32", "bf16")])
    compiled_best = best([f"ours_compiled_{d}_b1" for d in ("fp32", "bf16")])
    kv_bytes = engines["bf16"].generate(prompts[:1], max_new_tokens=1).kv_cache_bytes_per_token
    default = spec.get(("bf16", 1))
    result: dict = {
        "model": str(path) if path else "random tiny (untrained)",
        "model_origin": origin,
        "trained": path is not None,
        "mtp_modules": len(engines["bf16"].model.mtp),
        "quick": quick,
        "prompt_len": prompt_len,
        "new_tokens": new,
        "batch1_prompts": len(singles),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "loadavg_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "tokens_per_s": {k: round(v, 1) for k, v in sorted(tps.items())},
        "decode_tokens_per_s": {k: round(v, 1) for k, v in sorted(decode_tps.items())},
        # headline numbers (batch 1): each side's fastest precision, eager, and our compiled engine
        "speedup_vs_transformers": ratio(eager_best, theirs_best),
        "speedup_vs_transformers_compiled": ratio(compiled_best, theirs_best),
        "arms_compared": {"ours_eager": eager_best, "ours_compiled": compiled_best, "transformers": theirs_best},
        "speedup_vs_transformers_same_dtype": {
            f"{ours_name}_b{B}": ratio(f"ours_{ours_name}_b{B}", f"transformers_{ours_name.split('_')[-1]}_b{B}")
            for ours_name in engines
            for B in (1, 8)
        },
        # speculative over plain decoding of the same engine; the headline is the default engine (bf16, eager)
        "speculative_speedup": ratio("ours_bf16_speculative_k1_b1", "ours_bf16_b1"),
        "speculative_speedup_by_engine": {
            f"{name}_k{k}": ratio(f"ours_{name}_speculative_k{k}_b1", f"ours_{name}_b1")
            for name in engines
            for k in ((1, 2) if has_mtp else ())
        },
        "acceptance_rate": default.acceptance_rate if default else None,
        "tokens_per_forward": default.tokens_per_forward if default else None,
        "acceptance_rate_by_engine": {
            f"{n}_k{k}": g.acceptance_rate and round(g.acceptance_rate, 4) for (n, k), g in spec.items()
        },
        "acceptance_per_position_k2": spec["bf16", 2].acceptance_per_position if ("bf16", 2) in spec else None,
        "tokens_per_forward_k2": spec["bf16", 2].tokens_per_forward if ("bf16", 2) in spec else None,
        "kv_cache_bytes_per_token_bf16": kv_bytes,
        "greedy_agreement": {
            "ours_fp32_vs_transformers_fp32": agree("ours_fp32_b1", "transformers_fp32_b1"),
            "ours_fp32_b8_vs_transformers_fp32_b8": agree("ours_fp32_b8", "transformers_fp32_b8"),
            "speculative_k1_vs_plain_fp32": agree("ours_fp32_speculative_k1_b1", "ours_fp32_b1"),
            "speculative_k2_vs_plain_fp32": agree("ours_fp32_speculative_k2_b1", "ours_fp32_b1"),
            "speculative_k1_vs_plain_bf16": agree("ours_bf16_speculative_k1_b1", "ours_bf16_b1"),
            "compiled_vs_eager_fp32": agree("ours_compiled_fp32_b1", "ours_fp32_b1"),
            "compiled_vs_eager_bf16": agree("ours_compiled_bf16_b1", "ours_bf16_b1"),
        },
    }
    sp, acc = result["speculative_speedup"], result["acceptance_rate"]
    eager, compiled = result["speedup_vs_transformers"], result["speedup_vs_transformers_compiled"]
    by_engine = result["speculative_speedup_by_engine"]
    sp_best = max((v for k, v in by_engine.items() if v and k.endswith("k1")), default=None)
    # the bench suite's goal records: {goal, value, target, met}
    result["goals"] = [
        _goal(f"plain decoding vs transformers, batch 1, eager ({eager_best})", eager, GOAL_VS_TRANSFORMERS),
        _goal(f"plain decoding vs transformers, batch 1, compiled ({compiled_best})", compiled, GOAL_VS_TRANSFORMERS),
        _goal("MTP speculative (k=1) vs our plain decoding, batch 1 (bf16 eager engine)", sp, GOAL_SPECULATIVE),
        _goal("MTP speculative (k=1) vs plain decoding of the same engine, best engine", sp_best, GOAL_SPECULATIVE),
        _goal("MTP draft acceptance rate (k=1)", acc, GOAL_ACCEPTANCE, trained=path is not None),
    ]
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "bench_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


class Pooled:
    """Several `Generation`s (the batch-1 prompts decoded one after another) read as one: tokens/s over the
    total wall time, acceptance over all drafts proposed."""

    def __init__(self, gens: list):
        self.gens = gens
        self.tokens = [row for g in gens for row in g.tokens]
        n = sum(g.new_tokens for g in gens)
        self.tokens_per_s = n / sum(g.prefill_s + g.decode_s for g in gens)
        self.decode_tokens_per_s = (n - len(self.tokens)) / sum(g.decode_s for g in gens)
        steps = [g.extra.get("speculative_steps", 0) for g in gens]
        if not sum(steps):  # plain decoding, or no prompt got to a speculative step
            self.acceptance_rate = self.acceptance_per_position = self.tokens_per_forward = None
            return
        spec = [(g, s) for g, s in zip(gens, steps, strict=True) if s]  # a prompt without a step proposed nothing

        def per_step(values: list[float]) -> float:  # a mean over all speculative steps of all prompts
            return sum(v * s for v, (_, s) in zip(values, spec, strict=True)) / sum(steps)

        self.acceptance_rate = per_step([g.acceptance_rate for g, _ in spec])
        self.acceptance_per_position = [per_step(list(c)) for c in zip(*(g.acceptance_per_position for g, _ in spec))]
        self.tokens_per_forward = per_step([g.tokens_per_forward for g, _ in spec])


def _goal(text: str, value: float | None, target: float, trained: bool = True) -> dict:
    if not trained:
        text += " [random model: not meaningful]"
    met = None if value is None or not trained else value >= target
    return {"goal": text, "value": None if value is None else round(value, 3), "target": f">= {target}", "met": met}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek.bench_decode", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (few tokens, one round, no compile)")
    p.add_argument("--model", help="model directory (default: train tiny into runs/bench-decode, or reuse it)")
    p.add_argument("--out", help="write bench_decode.json into this directory")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="include the compiled engine")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    try:
        set_threads(args.threads)
        result = run(args.quick, args.out, args.model, args.compile)
    except NanoseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.json:
        for k, v in result["tokens_per_s"].items():
            print(f"{k:40s} {v:10.1f} tok/s")
        for k in ("speedup_vs_transformers", "speedup_vs_transformers_compiled", "speculative_speedup"):
            print(f"{k:40s} {result[k]}")
        print(f"{'acceptance_rate':40s} {result['acceptance_rate']}")
        for g in result["goals"]:
            status = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
            print(f"goal: {g['goal']}: {g['value']} (target {g['target']}): {status}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
