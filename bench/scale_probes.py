"""What bench/operator_scale.py reads off the running processes: the operator's ticks, its CPU
and memory, Prometheus's query count. Only reads; nothing here changes what it measures."""

from __future__ import annotations

import os
import statistics
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def metric_values(url: str, names: set[str]) -> dict[str, float]:
    """Sum of each named sample over its label sets, from a /metrics page."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                values[sample.name] += sample.value
    return values


class TickWatcher:
    """Every tick's duration, from the operator's tick histogram: polled faster than ticks come,
    the growth of `_sum` between two polls where `_count` grew by one is that tick's duration."""

    SUM, COUNT = "ebbtide_tick_duration_seconds_sum", "ebbtide_tick_duration_seconds_count"

    def __init__(self, metrics_url: str, poll_seconds: float = 1.0) -> None:
        # Only the two samples read (prometheus_client's name[] filter): the whole page of a
        # thousand services costs the operator a tenth of a second per poll.
        self.url = f"{metrics_url}?name[]={self.SUM}&name[]={self.COUNT}"
        self.poll_seconds = poll_seconds
        self.ticks: list[tuple[float, float]] = []  # (wall time seen, seconds)
        self.count = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tick-watcher", daemon=True)

    def start(self) -> TickWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        last: dict[str, float] | None = None
        while not self._stop.wait(self.poll_seconds):
            try:
                now = metric_values(self.url, {self.SUM, self.COUNT})
            except OSError:
                continue  # the operator is starting or busy: next poll
            if last is not None and now[self.COUNT] > last[self.COUNT]:
                ticks = now[self.COUNT] - last[self.COUNT]
                spent = (now[self.SUM] - last[self.SUM]) / ticks  # >1 tick between polls: their mean
                self.ticks += [(time.time(), spent)] * int(ticks)
            self.count = now[self.COUNT]
            last = now

    def durations(self, since: float, until: float) -> list[float]:
        return [d for t, d in self.ticks if since <= t <= until]


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1), interpolated; None without values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]
