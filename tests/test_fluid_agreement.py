"""The fluid model against request-by-request replay of the same requests, on a short window of
a week (bench/fluid_check.py does every trace, longer; bench/RESULTS.md has its numbers).

The fluid model is one pool fed by one queue: on chat traffic it agrees with a static fleet
whose requests are balanced (power of two choices) within the issue's 0.3 points of SLO
attainment. Against a Service's random spread, on long-prompt traffic, and for an autoscaled
fleet's GPU-hours (Ebbtide: 4 % apart on this 40-minute window, 0.7 % over the bench's three
hours) it does not yet meet the issue's bar: docs/simulator.md says why, and what it would take."""

from dataclasses import replace

import pytest

from ebbtide.sim.baselines import Static
from ebbtide.sim.calibration import right_size_static
from ebbtide.sim.capacity import LLAMA_3_1_8B_H100
from ebbtide.sim.fleet import SimSettings, simulate
from ebbtide.sim.inputs import load_spec, load_trace, model_max_len
from ebbtide.sim.report import summarize

# Monday 06:00-06:40 UTC of the conversation week: the morning rise.
WINDOW_S = (30 * 3600, 30 * 3600 + 2400)


@pytest.fixture(scope="module")
def window():
    _, spec = load_spec(None)
    capacity = LLAMA_3_1_8B_H100.with_overrides(max_model_len=model_max_len(spec, LLAMA_3_1_8B_H100))
    trace = load_trace("conv-week", capacity, spec, 12, 1, 1, None, per_request=True, span=WINDOW_S)
    settings = SimSettings(capacity=capacity, cold_start_s=180.0, seed=1)
    return spec, trace, settings


def test_a_balanced_static_fleet_meets_the_slo_as_the_fluid_model_says(window):
    spec, trace, settings = window
    static, _ = right_size_static(spec, replace(trace, arrivals=None), settings, 1, 0.99)  # sized on the fluid
    fluid = summarize(simulate(trace, static, settings, per_request=False), spec)
    exact = summarize(simulate(trace, Static(replicas=static.replicas), replace(settings, routing="power-of-two"),
                               per_request=True), spec)
    assert exact.gpu_hours == pytest.approx(fluid.gpu_hours, rel=0.02)
    assert 100 * abs(exact.slo_attainment - fluid.slo_attainment) <= 0.3

