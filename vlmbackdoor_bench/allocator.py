"""Keep freed memory in the process: the CPU runs' one allocator setting.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mapping and
unmaps it on free, so the next tensor of that size is faulted in again page by page. The frozen
EfficientNet encoder's activations at batch 64 are ~300 MB each, so encoding paid mostly page
faults: on 768 world images (2 cores) 69.5 ms per image and 15.6 M minor faults, against 27.3 ms
and 0.56 M with mmap off and trimming off. Only where memory comes from changes, never a value:
the tokens are bitwise the same (tests/test_tiny_victim.py). The cost is resident memory that
stays reserved after a stage frees it (peak RSS of that measurement 1.5 -> 2.4 GB), and since
freed chunks of one stage rarely fit the next stage's arrays, it accumulated over a grid: an
8-cell run held 12.5 GB of heap of which 10.0 GB was free, in 44,572 chunks (malloc_info), at a
peak RSS of 17.9 GB (15.6 GB with the release below). So the store hands the free pages back after every stage it builds
(:func:`release_freed_memory`): within a stage nothing is unmapped, between stages nothing stays.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import sys

# glibc's mallopt(3) parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TOP_PAD_BYTES = 256 << 20  # grow the heap in 256 MB steps, not one page at a time
OPT_OUT = "VBB_KEEP_FREED_MEMORY"  # set to 0 to keep glibc's defaults


@functools.cache  # one dlopen per process: the store releases after every stage it builds
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it (glibc only; elsewhere, or with
    ``VBB_KEEP_FREED_MEMORY=0``, a no-op). Returns whether the setting was applied."""
    mallopt = getattr(_libc(), "mallopt", None)  # musl and other C libraries have no mallopt
    if os.environ.get(OPT_OUT, "1") == "0" or mallopt is None:
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, TOP_PAD_BYTES))
    applied = [mallopt(param, value) == 1 for param, value in settings]  # each one, even if one fails
    return all(applied)


def release_freed_memory() -> bool:
    """Collect garbage, then return the heap's free pages to the OS (glibc's malloc_trim(0),
    which also releases free chunks inside the heap, not only at its top). Values never change;
    the next allocations fault their pages in again once. Returns whether pages were released."""
    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)  # musl and other C libraries lack it
    return bool(trim(0)) if trim is not None else False
