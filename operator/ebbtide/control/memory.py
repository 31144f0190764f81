"""Give the memory a tick freed back to the system.

A tick reads the fleet's pods (3,000 at 1,000 services) and answers from the API server and
Prometheus; freed, that memory stays with the process under glibc's allocator, and the
operator's RSS keeps every tick's high-water mark: 435 MiB at 1,000 services, where
`malloc_trim` brings it to what is live (bench/operator_scale.py). Elsewhere (musl, macOS)
there is no `malloc_trim`, and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def _trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _trim()


def release_freed_memory() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
