"""How the process's freed memory is handled, under glibc's allocator (elsewhere, musl or
macOS, there are no such calls, and these do nothing).

The operator gives back what a tick freed: a tick reads the fleet's pods (3,000 at 1,000
services) and answers from the API server and Prometheus; kept, the RSS holds every tick's
high-water mark: 435 MiB at 1,000 services, where `malloc_trim` brings it to what is live
(bench/operator_scale.py).

The simulator does the opposite: a replay allocates and frees arrays of millions of latency
points again and again, and glibc maps each one afresh and unmaps it when freed; every page of
it then faults in anew, which cost 15 of a conv-week run's 65 CPU seconds here (sys time).
Kept in the heap, freed memory is reused without faulting.
"""

from __future__ import annotations

import ctypes

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest on 64-bit: bigger blocks are always mapped


def _libc(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)  # the process's own symbols: libc's, without a search
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc("malloc_trim")
_MALLOPT = _libc("mallopt")


def release_freed_memory() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def keep_freed_memory() -> None:
    """For a process that reallocates big arrays until it exits: blocks up to 32 MiB come from
    the heap, and the heap is not trimmed."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        _MALLOPT(_M_TOP_PAD, 256 * 1024 * 1024)
        _MALLOPT(_M_TRIM_THRESHOLD, 2**31 - 1)
