"""`ebbtide run` with Python's allocation tracing on: what holds the operator's memory (issue #18).

    EBBTIDE_TRACE_FILE=/tmp/trace.txt python bench/traced_operator.py run ...    # then: kill -USR1 PID

`python bench/operator_scale.py --traced FILE` runs the operator so and signals it after the rest
window. On SIGUSR1 this appends to the file: the traced total and peak, RSS, and the largest
allocation sites by file and by line; then both allocators' own accounts (pymalloc's arenas,
glibc's arenas: what each holds from the system against what is in use). Tracing costs time and
memory of its own: for where the memory is, not for how much or how fast. With
EBBTIDE_TRACE_ALLOCATIONS=0 only the allocators' accounts are written, at no cost; with
EBBTIDE_TRACE_FRAMES=N the largest sites also by their callers, N frames deep.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tracemalloc

from ebbtide.cli import main

TOP = 20
TRACING = os.environ.get("EBBTIDE_TRACE_ALLOCATIONS", "1") != "0"
FRAMES = int(os.environ.get("EBBTIDE_TRACE_FRAMES", "1"))  # more: who called the allocating line too


def allocators(out) -> None:
    """pymalloc's and glibc's statistics, which both print to the C stderr: sent to `out`."""
    out.flush()
    saved = os.dup(2)
    os.dup2(out.fileno(), 2)
    try:
        sys._debugmallocstats()
        stats = getattr(ctypes.CDLL(None), "malloc_stats", None)
        if stats is not None:
            stats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def dump(signum: int, frame: object) -> None:
    if not TRACING:
        with open(os.environ["EBBTIDE_TRACE_FILE"], "a") as out:
            out.write(f"RSS {rss_mib():.1f} MiB\n")
            allocators(out)
        return
    snapshot = tracemalloc.take_snapshot()
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"traced {current / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB), RSS {rss_mib():.1f} MiB"]
    for group in ("filename", "lineno"):
        lines.append(f"largest by {group}:")
        lines += [f"  {stat.size / 2**20:8.1f} MiB {stat.count:9d} blocks  {stat.traceback}"
                  for stat in snapshot.statistics(group)[:TOP]]
    if FRAMES > 1:
        lines.append("largest by traceback, innermost frame first:")
        for stat in snapshot.statistics("traceback")[:TOP]:
            lines.append(f"  {stat.size / 2**20:8.1f} MiB {stat.count:9d} blocks")
            lines += [f"      {frame.filename}:{frame.lineno}" for frame in reversed(stat.traceback)]
    with open(os.environ["EBBTIDE_TRACE_FILE"], "a") as out:
        out.write("\n".join(lines) + "\n")
        allocators(out)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next((line.split()[1] for line in f if line.startswith("VmRSS:")), "0")) / 1024


if __name__ == "__main__":
    if TRACING:
        tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, dump)
    sys.exit(main())
