"""Keep freed memory in the process: the CPU runs' one allocator setting.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mapping and
unmaps it on free, so the next tensor of that size is faulted in again page by page. The frozen
EfficientNet encoder's activations at batch 64 are ~300 MB each, so encoding paid mostly page
faults: on 768 world images (2 cores) 69.5 ms per image and 15.6 M minor faults, against 27.3 ms
and 0.56 M with mmap off and trimming off. Only where memory comes from changes, never a value:
the tokens are bitwise the same (tests/test_tiny_victim.py). The cost is resident memory that
stays reserved after a stage frees it (peak RSS of that measurement 1.5 -> 2.4 GB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt(3) parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TOP_PAD_BYTES = 256 << 20  # grow the heap in 256 MB steps, not one page at a time
OPT_OUT = "VBB_KEEP_FREED_MEMORY"  # set to 0 to keep glibc's defaults


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it (glibc only; elsewhere, or with
    ``VBB_KEEP_FREED_MEMORY=0``, a no-op). Returns whether the setting was applied."""
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, TOP_PAD_BYTES))
    applied = [mallopt(param, value) == 1 for param, value in settings]  # each one, even if one fails
    return all(applied)
