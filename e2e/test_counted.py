"""The counted scenarios (e2e/scenarios.py): every request of each one counted, by the runner of
e2e/runner.py, into artifacts/e2e/summary.json."""

from __future__ import annotations

import pytest

from e2e.backend import Backend, StoryLog
from e2e.runner import Scenario, Summary, run_scenario
from e2e.scenarios import SCENARIOS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_no_request_lost(backend: Backend, story: StoryLog, summary: Summary, scenario: Scenario):
    run_scenario(backend, story, summary, scenario)
