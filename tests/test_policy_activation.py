"""activate(): waking a service from zero awake replicas on the activation query."""

from ebbtide.api.manifest import parse_spec
from ebbtide.policy.activation import ACTIVATED, activate
from ebbtide.policy.autoscaling import decide
from ebbtide.policy.decision import Memory
from ebbtide.policy.observation import FleetState, PodSignals, Signals

NOW = 1_800_000_000.0
SPEC = parse_spec({"model": {"name": "m"}, "replicas": {"min": 0, "max": 4},
                   "scaling": {"activation": {"query": "sum(gateway_pending_requests)", "threshold": 0.5}}})


def at_zero(fleet: FleetState, now: float = NOW):
    return decide(SPEC, Signals.missing("no pods"), fleet, Memory.empty(now - 3600), now)


def test_a_held_request_wakes_a_sleeper_and_is_remembered_for_the_scale_down_window():
    fleet = FleetState(current=0, ready=0, asleep=1)
    decision = activate(at_zero(fleet), SPEC, fleet, 2.0, NOW)
    assert (decision.desired, decision.reason) == (1, ACTIVATED)
    assert "reads 2 > 0.5" in decision.message and "waking a sleeping replica" in decision.message
    # Next tick the woken replica shows no load yet: the core must keep it for the window.
    woken = FleetState(current=1, ready=1)
    idle = Signals(source="test", sampled_at=NOW + 1, pods=(PodSignals(pod="p0", sampled_at=NOW + 1),),
                   tokens_per_second=0.0)
    after = decide(SPEC, idle, woken, decision.memory, NOW + 1)
    assert after.desired == 1, after.message


def test_nothing_is_started_below_the_threshold_or_while_a_replica_is_awake():
    asleep = FleetState(current=0, ready=0)
    assert activate(at_zero(asleep), SPEC, asleep, 0.5, NOW).desired == 0
    assert activate(at_zero(asleep), SPEC, asleep, None, NOW).desired == 0
    awake = FleetState(current=1, ready=1)
    decision = decide(SPEC, Signals.missing("x"), awake, Memory.empty(NOW - 3600), NOW)
    assert activate(decision, SPEC, awake, 5.0, NOW).reason != ACTIVATED
    cold = activate(at_zero(asleep), SPEC, asleep, 3.0, NOW)
    assert cold.desired == 1 and "starting a replica" in cold.message
