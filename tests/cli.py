"""Running `ebbtide` as users do, in a subprocess, and what a refusal must look like."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.testbed.replays import CLI_ENV

ROOT = Path(__file__).resolve().parents[1]

# Imports are slow on a busy machine; a refusal itself takes no time.
TIMEOUT_S = 120


def ebbtide(*args: str, env: dict | None = None, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ebbtide.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or CLI_ENV)


def refused(result: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> str:
    """The house rule: one line on stderr (that says what is wrong), no traceback, exit `status`."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == status, (result.returncode, result.stderr)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
