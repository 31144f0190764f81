"""Child processes of a backend: each started in its own session, logged to a file, stopped by PID.

A process is started with ``start_new_session=True``, so its process group id is its PID: at
stop, after the process itself is gone, any process still in that group (an engine the kubelet
forgot, a Prometheus its wrapper left behind) is found by scanning /proc, killed by PID and
reported, so a test can fail on leftovers instead of leaking them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path


def group_members(pgid: int) -> list[int]:
    """PIDs of the live processes whose process group is `pgid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, split after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


class ManagedProcess:
    """One child process with its output in `log_path`; ``wait_for_line`` reads its readiness line."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        self.pid = self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Wait until a line of the output matches `pattern`; fail with the log tail if it exits first."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            match = regex.search(self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} printed no line matching {pattern!r} in {timeout} s:\n{self.tail()}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> list[int]:
        """SIGTERM, then SIGKILL after `grace` s; returns the PIDs of its group that outlived it (killed)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        leftovers = []
        deadline = time.monotonic() + 5
        while (members := group_members(self.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)  # children that got the signal too may still be shutting down
        for pid in members:
            leftovers.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        return leftovers
