"""Process-wide settings for heavy compute: the memory allocator and torch's thread pools.

Measured on the 2-core development machines: the LiteMedSAM encoder spent over half of its time
in the kernel. Its 256x256 stages allocate intermediates of 50-300 MB per batch; glibc's malloc
serves blocks that large with a fresh mmap and gives them back with munmap on free, so every
forward pass page-faults (and zeroes) its whole working set again (~500,000 minor faults a
second). Telling malloc to keep freed memory (no mmap for large blocks, no trimming of the
heap top) makes the second pass reuse the first one's pages; once the volume is encoded, the
allocator goes back to giving memory back (``encoder_memory``), or every later stage's temporaries
would stay resident. Torch's own pools: intra-op threads
= the cores this process may use, and one inter-op thread (the pipeline runs ops one at a time).

After the encoder the ops are small (adapter training, scoring, SAM decoding): on idle cores two
threads made them 1.4-2.1x faster, but beside another busy process their synchronization made
training 30x slower (300 steps: 7 s on one thread, 227 s on two beside an encoder). So those
stages use all threads only when that many cores are idle at the moment (``small_ops``);
adapter training stays on one thread so that its result does not depend on the machine's load.
Work made of independent slices (refinement) runs those threads as slice workers instead, one
torch thread each (``map_on_idle_cores``): no synchronization inside an op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# after the encoder: blocks over 32 MB (whole-volume masks and label arrays) are mapped and given
# back on free, and the heap is trimmed once 256 MB lie free at its top
AFTER_ENCODER = {_M_MMAP_THRESHOLD: 32 << 20, _M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 256 << 20}
# while encoding: never mmap, trim only when more than 1 GiB is free at the top of the heap
WHILE_ENCODING = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 1 << 30}
_configured = {}
_memory_depth = [0]       # encoder_memory's nesting


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _libc():
    """glibc, where this process runs on it (mallopt and malloc_trim); None elsewhere (macOS,
    Windows, musl: their allocators are left alone), or when FEWSHOT_KEEP_FREED_MEMORY=0 (the
    variable is for measuring what these settings are worth)."""
    if not sys.platform.startswith("linux") or os.environ.get("FEWSHOT_KEEP_FREED_MEMORY") == "0":
        return None
    return _load_glibc()


@functools.lru_cache(maxsize=1)
def _load_glibc():
    """Loaded once: find_library runs ldconfig, and every encoding asks twice."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(settings: dict) -> bool:
    libc = _libc()
    return libc is not None and all(bool(libc.mallopt(k, v)) for k, v in settings.items())


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep large freed blocks for reuse; True if it was done."""
    return _mallopt(WHILE_ENCODING)


def trim_free_memory() -> None:
    """Give back the free memory of every malloc arena now, unless the encoder's memory is being
    kept (encoder_memory). Threads allocate from arenas of their own, which glibc shrinks only
    when a whole heap is free: after slice workers had refined a 512x512x300 CT the process
    held 3.6 GB at its peak instead of 3.3 (one slice at a time); trimmed after them, 3.2."""
    libc = _libc()
    if libc is not None and _memory_depth[0] == 0:
        libc.malloc_trim(0)


def release_freed_memory() -> bool:
    """Back to giving memory back: large blocks mapped (and unmapped on free), the heap trimmed,
    and what the encoder left free returned to the system now. True if it was done."""
    libc = _libc()
    if libc is None or not _mallopt(AFTER_ENCODER):
        return False
    libc.malloc_trim(0)
    return True


@contextmanager
def encoder_memory():
    """Keep freed memory while the encoder runs, give it back afterwards: the encoder reuses the
    same 50-300 MB intermediates batch after batch (kept, its second pass faults no pages), while
    what runs after it (whole-volume masks, labels, scores) would otherwise stay resident for
    good: on a 512x512x300 CT the process held 6.9 GB at its peak with memory kept throughout."""
    # re-entrant: a stage that encodes on demand (propagation) holds it around its own work
    _memory_depth[0] += 1
    if _memory_depth[0] == 1:
        keep_freed_memory()
    try:
        yield
    finally:
        _memory_depth[0] -= 1
        if _memory_depth[0] == 0:
            release_freed_memory()


def configure(threads: int = 0) -> dict:
    """Apply the thread settings once per process, and check that the allocator can be tuned
    (``encoder_memory``); returns what was set. ``threads`` 0: all available cores."""
    import torch

    wanted = threads or available_cores()
    if not _configured:
        _configured["allocator_keeps_memory"] = _libc() is not None
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:      # already set, or parallel work has started: leave it
            pass
    if _configured.get("threads") != wanted:
        torch.set_num_threads(wanted)
        _configured["threads"] = wanted
    return dict(_configured)


_small_ops = {"at": float("-inf"), "threads": 1}
RECHECK_S = 5.0          # how long a decision on the small ops' threads stands


def idle_cores(window_s: float = 0.05) -> float | None:
    """Cores idle right now (all cores' idle time in /proc/stat over ``window_s``); None where
    that cannot be read (not Linux)."""
    def read():
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return values[3] + (values[4] if len(values) > 4 else 0), sum(values)

    try:
        idle0, total0 = read()
        time.sleep(window_s)
        idle1, total1 = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def small_op_threads() -> int:
    """Threads for the small ops after the encoder: this process's thread count when as many
    cores are idle (checked at most every RECHECK_S seconds), else 1; 1 where idleness cannot be
    read. ``FEWSHOT_SMALL_OP_THREADS`` overrides."""
    import torch

    forced = os.environ.get("FEWSHOT_SMALL_OP_THREADS")
    if forced:
        return max(1, int(forced))
    now = time.monotonic()
    if now - _small_ops["at"] > RECHECK_S:
        wanted = torch.get_num_threads()
        idle = idle_cores() if wanted > 1 else None
        _small_ops["threads"] = wanted if idle is not None and idle >= wanted - 0.25 else 1
        _small_ops["at"] = time.monotonic()
    return _small_ops["threads"]


@contextmanager
def torch_threads(count: int):
    """Run the enclosed ops on at most ``count`` torch threads, then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(previous, count)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def small_ops():
    """Run the enclosed small ops on small_op_threads() threads."""
    return torch_threads(small_op_threads())


def one_thread():
    """Run the enclosed ops on one thread (adapter training: reproducible, see Adapter.fit)."""
    return torch_threads(1)


def map_on_idle_cores(fn: Callable, items: Iterable, done: Callable | None = None) -> None:
    """Call ``fn(item)`` for each item, each call on one torch thread, and ``done(item, result)``
    in this thread, in the items' order. On idle cores (small_op_threads() > 1) that many calls
    run at once in threads (torch releases the GIL in its ops). For per-slice work whose result
    does not depend on the order of the calls: on 2 idle cores, 30 slices of a 512x512 CT refined
    by SAM took 1.9-2.1 s this way against 2.5-3.0 s one after another on two threads each.

    Only a few calls run ahead of the one ``done`` sees, so an error (a cancel inside ``fn`` or
    ``done``) waits for those alone, and is raised here."""
    items = list(items)
    done = done or (lambda item, result: None)
    workers = min(small_op_threads(), len(items))
    with torch_threads(1):
        if workers <= 1:
            for item in items:
                done(item, fn(item))
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="slice-worker") as pool:
            pending = deque()
            try:
                for item in items:
                    pending.append((item, pool.submit(fn, item)))
                    if len(pending) > workers:
                        first, future = pending.popleft()
                        done(first, future.result())
                while pending:
                    first, future = pending.popleft()
                    done(first, future.result())
            finally:
                for _, future in pending:
                    future.cancel()
        trim_free_memory()          # what the workers' arenas hold
