"""Process-wide settings for heavy compute: the memory allocator and torch's thread pools.

Measured on the 2-core development machines: the LiteMedSAM encoder spent over half of its time
in the kernel. Its 256x256 stages allocate intermediates of 50-300 MB per batch; glibc's malloc
serves blocks that large with a fresh mmap and gives them back with munmap on free, so every
forward pass page-faults (and zeroes) its whole working set again (~500,000 minor faults a
second). Telling malloc to keep freed memory (no mmap for large blocks, no trimming of the
heap top) makes the second pass reuse the first one's pages. Torch's own pools: intra-op threads
= the cores this process may use, and one inter-op thread (the pipeline runs ops one at a time).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_configured = {}


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep large freed blocks for reuse; True if it was done. Only on Linux
    with glibc; elsewhere (macOS, Windows, musl) the system allocator is left alone."""
    if not sys.platform.startswith("linux") or os.environ.get("FEWSHOT_KEEP_FREED_MEMORY") == "0":
        return False     # the variable is for measuring what this setting is worth
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # trim only when more than 1 GiB is free at the top of the heap; never mmap
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def configure(threads: int = 0) -> dict:
    """Apply the allocator and thread settings once per process; returns what was set.
    ``threads`` 0: all available cores."""
    import torch

    wanted = threads or available_cores()
    if not _configured:
        _configured["allocator_keeps_memory"] = keep_freed_memory()
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:      # already set, or parallel work has started: leave it
            pass
    if _configured.get("threads") != wanted:
        torch.set_num_threads(wanted)
        _configured["threads"] = wanted
    return dict(_configured)
