"""Spot capacity in the fleet simulator: reclaims, outages, the on-demand cover, and the bill.

Real replays on small synthetic traces. Ebbtide's policies start knowing what a replica serves
(learned_capacity), so that the core holds a steady size and only spot moves.
"""

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.sim import report
from ebbtide.sim.capacity import LLAMA_3_1_8B_H100
from ebbtide.sim.command import parse_outage
from ebbtide.sim.ebbtide_policy import EbbtidePolicy, EbbtideSpotPolicy, SpotOnlyPolicy
from ebbtide.sim.fleet import SimSettings, simulate
from ebbtide.sim.inputs import load_spec
from ebbtide.sim.policy import Orders, SimulatedPolicy
from ebbtide.sim.replicas import ASLEEP, ASLEEP_SPOT
from ebbtide.sim.spot_market import SpotMarket
from ebbtide.sim.traces import Trace
from tests.testbed.replays import CLI_ENV, phases

PROMPT, OUTPUT = 1000, 200
SATURATION = LLAMA_3_1_8B_H100.saturation_rate(PROMPT, OUTPUT)  # requests/s per replica
CAPACITY = SATURATION * (PROMPT + OUTPUT)  # tokens/s per replica at its limit, as the core learns it
COLD_START = 180.0


def spec_with(**spot):
    """The example spec without its schedule windows (they would move the floor), with spot
    placement settings."""
    _, spec = load_spec(None)
    placement = spec.placement.model_copy(update={"spot": spec.placement.spot.model_copy(update=spot)})
    return spec.model_copy(update={"schedules": [], "placement": placement})


def steady_trace(rate: float, seconds: int, seed: int = 4, per_request: bool = False, quiet_after: int | None = None
                 ) -> Trace:
    """Poisson arrivals at `rate` per second (none after `quiet_after`), 1000 / 200 tokens."""
    rng = np.random.default_rng(seed)
    busy = seconds if quiet_after is None else quiet_after
    arrivals = np.sort(rng.uniform(0, busy, rng.poisson(rate * busy)))
    counts = np.bincount(arrivals.astype(int), minlength=seconds)
    trace = Trace(name="steady", duration_s=float(seconds), counts=counts, prompt_sum=counts * float(PROMPT),
                  output_sum=counts * float(OUTPUT))
    if per_request:
        trace = Trace(name="steady", duration_s=float(seconds), counts=counts, prompt_sum=trace.prompt_sum,
                      output_sum=trace.output_sum, arrivals=arrivals, prompt_tokens=np.full(len(arrivals), PROMPT),
                      output_tokens=np.full(len(arrivals), OUTPUT))
    return trace


CALM = SpotMarket()  # no reclaims, no outages


def settings(market: SpotMarket = CALM, seed: int = 1, cold_start: float = COLD_START) -> SimSettings:
    return SimSettings(capacity=LLAMA_3_1_8B_H100, cold_start_s=cold_start, seed=seed, spot=market)


def fixed_share(spec):
    """The spec with each replica at a fixed 80 % of its limit: a steady load measured as steady
    would run at up to 95 % (policy/headroom.py) and need one replica fewer than these counts."""
    targets = spec.scaling.targets.model_copy(update={"throughput_max": spec.scaling.targets.throughput})
    return spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"targets": targets})})


def spot_policy(spec, cold_start: float = COLD_START) -> EbbtideSpotPolicy:
    return EbbtideSpotPolicy(spec, learned_capacity=CAPACITY, startup_seconds=cold_start)


def by_minute(run):
    """Per minute (the state at its last step): on-demand replicas, spot replicas, spot ready, ready."""
    t = run.timeline
    on_demand = [r - s for r, s in zip(t.replicas, t.spot, strict=True)]
    return on_demand, t.spot, t.spot_ready, t.ready


def test_reclaimed_spot_replicas_are_replaced_and_on_demand_covers_them():
    """3 of 4 spot replicas get a reclaim notice at minute 60: on-demand covers them at the next
    tick; with a notice (120 s) longer than a cold start (100 s here) the cover is ready before
    they go, so the service never runs short. The spot Deployment recreates them when they are
    gone, and the cover is given back a scale-down window after the replacements are ready.
    Once the cover serves, the reclaimed replicas leave the Service and finish their requests
    before their nodes go: none is cut and retried."""
    spec = fixed_share(spec_with(enabled=True, on_demand_base=1))
    trace = steady_trace(0.7 * 5 * SATURATION, 2 * 3600)  # 5 replicas at 88 % of the core's target
    market = SpotMarket(notice_s=120, reclaims=((3600.0, 3),))
    run = simulate(trace, spot_policy(spec, cold_start=100), settings(market, cold_start=100))
    on_demand, spot, spot_ready, ready = by_minute(run)  # index i: the state at 60 (i + 1) - 5 s
    give_back = spec.scaling.behavior.scale_down.stabilization_seconds

    assert (on_demand[59], spot[59], spot_ready[59]) == (1, 4, 4), "steady before: base 1, the rest on spot"
    assert on_demand[60] == 4, "the reclaim notice makes on-demand cover the 3 at once"
    assert ready[61] == 8, "the cover is ready while the reclaimed replicas still serve"
    assert (spot[62], spot_ready[62], on_demand[62]) == (4, 1, 4), "gone, and recreated by the spot Deployment"
    assert spot_ready[63] == 4, "the replacements are ready a cold start later"
    # The cover stays until the replacements are ready, then for one scale-down window.
    replaced = next(m for m in range(62, len(spot_ready)) if spot_ready[m] == 4)
    back = replaced + int(give_back // 60)
    assert all(on_demand[m] == 4 for m in range(60, back - 1)), on_demand[58:back + 3]
    assert on_demand[back + 1] == 1, "the cover is given back a scale-down window after the replacements are ready"
    assert min(ready) >= 5 and max(r - s for r, s in zip(run.timeline.replicas, spot, strict=True)) == 4
    assert run.spot.reclaim_events == 1 and run.spot.replicas_reclaimed == 3
    assert run.spot.requests_retried == 0, "drained within the notice"
    assert report.summarize(run, spec).slo_attainment >= 0.999


def test_during_an_outage_on_demand_carries_the_load_and_no_request_is_lost():
    """Request by request: no spot capacity is to be had from minute 5 to 20, and the outage
    begins by reclaiming every spot replica (the reclaim planned at minute 6 finds none left). The replacements stay Pending (not charged), on-demand covers
    them after the pending timeout, every request is served in the end, and once the cover is
    ready the SLO holds again with no spot replica at all."""
    spec = spec_with(enabled=True, on_demand_base=1, pending_timeout_seconds=120)
    seconds, quiet = 30 * 60, 27 * 60
    trace = steady_trace(0.6 * 3 * SATURATION, seconds, per_request=True, quiet_after=quiet)
    market = SpotMarket(notice_s=30, outages=((300.0, 1200.0),), reclaims=((360.0, 10),))
    run = simulate(trace, spot_policy(spec), settings(market))
    on_demand, spot, spot_ready, ready = by_minute(run)

    assert (on_demand[4], spot[4], spot_ready[4]) == (1, 2, 2)
    outage = range(14, 20)  # minutes 15 to 20: the cover has started
    assert all(spot_ready[m] == 0 for m in outage), "no spot capacity: the replacements stay Pending"
    assert all(ready[m] >= 3 and ready[m] == on_demand[m] for m in outage), "on-demand carries the load"
    assert on_demand[-1] == 1 and spot_ready[-1] == 2, "given back once spot is back"
    assert run.spot.requests_retried > 0
    # Nothing lost: every request finished, and its tokens counted once.
    arrival, ttft, itl, weight = run.records.arrays()
    assert len(arrival) == trace.requests and (itl > 0).all()
    assert run.tokens_served == pytest.approx(trace.requests * (PROMPT + OUTPUT))
    late = (arrival >= 15 * 60) & (arrival < 20 * 60)
    assert report.slo_met(ttft[late], itl[late], spec).mean() >= 0.99, "the cover meets the SLO on its own"
    # Pending replicas cost nothing: the two spot replicas are charged until their reclaim (the
    # outage's start, 300 s, + 30 s notice), their replacements from the end of the outage; the
    # spot replicas the core asked for during it never got a node.
    spot_hours = report.summarize(run, spec).gpu_hours_by_type["spot"]
    assert spot_hours == pytest.approx(2 * (330 + seconds - 1200) / 3600, abs=0.002)


def test_without_the_fallback_an_outage_breaks_the_slo():
    """The same outage as above: with every replica on spot and nothing covering, requests wait
    for spot to come back; with the on-demand fallback, once the cover has started (one cold
    start after the reclaim), they are served within the SLO."""
    spec = spec_with(enabled=True, on_demand_base=1, pending_timeout_seconds=120)
    seconds, quiet = 30 * 60, 27 * 60
    trace = steady_trace(0.6 * 3 * SATURATION, seconds, per_request=True, quiet_after=quiet)
    market = SpotMarket(notice_s=30, outages=((300.0, 1200.0),))
    met = {}
    for policy in (spot_policy(spec), SpotOnlyPolicy(spec, learned_capacity=CAPACITY, startup_seconds=COLD_START)):
        run = simulate(trace, policy, settings(market))
        arrival, ttft, itl, _ = run.records.arrays()
        during = (arrival >= 330 + COLD_START + 60) & (arrival < 20 * 60)
        met[policy.name] = report.slo_met(ttft[during], itl[during], spec).mean()
        if policy.name == "spot-only":
            assert report.summarize(run, spec).gpu_hours_by_type["on-demand"] == 0.0
    assert met["spot-only"] < 0.5 and met["ebbtide-spot"] >= 0.99, met


@dataclass
class FixedPlacement(SimulatedPolicy):
    """A fixed fleet on two Deployments: what the fleet does, without a policy moving it."""

    on_demand: int
    spot: int
    name: str = "fixed"
    interval_s: float = 15.0
    uses_spot: bool = True

    def start(self, guess: int, now: float) -> dict[str, int]:
        return {ON_DEMAND: self.on_demand, SPOT: self.spot}

    def orders(self, view) -> Orders:
        return Orders({ON_DEMAND: self.on_demand, SPOT: self.spot})


def test_wasted_gpu_time_of_reclaimed_requests_is_charged():
    """The GPU time spent on requests in flight on a reclaimed replica is in the bill, and they
    are served again: a fixed fleet pays the same GPU time with or without reclaims (nothing is
    refunded) for the same tokens; Ebbtide on spot pays more with reclaims than without (same
    seed), for the cover and the replacements' cold starts."""
    trace = steady_trace(0.6 * 4 * SATURATION, 15 * 60, per_request=True, quiet_after=13 * 60)
    calm = simulate(trace, FixedPlacement(1, 3), settings())
    stormy = simulate(trace, FixedPlacement(1, 3), settings(SpotMarket(reclaims=((300.0, 2), (600.0, 1)))))
    assert stormy.spot.requests_retried > 0
    assert stormy.gpu_seconds[SPOT] == calm.gpu_seconds[SPOT] == 3 * trace.duration_s
    assert stormy.tokens_served == calm.tokens_served == trace.requests * (PROMPT + OUTPUT)

    spec = spec_with(enabled=True, on_demand_base=1)
    week_day = steady_trace(0.7 * 6 * SATURATION, 6 * 3600)
    market = SpotMarket(preemptions_per_hour=1.0, burst=2.0, notice_s=120)
    without = report.summarize(simulate(week_day, spot_policy(spec), settings(seed=3)), spec)
    stormy_run = simulate(week_day, spot_policy(spec), settings(market, seed=3))
    with_reclaims = report.summarize(stormy_run, spec)
    assert stormy_run.spot.replicas_reclaimed >= 3 and stormy_run.spot.requests_retried > 0
    assert with_reclaims.cost_usd > without.cost_usd
    assert with_reclaims.gpu_hours_by_type["on-demand"] > without.gpu_hours_by_type["on-demand"]


def test_fluid_and_request_models_retry_the_same_requests():
    """A reclaim in both serving models: the requests retried (in flight on the replica) agree
    within 25 %, and the fluid model still records every request once."""
    trace = steady_trace(0.5 * 4 * SATURATION, 10 * 60, per_request=True)
    market = SpotMarket(reclaims=((240.0, 2),))
    exact = simulate(trace, FixedPlacement(1, 3), settings(market), per_request=True)
    fluid = simulate(trace, FixedPlacement(1, 3), settings(market), per_request=False)
    assert fluid.spot.requests_retried == pytest.approx(exact.spot.requests_retried, rel=0.25)
    assert fluid.records.arrays()[3].sum() == pytest.approx(trace.requests)


@pytest.mark.parametrize("base", [0, 1])
def test_spot_is_cheaper_than_on_demand_by_the_price_ratio_on_a_steady_load(base):
    spec = spec_with(enabled=True, on_demand_base=base)
    trace = steady_trace(0.7 * 6 * SATURATION, 3 * 3600)
    on_demand = report.summarize(
        simulate(trace, EbbtidePolicy(spec, learned_capacity=CAPACITY, startup_seconds=COLD_START), settings()), spec)
    spot = report.summarize(simulate(trace, spot_policy(spec), settings()), spec)
    assert spot.gpu_hours == pytest.approx(on_demand.gpu_hours, rel=0.02), "the same fleet, on other capacity"
    assert spot.gpu_hours_by_type["on-demand"] == pytest.approx(base * 3, abs=0.05)
    prices = spec.pricing
    expected = (base * prices.on_demand_per_gpu_hour + (on_demand.gpu_hours / 3 - base) * prices.spot_per_gpu_hour) \
        / (on_demand.gpu_hours / 3 * prices.on_demand_per_gpu_hour)
    assert spot.cost_usd / on_demand.cost_usd == pytest.approx(expected, rel=0.03)
    if base == 0:
        assert spot.cost_usd / on_demand.cost_usd == pytest.approx(
            prices.spot_per_gpu_hour / prices.on_demand_per_gpu_hour, rel=0.03)
    assert spot.slo_attainment >= 0.99 and spot.usd_per_million_tokens < on_demand.usd_per_million_tokens


def test_a_replay_with_spot_is_deterministic_for_a_seed():
    spec = spec_with(enabled=True, on_demand_base=1)
    trace = steady_trace(0.7 * 6 * SATURATION, 6 * 3600)
    market = SpotMarket(preemptions_per_hour=1.0, burst=2.0, notice_s=120, outages=((7200.0, 9000.0),))

    def replay(seed):
        run = simulate(trace, spot_policy(spec), settings(market, seed=seed))
        return run.gpu_seconds, run.spot, run.timeline.replicas, run.timeline.spot_ready, run.scale_actions

    first = replay(5)
    assert first[1].reclaim_events >= 2
    assert replay(5) == first
    assert replay(6) != first


def test_outage_option_parses_durations_and_names_the_mistake():
    assert parse_outage("1h@30h") == (30 * 3600.0, 31 * 3600.0)
    assert parse_outage("90m@1.5d") == (1.5 * 86400, 1.5 * 86400 + 5400)
    assert parse_outage("600@0") == (0.0, 600.0)
    with pytest.raises(ValueError, match="DURATION@START"):
        parse_outage("1h")
    with pytest.raises(ValueError, match="not a duration"):
        parse_outage("an hour@2h")


def test_simulate_command_shows_spot_rows(tmp_path):
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, "-m", "ebbtide.cli", "simulate", "--trace", "conv-week", "--hours", "6",
                             "--policies", "ebbtide", "ebbtide-spot", "--spot-preemptions-per-hour", "1",
                             "--spot-burst", "2", "--spot-outage", "1h@2h", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, env=CLI_ENV)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    ebbtide, spot = document["policies"]["ebbtide"], document["policies"]["ebbtide-spot"]
    assert spot["gpu_hours_by_type"]["spot"] > 0 and ebbtide["gpu_hours_by_type"]["spot"] == 0
    assert spot["spot_replicas_reclaimed"] > 0 and spot["cost_usd"] < ebbtide["cost_usd"]
    assert document["settings"]["spot"]["outages"] == [[7200.0, 10800.0]]
    assert document["settings"]["spot_enabled_by_simulator"] is True
    assert "ebbtide-spot" in result.stdout and "placement.spot enabled" in result.stdout
    assert "reclaim events" in result.stdout


# -- spot with the sleep pool ---------------------------------------------------------------------
# Six replicas' worth for 15 minutes, then one for 45: with an on-demand base of 3, the busy
# fleet is 3 on demand and the rest on spot; the quiet one needs a single on-demand replica.
BUSY_THEN_QUIET = ((6, 15), (1, 45))


def spot_and_sleep():
    """Spot with an on-demand base of 3 and a sleep pool of 4 per Deployment (as the operator
    keeps one pool per Deployment); sleepers do not expire within the replay."""
    spec = spec_with(enabled=True, on_demand_base=3)
    sleep = spec.sleep.model_copy(update={"enabled": True, "idle_seconds": 30, "max_pool": 4, "ttl_seconds": 7200})
    return spec.model_copy(update={"sleep": sleep})


def test_surplus_sleeps_on_both_capacity_types_and_spot_sleepers_cost_the_spot_price():
    spec = spot_and_sleep()
    run = simulate(phases(*BUSY_THEN_QUIET), spot_policy(spec), settings())
    on_demand, spot, spot_ready, ready = by_minute(run)
    asleep = run.timeline.asleep
    # Busy: the base on demand, the rest on spot (and the warm start's one replica too many asleep).
    assert (on_demand[10], spot_ready[10], ready[10], spot[10], asleep[10]) == (3, 3, 6, 4, 1)
    # Quiet: one on-demand replica awake; the other two on-demand and every spot replica asleep.
    assert (ready[-1], spot_ready[-1], on_demand[-1], spot[-1], asleep[-1]) == (1, 0, 3, 4, 6)
    asleep_s, asleep_spot_s = run.gpu_seconds[ASLEEP], run.gpu_seconds[ASLEEP_SPOT]
    assert 0 < asleep_spot_s < asleep_s
    # Sampled once a minute, the spot replicas not ready are the spot sleepers (nothing starts).
    assert asleep_spot_s / 60 == pytest.approx(sum(s - r for s, r in zip(spot, spot_ready, strict=True)), abs=2)
    result = report.summarize(run, spec)
    prices, kept = spec.pricing, 1 - spec.sleep.reclaimed_fraction
    hours = {kind: seconds / 3600 for kind, seconds in run.gpu_seconds.items()}
    assert result.cost_usd == pytest.approx(
        hours["on-demand"] * prices.on_demand_per_gpu_hour + hours["spot"] * prices.spot_per_gpu_hour
        + kept * ((hours[ASLEEP] - hours[ASLEEP_SPOT]) * prices.on_demand_per_gpu_hour
                  + hours[ASLEEP_SPOT] * prices.spot_per_gpu_hour), abs=0.01)


def test_a_reclaimed_spot_sleeper_is_gone_and_its_asleep_time_stops():
    """Minute 40: two of the four spot sleepers are reclaimed (30 s notice). They are charged
    asleep until then, and nothing after: the spot ReplicaSet recreates them, and the next
    pool plan deletes the replacements while they start (surplus: the spot target is 0)."""
    spec = spot_and_sleep()
    trace = phases(*BUSY_THEN_QUIET)
    calm = simulate(trace, spot_policy(spec), settings())
    market = SpotMarket(notice_s=30, reclaims=((2400.0, 2),))
    stormy = simulate(trace, spot_policy(spec), settings(market))
    assert stormy.spot.replicas_reclaimed == 2 and stormy.spot.requests_retried == 0
    assert calm.timeline.spot[-1] == 4 and stormy.timeline.spot[-1] == 2 and stormy.timeline.asleep[-1] == 4
    assert stormy.timeline.spot[41:] == [2] * (len(trace.counts) // 60 - 41)
    ended = 2 * (trace.duration_s - 2430.0)  # two sleepers' time from the reclaim to the end
    assert calm.gpu_seconds[ASLEEP_SPOT] - stormy.gpu_seconds[ASLEEP_SPOT] == pytest.approx(ended)
    assert calm.gpu_seconds[ASLEEP] - stormy.gpu_seconds[ASLEEP] == pytest.approx(ended)
    assert stormy.gpu_seconds[SPOT] - calm.gpu_seconds[SPOT] <= 2 * spec.scaling.behavior.interval_seconds
