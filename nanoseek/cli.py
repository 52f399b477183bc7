"""`nanoseek` command line: info, train, generate, convert, plot, bench.

Each subcommand lives next to the code it drives and exposes `add_cli(subparsers)`, which registers its parser
and sets `func`. User errors (`NanoseekError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from .errors import NanoseekError

# subcommand name -> module providing add_cli()
_COMMANDS = {
    "info": "nanoseek.cli",
    "train": "nanoseek.train",
    "plot": "nanoseek.plot",
    "generate": "nanoseek.generate",
    "convert": "nanoseek.convert",
    "bench": "nanoseek.bench",
}


def add_cli(sub) -> None:
    p = sub.add_parser("info", help="parameter, KV-cache and FLOP report of a preset or config")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="tiny", help="tiny | small | v2-lite | v3 (default: tiny)")
    g.add_argument("--config", help="a model config JSON (ours) or an HF config.json")
    p.add_argument("--seq-len", type=int, default=4096, help="context length for the attention FLOPs (default 4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)


def set_threads(n: int | None) -> None:
    """`--threads N` of every command: torch's intra-op threads. Unset keeps torch's choice; 0 is not a way to
    ask for it (as `nanoseek train --threads`, checked with the other training settings)."""
    if n is None:
        return
    if n < 1:
        raise NanoseekError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def _info(args) -> None:
    from .config import ModelConfig, config_fields, get_preset
    from .costs import cost_report

    if args.seq_len < 1:
        raise NanoseekError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.config:
        try:
            d = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as e:
            raise NanoseekError(f"cannot read --config {args.config}: {e}") from None
        if isinstance(d, dict) and ("model_type" in d or "architectures" in d):
            from .hf import config_from_hf

            cfg = config_from_hf(d, args.config)
        else:
            cfg = ModelConfig.from_dict(config_fields(d, args.config), args.config)  # ours, or hand-written
    else:
        cfg = get_preset(args.preset)
    r = cost_report(cfg, args.seq_len)
    if args.json:
        print(json.dumps(r))
        return
    B = 1e9
    print(f"{r['preset']}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, attention {cfg.attn_type}")
    print(
        f"  parameters      {r['params_total'] / B:10.3f} B total, {r['params_active'] / B:.3f} B activated per token"
    )
    print(f"  MTP module      {r['params_mtp'] / B:10.3f} B stored ({r['params_mtp_unique'] / B:.3f} B unique)")
    print(
        f"  KV cache        {r['kv_elements_per_token_per_layer']} elements/token/layer "
        f"(MHA: {r['mha_kv_elements_per_token_per_layer']}), {r['kv_bytes_per_token'] / 1024:.1f} KiB/token in bf16"
    )
    print(f"  training FLOPs  {r['train_flops_per_token'] / 1e9:10.3f} GFLOP/token at context {r['seq_len']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _COMMANDS.values():
        try:
            module = sys.modules[__name__] if mod == __name__ else importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue  # subcommand not built in this checkout
        if hasattr(module, "add_cli"):
            module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except NanoseekError as e:
        rank = os.environ.get("RANK", "0")
        launch = sys.modules.get("nanoseek.parallel.launch")
        if rank == "0":  # under torchrun every rank checks the same inputs and raises the same error: print it once
            print(f"error: {e}", file=sys.stderr)
        elif launch is not None and launch.RANKS_CONNECTED and not e.echo:  # after joining: maybe this rank's alone
            print(f"error: [rank {rank}] {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout's reader went away (`nanoseek generate ... | head`): stop quietly, as a Unix tool killed by
        # SIGPIPE would (exit 141); stdout goes to /dev/null so that the flush at exit cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


def run() -> None:
    """The process entry point (the `nanoseek` script and `python -m nanoseek`): `main`, then exit."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, gloo's threads sometimes abort the process at interpreter teardown ("terminate called
        # without an active exception"; 8 of 20 two-rank runs of a 5-line DDP script, nanoseek not involved),
        # turning a finished run into a failed one. Everything is written by now: leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
