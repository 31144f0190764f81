"""The peers behave as their documentation says, on small synthetic inputs; the hindsight sweep
keeps the cheapest setting that meets the bar."""

import numpy as np

from ebbtide.api.spec import ScheduleWindow
from ebbtide.policy.observation import FleetState, PodSignals, Signals
from ebbtide.sim.capacity import LLAMA_3_1_8B_H100
from ebbtide.sim.catalog import build_policies
from ebbtide.sim.fleet import SimSettings
from ebbtide.sim.inputs import load_spec
from ebbtide.sim.peers.base import ScheduleFloors
from ebbtide.sim.peers.dynamo import DynamoPlanner, arima_110
from ebbtide.sim.peers.hpa import HpaInflight, HpaTokens
from ebbtide.sim.peers.tuning import Tuned, sweep
from ebbtide.sim.peers.wva import Wva
from ebbtide.sim.traces import Trace


def pods(now, n, kv=0.0, waiting=0.0, running=0.0, tokens=None):
    """n pods alike; `tokens` is the service's total token rate."""
    return Signals(source="test", sampled_at=now, tokens_per_second=tokens,
                   pods=tuple(PodSignals(pod=f"p{i}", sampled_at=now, kv_cache_usage=kv, waiting=waiting,
                                         running=running) for i in range(n)))


def test_hpa_tokens_holds_within_the_10_percent_tolerance_and_scales_past_it():
    hpa = HpaTokens(min_replicas=1, max_replicas=20, target=10_000)
    assert hpa.decide(pods(0, 4, tokens=4 * 10_900), FleetState(4, 4), 0) == 4  # 9 % over: hold
    assert hpa.decide(pods(15, 4, tokens=4 * 12_000), FleetState(4, 4), 15) == 5  # ceil(4 x 1.2)


def test_hpa_counts_starting_pods_at_zero_when_growing_and_holds_if_that_reverses_the_direction():
    hpa = HpaTokens(min_replicas=1, max_replicas=20, target=10_000)
    # 4 ready at 1.5x, 4 starting at 0: 6 / 8 = 0.75 of the target, the other way: hold.
    assert hpa.decide(pods(0, 4, tokens=4 * 15_000), FleetState(8, 4, starting=4), 0) == 8
    # 4 ready at 3x, 2 starting: 12 / 6 = 2x -> ceil(2 x 6) = 12.
    assert hpa.decide(pods(15, 4, tokens=4 * 30_000), FleetState(6, 4, starting=2), 15) == 12


def test_hpa_inflight_keeps_the_highest_recommendation_of_the_last_five_minutes():
    hpa = HpaInflight(min_replicas=1, max_replicas=20, target=30)
    assert hpa.decide(pods(0, 6, running=30), FleetState(6, 6), 0) == 6
    for t in range(15, 300, 15):  # the load halves: 3 replicas would do, 6 are kept for 300 s
        assert hpa.decide(pods(t, 6, running=12, waiting=3), FleetState(6, 6), t) == 6
    assert hpa.decide(pods(315, 6, running=12, waiting=3), FleetState(6, 6), 315) == 3


def wva_cycle(wva, t, n, kv, waiting=0.0, current=None, starting=0):
    return wva.decide(pods(t, n, kv=kv, waiting=waiting), FleetState(current or n + starting, n, starting), t)


def test_wva_adds_one_replica_per_30_s_cycle_however_saturated():
    wva = Wva(min_replicas=1, max_replicas=20)
    assert wva_cycle(wva, 0, 4, kv=0.95, waiting=40) == 5  # all saturated: +1, not the 8 HPA would ask
    assert wva_cycle(wva, 15, 4, kv=0.95, waiting=40, current=5) == 5  # between cycles: nothing new
    assert wva_cycle(wva, 30, 5, kv=0.95, waiting=40) == 6


def test_wva_skips_a_variant_with_starting_pods():
    wva = Wva(min_replicas=1, max_replicas=20)
    assert wva_cycle(wva, 0, 4, kv=0.95, waiting=40, starting=1) == 5  # holds at 5, nothing added


def test_wva_scales_down_only_if_the_rest_absorb_the_load():
    # 3 replicas at KV 0.5: on 2 they would run at 0.75, 0.05 below the 0.80 threshold (< 0.10 spare).
    held = Wva(min_replicas=1, max_replicas=20)
    for t in range(0, 400, 15):
        assert wva_cycle(held, t, 3, kv=0.5) == 3
    # At 0.3 they would run at 0.45 on 2: WVA asks for 2, the HPA under it follows after 300 s.
    wva = Wva(min_replicas=1, max_replicas=20)
    assert [wva_cycle(wva, t, 3, kv=0.3) for t in range(0, 300, 15)] == [3] * 20
    assert wva_cycle(wva, 300, 3, kv=0.3) == 2


def flat_trace(rate_per_s, seconds, prompt=1000, output=200):
    counts = np.full(seconds, rate_per_s)
    return counts, counts * float(prompt), counts * float(output)


def test_dynamo_planner_acts_every_180_s_on_its_predicted_rate_and_profile():
    counts, prompts, outputs = flat_trace(30, 3600)
    planner = DynamoPlanner(min_replicas=1, max_replicas=50, capacity=LLAMA_3_1_8B_H100, counts=counts,
                            prompt_sum=prompts, output_sum=outputs, epoch=0.0)
    per_replica = LLAMA_3_1_8B_H100.max_request_rate(1000, 200, 0.05)
    expected = int(np.ceil(30 / per_replica))
    assert expected > 2
    sizes = [planner.decide(Signals.missing("unread"), FleetState(2, 2), t) for t in range(0, 180, 15)]
    assert sizes == [2] * 12, "nothing before the first interval is observed"
    assert planner.decide(Signals.missing("unread"), FleetState(2, 2), 180) == expected
    # While replicas start it holds its last decision (does not stack another one).
    counts[180:], prompts[180:], outputs[180:] = 60, 60 * 1000.0, 60 * 200.0
    assert planner.decide(Signals.missing("unread"), FleetState(expected, 0, expected), 360) == expected
    assert planner.decide(Signals.missing("unread"), FleetState(expected, expected), 540) > expected


def test_arima_is_constant_with_few_points_and_follows_a_trend():
    assert arima_110([5.0, 7.0]) == 7.0
    assert abs(arima_110([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) - 7.0) < 0.02  # phi capped at 0.99


def test_peers_hold_the_specs_schedule_floor_one_cold_start_ahead():
    _, spec = load_spec(None)
    window = ScheduleWindow(name="one-am", cron="0 1 * * *", duration_minutes=30, timezone="UTC", min_replicas=5)
    spec = spec.model_copy(update={"schedules": [window]})
    hpa = HpaTokens(min_replicas=1, max_replicas=20, target=10_000, floors=ScheduleFloors(spec, lead_s=180))
    one_am = 1704070800.0  # 2024-01-01 01:00 UTC
    quiet = pods(0, 1, tokens=100.0)
    assert hpa.decide(quiet, FleetState(1, 1), one_am - 600) == 1
    assert hpa.decide(quiet, FleetState(1, 1), one_am - 120) == 5  # within one cold start of the window
    assert hpa.decide(quiet, FleetState(5, 5), one_am + 1200) == 5


def test_sweep_keeps_the_cheapest_setting_that_meets_the_bar():
    # Cost falls with the setting; the SLO holds up to 0.3, breaks at 0.5, holds again at 0.75.
    outcomes = {0.1: (10.0, 0.999), 0.2: (8.0, 0.995), 0.3: (7.5, 0.991), 0.5: (6.0, 0.95), 0.75: (5.0, 0.999),
                0.387: (7.0, 0.993), 0.44: (6.5, 0.98)}
    made = []

    def evaluate(policy):
        hours, slo = outcomes[policy]
        return None, hours, slo

    policy, _, tuning = sweep(lambda v: made.append(v) or v, (0.1, 0.2, 0.3, 0.5, 0.75), evaluate, "x")
    assert made == [0.1, 0.2, 0.3, 0.5, 0.387, 0.44], "stops at the first miss, then bisects"
    assert (policy, tuning.value, tuning.met) == (0.387, 0.387, True)


def test_tuned_peer_on_a_tiny_trace_meets_the_bar_and_nothing_cheaper_tried_does():
    seconds = 1200
    rng = np.random.default_rng(5)
    rate = np.where(np.arange(seconds) < 600, 20.0, 45.0)  # a step up after ten minutes
    counts = rng.poisson(rate)
    trace = Trace(name="tiny", duration_s=float(seconds), counts=counts, prompt_sum=counts * 1000.0,
                  output_sum=counts * 200.0)
    _, spec = load_spec(None)
    spec = spec.model_copy(update={"schedules": []})
    tuned = build_policies(["hpa-tokens-tuned"], spec, trace, LLAMA_3_1_8B_H100)[0]
    assert isinstance(tuned, Tuned)
    settings = SimSettings(capacity=LLAMA_3_1_8B_H100, cold_start_s=60.0)
    policy, _, tuning = tuned.tune(spec, trace, settings)
    assert policy.name == "hpa-tokens-tuned" and policy.target == tuning.value
    chosen = next(t for t in tuning.tried if t[0] == tuning.value)
    assert tuning.met and chosen[2] >= 0.99
    assert all(slo < 0.99 for _, hours, slo in tuning.tried if hours < chosen[1])
    assert len({t[2] >= 0.99 for t in tuning.tried}) == 2, "the tiny trace tells settings apart"


def test_simulate_records_each_peers_setting_and_the_sweep_and_says_the_floors(tmp_path):
    import json

    from tests.cli import ebbtide

    out = tmp_path / "out.json"
    result = ebbtide("simulate", "--trace", "conv-week", "--hours", "1", "--json", out,
                     "--policies", "wva", "wva-tuned")
    assert result.returncode == 0, result.stderr
    policies = json.loads(out.read_text())["policies"]
    assert policies["wva"]["default"] == {"parameter": "kv_cache_threshold", "value": 0.8}
    tuned = policies["wva-tuned"]["tuned"]
    assert tuned["parameter"] == "kv_cache_threshold" and tuned["value"] in [t["value"] for t in tuned["tried"]]
    assert "schedule floors" in result.stdout and "wva-tuned: kv_cache_threshold" in result.stdout
