"""Fixtures of the end-to-end scenarios: the backend chosen by ``E2E_CLUSTER`` (``local``, the
default: a real control plane on this machine, e2e/local.py; or ``kind``, e2e/kind.py) and the
end-to-end log, ``artifacts/e2e-<backend>.log``, one for all the scenarios of a session, and the
counted scenarios' ``artifacts/e2e/summary.json``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import kind, local
from e2e.backend import ROOT, Backend, StoryLog
from e2e.runner import Summary

BACKENDS = {"local": (local.LocalBackend, local.missing_requirement),
            "kind": (kind.KindBackend, kind.missing_requirement)}


def artifacts_dir() -> Path:
    return Path(os.environ.get("E2E_ARTIFACTS", ROOT / "artifacts"))


@pytest.fixture(scope="session")
def backend() -> Iterator[Backend]:
    choice = os.environ.get("E2E_CLUSTER", "local")
    if choice not in BACKENDS:
        pytest.fail(f"E2E_CLUSTER={choice!r}: expected one of {sorted(BACKENDS)}")
    cls, missing = BACKENDS[choice]
    if reason := missing():
        pytest.skip(reason)
    with cls(artifacts_dir()) as started:
        yield started


@pytest.fixture(scope="session")
def story(backend: Backend) -> StoryLog:
    return StoryLog(artifacts_dir() / f"e2e-{backend.name}.log")


SUMMARIES: list[Summary] = []


@pytest.fixture(scope="session")
def summary() -> Summary:
    """One entry per counted scenario, the file rewritten after each (e2e/runner.py)."""
    SUMMARIES.append(Summary(artifacts_dir() / "e2e" / "summary.json"))
    return SUMMARIES[-1]


def pytest_terminal_summary(terminalreporter) -> None:
    """The counts of this session's scenarios, one line each, after pytest's own summary."""
    for written in SUMMARIES:
        terminalreporter.section(f"requests counted ({written.path})")
        for line in written.table():
            terminalreporter.write_line(line)
