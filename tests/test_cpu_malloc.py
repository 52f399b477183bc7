"""The CPU allocator tuning the trainer applies: freed buffers are reused without page faults."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from nanoseek.cpu_malloc import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MB = 16,384 pages, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(max([faults() for _ in range(30)][-10:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_reuses_big_buffers_without_page_faults():
    def last_faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    # the most page faults of one call among the last 10 of 30 (the heap settles within ~8 calls)
    assert last_faults("default") > 8000  # glibc maps a fresh 64 MB block each time: every page faults again
    assert last_faults("tuned") < 500  # kept in the heap and reused


class FakeLibc:
    """Records the mallopt calls keep_freed_memory makes; returns 1 (success) like glibc."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_keep_freed_memory_raises_both_thresholds(monkeypatch):
    """Both knobs matter: a high mmap threshold alone still trims the freed top of the heap back to the OS
    (M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3 in <malloc.h>), and each is set to 1 GiB."""
    import nanoseek.cpu_malloc as cm

    libc = FakeLibc()
    monkeypatch.setattr(cm.ctypes, "CDLL", lambda name: libc)
    cm.keep_freed_memory.cache_clear()
    try:
        assert cm.keep_freed_memory() is True
        assert sorted(libc.calls) == [(-3, 2**30), (-1, 2**30)]
        assert cm.keep_freed_memory() is True and len(libc.calls) == 2  # once per process
    finally:
        cm.keep_freed_memory.cache_clear()


@pytest.mark.parametrize("on", [True, False])
def test_trainer_tunes_malloc_only_when_asked(on, tmp_path, corpus_dir, monkeypatch):
    """`--no-keep-freed-memory` leaves glibc's defaults alone (e.g. to measure the tuning's effect)."""
    from conftest import TRAIN_OVERRIDES

    import nanoseek.train
    from nanoseek.train_config import TrainConfig

    calls = []
    monkeypatch.setattr(nanoseek.train, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = TrainConfig(
        preset="tiny", override=list(TRAIN_OVERRIDES), data=str(corpus_dir), steps=2, batch_size=2, seq_len=32,
        eval_every=2, save_every=2, eval_tokens=200, progress=False, out=str(tmp_path / "run"), keep_freed_memory=on,
    )  # fmt: skip
    nanoseek.train.Trainer(cfg)
    assert calls == ([1] if on else [])
