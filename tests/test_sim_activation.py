"""Down to zero and back in the fleet simulator: replicas.min 0, and scaling.activation read
from the requests held at the gateway (policy.activation.activate, as the operator calls it).

Real replays of small synthetic traces with a long idle gap. The cold start (300 s) is long
next to the wake time, so the two ways back are told apart by the first requests' wait."""

import numpy as np
import pytest

from ebbtide.api.spec import Activation
from ebbtide.sim.fleet import simulate
from tests.testbed.replays import WAKE, ebbtide, per_request, phases, settings, spec_with

COLD = 300.0
# The operator's example: the requests a gateway holds while no replica is in the endpoints.
GATEWAY = Activation(query='sum(gateway_pending_requests{service="chat"})', threshold=0)


def down_to_zero(sleep: bool = True, activation: Activation | None = GATEWAY, allow_scale_to_zero: bool = False,
                 **sleep_settings):
    """The example spec (no schedules, no pre-warming) with replicas.min 0."""
    spec = spec_with(sleep=sleep, idle_seconds=30, **sleep_settings)
    return spec.model_copy(update={
        "replicas": spec.replicas.model_copy(update={"min": 0, "allow_scale_to_zero": allow_scale_to_zero}),
        "scaling": spec.scaling.model_copy(update={"activation": activation}),
    })


def waits(run, start_min: float, end_min: float) -> np.ndarray:
    """TTFT of the requests arriving in [start, end) minutes."""
    arrival, ttft, _, weight = run.records.arrays()
    return ttft[(arrival >= start_min * 60) & (arrival < end_min * 60) & (weight > 0)]


# Half a replica's worth for 4 minutes, nothing for 16, then the load again: request by request.
GAP = ((0.5, 4), (0, 16), (0.5, 6))


def test_from_zero_a_sleeper_wakes_in_the_wake_time_and_a_deleted_replica_takes_a_cold_start():
    trace = per_request(phases(*GAP).counts)
    cfg = settings(COLD)
    # The first request after the gap waits for a scrape to see it, a tick to act, then the
    # replica: at most one scrape interval and one tick (15 s each) before it is woken or started.
    detection = cfg.scrape_interval_s + down_to_zero().scaling.behavior.interval_seconds

    asleep = simulate(trace, ebbtide(down_to_zero(), COLD), cfg)
    t = asleep.timeline
    assert t.ready[15:20] == [0] * 5 and t.asleep[15:20] == [1] * 5, "the last replica sleeps, it is not deleted"
    first = waits(asleep, 20, 21)
    assert WAKE <= first.max() <= detection + WAKE + 1, first.max()
    assert t.ready[21] == 1 and t.asleep[21] == 0

    # allowScaleToZero: the last replica sleeps like any surplus, and goes when its TTL is over.
    deleted = simulate(trace, ebbtide(down_to_zero(allow_scale_to_zero=True, ttl_seconds=120), COLD), cfg)
    t = deleted.timeline
    assert t.replicas[15:20] == [0] * 5
    first = waits(deleted, 20, 21)
    assert COLD <= first.max() <= COLD + detection + 1, first.max()

    # Without an activation query nothing can see the requests: nobody wakes the service.
    blind = simulate(trace, ebbtide(down_to_zero(activation=None), COLD), cfg)
    assert max(blind.timeline.ready[15:]) == 0
    assert waits(blind, 20, 21).min() > 4 * 60, "they wait until the end of the trace"


def test_at_zero_no_awake_gpu_is_charged_and_a_sleeper_only_its_asleep_time():
    """Two replicas' worth, an hour of nothing, then the load again (fluid). With min 1 one
    replica stays awake through the gap; with min 0 none does: the sleep pool keeps a sleeper
    (charged as asleep), scale to zero without a pool keeps nothing."""
    cfg = settings(COLD)
    specs = {"min 1": spec_with(), "sleep": down_to_zero(), "zero": down_to_zero(sleep=False)}
    first, last = 20, 69  # minutes well inside the gap, the scale-down behind

    def charged(spec, minutes: int) -> dict[str, float]:
        run = simulate(phases((2, 10), (0, minutes - 10)), ebbtide(spec, COLD), cfg)
        return {kind: run.gpu_seconds.get(kind, 0.0) for kind in ("on-demand", "asleep")}

    for name, spec in specs.items():
        # A replay cut short is the same replay up to its end: the difference is what the gap cost.
        before, after = charged(spec, first), charged(spec, last)
        gap = {kind: after[kind] - before[kind] for kind in after}
        run = simulate(phases((2, 10), (0, 60), (2, 15)), ebbtide(spec, COLD), cfg)
        sleepers = run.timeline.asleep[first:last]
        assert gap["on-demand"] == pytest.approx(60.0 * (last - first) if name == "min 1" else 0.0), name
        assert gap["asleep"] == pytest.approx(60.0 * sum(sleepers), abs=60), name
        assert (min(sleepers) >= 1) == (name == "sleep") and (max(sleepers) == 0) == (name != "sleep"), sleepers
        assert run.timeline.ready[-1] >= 2, f"{name}: back to the load's size after the gap"
        # Back from a sleeper in seconds, from nothing in a cold start.
        wait = waits(run, 70, 71).max()
        assert wait < 40 if name != "zero" else COLD < wait < COLD + 40, (name, wait)
