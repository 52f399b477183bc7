"""glibc malloc tuning for CPU training: keep freed memory mapped instead of returning it to the OS.

A training step allocates and frees the same large buffers every step (weight casts, expert layouts,
gradients, logits chunks: 10-50 MB each at `small`). glibc serves blocks above its mmap threshold (dynamic,
at most 32 MB by default) with fresh `mmap`s and gives them back on free, so every step page-faults its
buffers in again, zero-filling each page: a 50 MB fp32 gradient cast costs ~9 ms instead of ~2 ms. Raising
the mmap and trim thresholds (the documented `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` knobs, set
here through `mallopt`) lets the heap keep and reuse those pages: the `small` bf16 train step ran 7-9% faster,
the default `tiny` run 4.6% (BENCHMARKS.md, train). The cost is that the process keeps its peak heap size until
it exits, which for a training loop is its steady state anyway (peak RSS of the default run: +4%). The
jemalloc/tcmalloc preloads that Intel's launchers use do the same, but are not installed everywhere; this needs
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to 1 GiB for this process; False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
