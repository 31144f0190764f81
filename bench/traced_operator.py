"""`ebbtide run` with Python's allocation tracing on: what holds the operator's memory (issue #18).

    EBBTIDE_TRACE_FILE=/tmp/trace.txt python bench/traced_operator.py run ...    # then: kill -USR1 PID

`python bench/operator_scale.py --traced FILE` runs the operator so and signals it after the rest
window. On SIGUSR1 this appends to the file: the traced total and peak, RSS, and the largest
allocation sites by file and by line. Tracing costs time and memory of its own: for where the
memory is, not for how much or how fast.
"""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc

from ebbtide.cli import main

TOP = 20


def dump(signum: int, frame: object) -> None:
    snapshot = tracemalloc.take_snapshot()
    current, peak = tracemalloc.get_traced_memory()
    with open("/proc/self/status") as f:
        rss = next((line.split()[1] for line in f if line.startswith("VmRSS:")), "0")
    lines = [f"traced {current / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB), RSS {int(rss) / 1024:.1f} MiB"]
    for group in ("filename", "lineno"):
        lines.append(f"largest by {group}:")
        lines += [f"  {stat.size / 2**20:8.1f} MiB {stat.count:9d} blocks  {stat.traceback}"
                  for stat in snapshot.statistics(group)[:TOP]]
    with open(os.environ["EBBTIDE_TRACE_FILE"], "a") as out:
        out.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    tracemalloc.start()
    signal.signal(signal.SIGUSR1, dump)
    sys.exit(main())
