"""Pre-warming and the sleep pool in the fleet simulator (issue #5): real replays of small
synthetic traces through Ebbtide's own core (policy.lifecycle.plan, policy.warm_pool.plan_pool).

Ebbtide starts knowing what a replica serves (learned_capacity), so that its size follows the
load from the first tick. The cold start is long (10 minutes) where the point is that a sleeper
wakes in the capacity model's wake time instead."""

import json
import subprocess
import sys

import pytest

from ebbtide.policy.observation import Deployments, Pod, Signals
from ebbtide.policy.startup import Startup
from ebbtide.sim import report
from ebbtide.sim.ebbtide_policy import EbbtidePolicy, EbbtideSpotPolicy
from ebbtide.sim.fleet import simulate
from ebbtide.sim.policy import FleetView
from ebbtide.sim.training import train
from tests.testbed.replays import (
    CLI_ENV,
    MONDAY,
    OUTPUT,
    PROMPT,
    ebbtide,
    per_request,
    phases,
    settings,
    spec_with,
)


def misses(run, spec, start_min: float, end_min: float) -> float:
    """Requests arriving in [start, end) minutes that miss the SLO."""
    arrival, ttft, itl, weight = run.records.arrays()
    inside = (arrival >= start_min * 60) & (arrival < end_min * 60)
    return float(weight[inside & ~report.slo_met(ttft, itl, spec)].sum())


# Busy (4 replicas' worth), quiet for 20 minutes (1), busy again: the surplus of the first
# busy spell is asleep when the second begins.
BUSY_QUIET_BUSY = ((4, 20), (1, 20), (4, 20))


def test_sleepers_wake_in_the_wake_time_not_a_cold_start():
    cold = 600.0
    trace = phases(*BUSY_QUIET_BUSY)
    runs = {sleep: simulate(trace, ebbtide(spec_with(sleep=sleep, idle_seconds=30, max_pool=4), cold), settings(cold))
            for sleep in (False, True)}
    pooled, plain = runs[True].timeline, runs[False].timeline
    assert max(pooled.asleep[30:40]) >= 3, "the quiet spell's surplus is asleep"
    # The load returns at minute 40. Ready replicas one minute later: the sleepers are back
    # (one tick to see the load, WAKE to wake); without a pool, nothing before the cold start.
    assert pooled.ready[41] >= 4 and pooled.asleep[41] == 0, (pooled.ready[38:44], pooled.asleep[38:44])
    assert plain.ready[41] <= 2 and max(plain.ready[40:49]) <= 2, plain.ready[38:52]
    # What is left is the tick or two before the core sees the load come back.
    spec = spec_with()
    assert misses(runs[True], spec, 40, 60) < 0.1 * misses(runs[False], spec, 40, 60)


def test_asleep_gpu_hours_are_charged_at_the_reclaimed_fraction():
    trace = phases(*BUSY_QUIET_BUSY)
    spec = spec_with(sleep=True, idle_seconds=30, max_pool=4, reclaimed_fraction=0.25)
    run = simulate(trace, ebbtide(spec, 600.0), settings(600.0))
    asleep_h = run.gpu_seconds["asleep"] / 3600
    # The timeline samples the pool once a minute: the charge is its integral.
    assert asleep_h == pytest.approx(sum(run.timeline.asleep) / 60, rel=0.05)
    assert asleep_h > 0.5
    # Every GPU-second is charged once: awake replicas and sleepers add up to the replicas held.
    held_h = sum(run.timeline.replicas) / 60
    assert run.gpu_seconds["on-demand"] / 3600 + asleep_h == pytest.approx(held_h, rel=0.03)
    result = report.summarize(run, spec)
    price = spec.pricing.on_demand_per_gpu_hour
    assert result.gpu_hours_by_type["asleep"] == pytest.approx(asleep_h, abs=1e-3)
    assert result.cost_usd == pytest.approx(
        price * (result.gpu_hours_by_type["on-demand"] + 0.75 * result.gpu_hours_by_type["asleep"]), abs=0.02)


def test_the_pool_is_bounded_and_sleepers_expire():
    """From 6 replicas' worth to 1: at most maxPool asleep, the rest deleted; after the TTL the
    pool is empty and only the awake replica is held."""
    trace = phases((6, 15), (1, 40))
    spec = spec_with(sleep=True, idle_seconds=30, max_pool=2, ttl_seconds=600)
    run = simulate(trace, ebbtide(spec, 180.0), settings(180.0))
    t = run.timeline
    assert max(t.asleep) == 2, "the pool fills up to maxPool, no further"
    filled = t.asleep.index(2)
    expired = next(m for m in range(filled, len(t.asleep)) if t.asleep[m] < 2)
    assert expired - filled <= 600 / 60 + 1, "sleepers go after ttlSeconds"
    assert t.asleep[-1] == 0 and t.replicas[-1] == t.ready[-1] == 1


def test_pre_warming_starts_replicas_before_the_ramp():
    """An hour at 1 replica's worth, then 6 replicas' worth at once. Trained on the same
    traffic a week before, Ebbtide raises its floor one startup time ahead: the replicas are
    ready when the ramp begins. Reactively, they start when the load arrives and the queue
    lasts a cold start."""
    cold = 180.0
    trace = phases((1, 60), (6, 30))
    spec = spec_with(prewarm=True)
    profile = train(spec, trace, settings(cold)).profile
    reactive = simulate(trace, ebbtide(spec_with(), cold), settings(cold))
    warmed = simulate(trace, ebbtide(spec, cold, profile), settings(cold))
    assert max(reactive.timeline.replicas[50:59]) == 1
    # Index m is the state at minute m + 1 (less one step): started 3 minutes ahead, ready on time.
    assert warmed.timeline.replicas[57] >= 6 and warmed.timeline.ready[60] >= 6, warmed.timeline.ready[55:62]
    early, late = misses(warmed, spec, 60, 70), misses(reactive, spec, 60, 70)
    assert late > 1000 and early < 0.05 * late, (early, late)
    # Before the ramp the profile asks for nothing more: the floor is only raised for it.
    assert max(warmed.timeline.replicas[5:55]) == 1


def test_the_lead_time_is_the_startup_time_measured_on_its_own_replicas():
    """A 10-minute cold start, where the spec guesses 3 (warmup.defaultStartupSeconds): the
    training week measures it on the replicas it starts, as the operator does, and pre-warming
    then starts the ramp's replicas 10 minutes ahead. Planned with the guess, they are late."""
    cold = 600.0
    trace = phases((1, 60), (6, 30))
    spec = spec_with(prewarm=True)
    assert spec.warmup.default_startup_seconds == 180
    training = train(spec, trace, settings(cold))
    assert training.startup.seconds == cold and training.startup.samples >= 5
    measured = EbbtidePolicy(spec)
    training.teach(measured)
    guessed = ebbtide(spec, 180, training.profile)
    on_time = simulate(trace, measured, settings(cold)).timeline
    late = simulate(trace, guessed, settings(cold)).timeline
    assert on_time.replicas[51] >= 6 and on_time.ready[60] >= 6, on_time.replicas[45:62]
    assert max(late.replicas[45:56]) == 1 and late.ready[60] < 6, late.replicas[45:62]


def test_a_spot_replica_waiting_out_an_outage_does_not_stretch_the_lead_time():
    """Spot replicas Pending for an hour (no capacity; on-demand covers them after the pending
    timeout) count from when the cover started, not from their creation."""

    spec = spec_with()
    t0 = MONDAY.timestamp()
    startups = tuple(Startup(t0 + i, t0 + 3600 + i, t0 + 3780 + i, spot=True) for i in range(20))
    timeout = spec.placement.spot.pending_timeout_seconds
    for policy, expected in ((EbbtideSpotPolicy(spec), timeout + 180.0), (EbbtidePolicy(spec), 3600 + 180.0)):
        policy.orders(FleetView(t0 + 4000, Signals.missing("no scrape yet"), Deployments(1), 1, 0.0,
                                pods=lambda: (Pod("a"),), startups=lambda: startups))
        assert policy.lead_time == expected


def test_the_request_by_request_model_keeps_the_pool_too():
    """The same pool, every request through the engine scheduler: sleepers wake in the wake
    time, and no request is lost on the way (draining replicas finish what they hold)."""
    cold = 600.0
    trace = per_request(phases((3, 6), (0.5, 8), (3, 4), (0, 1)).counts)  # a quiet minute: all finish
    spec = spec_with(sleep=True, idle_seconds=15, max_pool=4)
    run = simulate(trace, ebbtide(spec, cold), settings(cold))
    t = run.timeline
    assert max(t.asleep[6:14]) >= 1
    assert t.ready[15] >= 3 and t.asleep[15] == 0, (t.ready[12:17], t.asleep[12:17])
    arrival, _, itl, _ = run.records.arrays()
    assert len(arrival) == trace.requests and (itl > 0).all()
    assert run.tokens_served == pytest.approx(trace.requests * (PROMPT + OUTPUT))


def test_cli_trains_the_profile_and_reports_the_ramps(tmp_path):
    out = tmp_path / "lifecycle.json"
    result = subprocess.run([sys.executable, "-m", "ebbtide.cli", "simulate", "--trace", "code-week", "--hours", "20",
                             "--train-profile", "--train-rotate", "1d", "--policies", "ebbtide-reactive",
                             "ebbtide-lifecycle", "--oracle-slo", "0", "--json", str(out)],
                            capture_output=True, text=True, timeout=120, env=CLI_ENV)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["settings"]["trained_profile"] and document["settings"]["train_rotate_s"] == 86400
    policies = document["policies"]
    assert set(policies) == {"ebbtide-reactive", "ebbtide-lifecycle"}
    assert all(p["ttft_p99_ramps_s"] is not None for p in policies.values())
    assert policies["ebbtide-reactive"]["gpu_hours_by_type"]["asleep"] == 0


def test_the_ramp_figures_cover_only_the_requests_of_the_ramp_hours():
    """One quiet hour, then a step to three replicas' worth: the second hour is the ramp. A
    fixed fleet of one falls behind in it (its SLO misses are all there), a fleet of four does
    not; the figures of the whole replay dilute what the ramp's own show."""
    from ebbtide.sim.baselines import Static

    trace = phases((0.5, 60), (3, 60))
    ramps = report.ramp_hours(trace)
    assert ramps == [(3600.0, 7200.0)]
    spec = spec_with()
    behind = report.summarize(simulate(trace, Static(replicas=1), settings(180)), spec, ramps)
    ahead = report.summarize(simulate(trace, Static(replicas=4), settings(180)), spec, ramps)
    assert behind.slo_attainment_ramps < 0.05 < behind.slo_attainment < 0.5, behind  # the quiet hour met it
    assert ahead.slo_attainment_ramps > 0.99 and ahead.ttft_p99_ramps_s < 1, ahead
    assert behind.ttft_p99_ramps_s > 10 * ahead.ttft_p99_ramps_s
    assert report.summarize(simulate(trace, Static(replicas=4), settings(180)), spec).slo_attainment_ramps is None
