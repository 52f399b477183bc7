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
