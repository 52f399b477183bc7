"""Training settings: one flat dataclass, its command line, and replay from a saved train_config.json.

Every field is a flag (`batch_size` -> `--batch-size`). A run writes its full settings to
DIR/train_config.json; `--config FILE` (or `--resume`, which reads the run's own file) replays them, and any
flag given explicitly on the command line wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import check_type
from .errors import NanoseekError

SHUFFLE_TOKENS = 1 << 23  # default --shuffle-rows window, in tokens


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    preset: str = _f("tiny", "model preset: tiny | small | v2-lite | v3")
    model_config: str | None = _f(None, "JSON file of ModelConfig fields overriding the preset")
    override: list[str] = field(
        default_factory=list,
        metadata={"help": "ModelConfig field override KEY=VALUE (repeatable), e.g. n_routed_experts=0"},
    )
    mtp_depth: int | None = _f(None, "number of MTP modules D (default: the preset's)")
    # data
    data: str | None = _f(None, "directory, glob or file of .txt/.py/.md/.jsonl (default: the Python stdlib)")
    tokenizer: str | None = _f(None, "a tokenizer.json or a directory with one (default: a BPE trained on the corpus)")
    seq_len: int = _f(256, "tokens per sequence")
    batch_size: int = _f(16, "sequences per micro-batch")
    shuffle_rows: int | None = _f(
        None,
        "serve training rows from shuffled windows of this many rows (default: 2^23 tokens' worth, "
        "2^23 // (seq_len + 1) rows; 0: in file order)",
    )
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    # optimisation (V3: AdamW 0.9/0.95, wd 0.1, clip 1.0, warmup then cosine)
    steps: int = _f(400, "optimizer steps")
    lr: float = _f(3e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int | None = _f(None, "linear warm-up steps (default: 5%% of --steps, at least 10)")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "gradient-norm clip")
    optim_states: str = _f("fp32", "AdamW moment dtype: fp32 | bf16", choices=["fp32", "bf16"])
    seed: int = _f(0, "seed for initialisation and data order")
    # precision
    precision: str = _f(
        "bf16", "fp32 | bf16 (bf16 compute, fp32 master weights) | fp8", choices=["fp32", "bf16", "fp8"]
    )
    fp8_granularity: str = _f("block", "fp8 scaling: block (1x128/128x128) | tensor", choices=["block", "tensor"])
    # load balancing
    balance: str = _f("loss-free", "loss-free | aux | none", choices=["loss-free", "aux", "none"])
    bias_update_rate: float = _f(1e-3, "loss-free bias step gamma")
    bias_update: str = _f(
        "sign",
        "loss-free bias rule: sign (b += gamma*sign(err), V3) | proportional (b += gamma*err/mean load)",
        choices=["sign", "proportional"],
    )
    bias_update_schedule: str = _f(
        "constant",
        "loss-free gamma over training: constant | lr (scaled like the learning rate: warm-up, cosine decay)",
        choices=["constant", "lr"],
    )
    seq_aux_alpha: float | None = _f(None, "sequence-wise balance loss alpha (default: 1e-4 with loss-free, else 0)")
    aux_alpha: float = _f(1e-3, "classic auxiliary balance loss alpha (used with --balance aux)")
    # multi-token prediction
    mtp_weight: float = _f(0.3, "MTP loss weight lambda")
    mtp_weight_late: float = _f(0.1, "MTP loss weight after --mtp-weight-drop-step steps")
    mtp_weight_drop_step: int | None = _f(None, "lambda is --mtp-weight-late after this many steps (default: never)")
    # evaluation, output, robustness
    out: str | None = _f(None, "output directory (default: runs/<preset>)")
    resume: str | None = _f(
        None, "resume from the latest checkpoint of --out, or of this run/checkpoint dir", nargs="?", const="latest"
    )
    eval_every: int = _f(100, "evaluate every N steps (and at the end)")
    eval_tokens: int = _f(65536, "validation tokens per evaluation")
    save_every: int = _f(200, "checkpoint every N steps (and at the end)")
    keep_last: int = _f(3, "checkpoints to keep")
    max_nan_skips: int = _f(5, "stop after this many consecutive non-finite losses")
    threads: int | None = _f(None, "torch intra-op threads (default: torch's choice)")
    compile: bool = _f(False, "torch.compile the model (eager stays the reference)")
    keep_freed_memory: bool = _f(
        True, "CPU: keep freed memory in glibc's heap instead of unmapping it (no page faults on each step's buffers)"
    )
    plot: bool = _f(False, "render PNG plots into --out at the end")
    progress: bool = _f(True, "show a progress bar")
    # parallelism (launch with torchrun; data parallelism takes the remaining ranks)
    ep: int = _f(1, "expert-parallel ranks")
    pp: int = _f(1, "pipeline-parallel ranks")
    pp_schedule: str = _f("1f1b", "pipeline schedule: 1f1b | dualpipev", choices=["1f1b", "dualpipev"])
    pp_microbatches: int | None = _f(None, "pipeline micro-batches per step (default: the least the schedule takes)")
    fp8_dispatch: bool = _f(False, "quantise expert-parallel token dispatch to FP8 (combine stays high precision)")
    ep_overlap: bool = _f(False, "overlap one half-batch's all-to-all with the other half's expert compute")
    dp_shard: bool = _f(
        False, "FSDP2 for data parallelism: parameters, gradients and optimizer states sharded (not with --pp)"
    )
    ranks_per_node: int | None = _f(None, "ranks per node for node-limited routing (default: LOCAL_WORLD_SIZE)")
    max_nodes_per_token: int | None = _f(
        None, "node-limited routing: each token's experts span at most M nodes (default: no limit)"
    )

    def resolved_out(self) -> Path:
        return Path(self.out or f"runs/{self.preset}")

    def window_rows(self) -> int:
        """`--shuffle-rows`, resolved. The default window holds ~8M tokens whatever the sequence length (the
        whole standard-library corpus, ~32 MiB as int32): batches drawn from a window of dozens of files
        still carry its content, which the loss-free routing bias then tracks (BENCHMARKS.md, balance)."""
        return self.shuffle_rows if self.shuffle_rows is not None else max(1, SHUFFLE_TOKENS // (self.seq_len + 1))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are suppressed so we can tell which flags were given explicitly."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_ = meta.pop("help")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # a help text that names its own default ("default: the preset's") keeps it; others get the value
        help_ = help_ if "(default:" in help_ else f"{help_} (default: {default})"
        kw = dict(default=argparse.SUPPRESS, help=help_, **meta)
        if f.type in ("bool",):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "override":
            p.add_argument(flag, action="append", metavar="KEY=VALUE", **kw)
        else:
            typ = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
            p.add_argument(flag, type=typ, **kw)
    p.add_argument("--config", default=None, help="replay a train_config.json (explicit flags win)")


def load_settings(path: str | Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise NanoseekError(f"cannot read training config {path}: {e}") from None
    if not isinstance(d, dict):
        raise NanoseekError(f"{path}: expected a JSON object of training settings, got {type(d).__name__}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise NanoseekError(f"{path}: unknown training setting(s): {', '.join(unknown)}")
    return {k: check_type(f"{path}: {k}", v, types[k]) for k, v in d.items()}


def from_args(ns: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file (or the resumed run's train_config.json) < explicit flags."""
    given = {k: v for k, v in vars(ns).items() if k not in ("config", "func", "command")}
    base: dict = {}
    if ns.config:
        base = load_settings(ns.config)
        base.pop("resume", None)  # how that run was started, not a setting (files of older versions stored it)
    elif given.get("resume") is not None:
        run = run_dir_of(given["resume"], TrainConfig(**{k: given[k] for k in ("preset", "out") if k in given}))
        if (run / "train_config.json").exists():
            base = load_settings(run / "train_config.json")
            base.pop("resume", None)
            base["out"] = str(run)
    return TrainConfig(**{**base, **given})


def run_dir_of(resume: str, tc: TrainConfig) -> Path:
    """The run directory a --resume value refers to: --out for "latest", else the given run directory or the
    run that owns the given checkpoint directory (DIR/checkpoints/step_N)."""
    if resume == "latest":
        return tc.resolved_out()
    p = Path(resume)
    return p.parent.parent if p.parent.name == "checkpoints" else p


def validate(tc: TrainConfig) -> None:
    def bad(msg: str) -> None:
        raise NanoseekError(msg)

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    # argparse types and `choices` cover the command line; this covers the API (and --config files) too
    for f in dataclasses.fields(tc):
        value, choices = check_type(flag(f.name), getattr(tc, f.name), f.type), f.metadata.get("choices")
        if choices and value not in choices:
            bad(f"{flag(f.name)} must be {'|'.join(choices)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            bad(f"{flag(f.name)} must be finite, got {value}")
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "keep_last", "ep", "pp"):
        if getattr(tc, name) < 1:
            bad(f"{flag(name)} must be >= 1, got {getattr(tc, name)}")
    # unset (None) means a default; 0 is not a way to ask for it
    for name in ("threads", "pp_microbatches", "ranks_per_node", "max_nodes_per_token"):
        if getattr(tc, name) is not None and getattr(tc, name) < 1:
            bad(f"{flag(name)} must be >= 1, got {getattr(tc, name)}")
    for name in ("lr", "grad_clip"):  # a zero clip zeroes every update, a negative one reverses it
        if getattr(tc, name) <= 0:
            bad(f"{flag(name)} must be > 0, got {getattr(tc, name)}")
    if not 0 <= tc.min_lr_ratio <= 1:
        bad(f"--min-lr-ratio must be in [0, 1], got {tc.min_lr_ratio}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(tc, name) < 1:
            bad(f"{flag(name)} must be in [0, 1), got {getattr(tc, name)}")
    # every other float setting is a rate, weight or alpha
    floats = [f.name for f in dataclasses.fields(tc) if f.type.startswith("float")]
    for name in (*floats, "mtp_depth", "shuffle_rows", "warmup_steps", "mtp_weight_drop_step"):
        if getattr(tc, name) is not None and getattr(tc, name) < 0:
            bad(f"{flag(name)} must be >= 0, got {getattr(tc, name)}")
    for name in ("data", "tokenizer", "out", "resume"):  # e.g. an unset shell variable: "" is not "the default"
        if getattr(tc, name) is not None and not getattr(tc, name).strip():
            bad(f"{flag(name)} is empty (leave the flag out for its default)")
    if tc.compile and tc.pp > 1:  # the pipeline schedule calls the stage modules, never the compiled loss
        bad("--compile does not apply under --pp yet (the pipeline stages run eagerly): drop one of them")
    if tc.eval_tokens < tc.seq_len + 1:
        bad(f"--eval-tokens {tc.eval_tokens} must cover at least one sequence of --seq-len + 1 = {tc.seq_len + 1}")
    for kv in tc.override:
        if "=" not in kv:
            bad(f"--override expects KEY=VALUE, got {kv!r}")
