"""Memory settings for the bulk process: no page zeroing, no collector walks per burst.

A burst or a resync allocates and frees buffers of megabytes (joined requests, frames,
the Backup's byte matrices). glibc serves those from fresh mmap()s and gives them back at
free(), so every burst pays the kernel for zeroed pages again (perf, 200k burst:
clear_page_erms was 6 % of the machine). With a fixed, high mmap threshold and trim
threshold they come from the heap and stay there for the next burst: the peak is kept,
not paid for twice. The cyclic collector is made to run rarely: the process holds
hundreds of thousands of tuples (staged changes) that are never in cycles, and a young
generation of 700 objects made it walk them many times per burst.
"""

from __future__ import annotations

import ctypes
import gc

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 256 << 20


def tune_for_bulk() -> bool:
    """Apply both settings to this process; False if this libc has no mallopt (not glibc)."""
    gc.freeze()  # what start-up made (modules, config) is never collected anyway
    gc.set_threshold(100_000, 50, 100)
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
