"""The one tick (policy/tick.py): what it decides from one observation and the state it was handed."""

from __future__ import annotations

from pathlib import Path

from ebbtide.api.manifest import load_manifests
from ebbtide.api.spec import Activation, ScheduleWindow
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.policy.observation import Deployments, Observation, Pod, PodSignals, Signals
from ebbtide.policy.profile import Profile
from ebbtide.policy.tick import TickState, known_profile, tick

NOW = 1_715_594_400.0  # Monday 2024-05-13 10:00 UTC
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "spot-sleep.yaml"
OFF_PEAK = ScheduleWindow(name="always", cron="0 0 * * *", duration_minutes=1440, timezone="UTC", min_replicas=4,
                          off_peak=True)


def example(**changes):
    ((_, spec),) = load_manifests(EXAMPLE)
    return spec.model_copy(update=changes)


def busy(*pods: Pod) -> Signals:
    return Signals(source="prometheus", sampled_at=NOW - 5, tokens_per_second=1000.0 * len(pods),
                   pods=tuple(PodSignals(p.name, NOW - 5, running=3.0, kv_cache_usage=0.2) for p in pods))


def seen(pods: tuple[Pod, ...], deployments: Deployments, **more) -> Observation:
    awake = tuple(p for p in pods if p.state == "awake")
    return Observation(signals=more.pop("signals", busy(*awake)), pods=pods, deployments=deployments, **more)


FOUR = (Pod("a"), Pod("b", SPOT), Pod("c", SPOT), Pod("d", SPOT))


def test_off_peak_the_whole_target_goes_to_spot():
    """Consolidation drops the on-demand base: the target of 4 (and the spare) on spot, and the
    on-demand replica, surplus now, leaves the Service on its way to sleep."""
    spec = example(schedules=[OFF_PEAK])
    turn = tick(spec, seen(FOUR, Deployments(1, 3)), TickState.start(NOW, target=4), NOW)
    assert turn.decision.off_peak and turn.decision.desired == 4
    assert (turn.placed.on_demand, turn.placed.spot) == (0, 5)
    assert turn.pools[ON_DEMAND].draining == ("a",) and turn.pools[SPOT].create == 2
    assert turn.replicas == {ON_DEMAND: 1, SPOT: 5}  # the draining replica stays until it sleeps


def test_by_day_the_on_demand_base_stays():
    spec = example(schedules=[OFF_PEAK.model_copy(update={"off_peak": False})])
    turn = tick(spec, seen(FOUR, Deployments(1, 3)), TickState.start(NOW, target=4), NOW)
    assert (turn.placed.on_demand, turn.placed.spot) == (1, 4)


def test_a_scale_that_could_not_be_set_keeps_the_last_applied_size():
    spec = example(schedules=[OFF_PEAK])
    state = TickState.start(NOW, target=3)
    turn = tick(spec, seen(FOUR[:3], Deployments(1, 2)), state, NOW)
    assert turn.news and turn.state.target == 4 and [e.reason for e in turn.events] == ["ScaledUp"]
    unapplied = turn.unapplied()
    assert not unapplied.news and unapplied.events == () and unapplied.state.target == 3
    assert unapplied.state.memory == turn.state.memory, "what the core learned is kept either way"


def test_advice_is_told_once_and_never_taken_as_the_size():
    spec = example(schedules=[OFF_PEAK], mode="Advisory")
    state = TickState.start(NOW)
    first = tick(spec, seen(FOUR[:3], Deployments(1, 2)), state, NOW)
    again = tick(spec, seen(FOUR[:3], Deployments(1, 2)), first.state, NOW + 15)
    assert [e.reason for e in first.events] == ["AdvisoryScaleUp"] and first.state.target is None
    assert again.decision.changed and not again.news and again.events == ()


def test_the_activation_query_counts_only_while_nothing_is_awake():
    spec = example(replicas=example().replicas.model_copy(update={"min": 0}),
                   scaling=example().scaling.model_copy(update={"activation": Activation(query="q", threshold=0)}))
    asleep = (Pod("a", state="asleep", serving=False, asleep_since=NOW - 600),)
    woken = tick(spec, seen(asleep, Deployments(1, 0), signals=Signals.missing("no samples"), activation=3.0),
                 TickState.start(NOW - 600, target=0), NOW)
    assert (woken.decision.desired, woken.decision.reason) == (1, "Activated")
    assert woken.pools[ON_DEMAND].wake == ("a",)
    awake = tick(spec, seen((Pod("a"),), Deployments(1, 0), activation=3.0), TickState.start(NOW, target=1), NOW)
    assert "activation" not in awake.decision.signals


def test_the_current_size_is_the_deployment_less_its_drains_without_spot_or_sleep_and_the_target_with_them():
    behavior = example().scaling.behavior
    no_drain = example().scaling.model_copy(update={"behavior": behavior.model_copy(update={
        "scale_down": behavior.scale_down.model_copy(update={"drain_seconds": 0})})})
    plain = example(placement=example().placement.model_copy(update={"spot": example().placement.spot.model_copy(
        update={"enabled": False})}), sleep=example().sleep.model_copy(update={"enabled": False}), scaling=no_drain)
    pods = (Pod("a"), Pod("b"))
    assert tick(plain, seen(pods, Deployments(3)), TickState.start(NOW, target=2), NOW).fleet.current == 3
    # Draining before removal, the Deployment holds the replicas on their way out too; a hand
    # scale still counts.
    draining = plain.model_copy(update={"scaling": example().scaling})
    leaving = (*pods, Pod("c", serving=False, left_service_at=NOW - 10))
    assert tick(draining, seen(leaving, Deployments(3)), TickState.start(NOW, target=2), NOW).fleet.current == 2
    assert tick(draining, seen(pods, Deployments(1)), TickState.start(NOW, target=2), NOW).fleet.current == 1
    assert tick(example(), seen(pods, Deployments(3, 1)), TickState.start(NOW, target=2), NOW).fleet.current == 2
    # No target yet: estimated from the Deployments, less the spare and the sleepers.
    assert tick(example(), seen(pods, Deployments(1, 2)), TickState.start(NOW), NOW).fleet.current == 2


def test_the_profile_held_is_used_and_a_stored_one_only_when_none_is_held():
    predictive = example().warmup.predictive.model_copy(update={"enabled": True, "timezone": "Europe/Paris"})
    spec = example(warmup=example().warmup.model_copy(update={"predictive": predictive}))
    held = Profile.empty(predictive.lookback_weeks, "Europe/Paris")
    stale = Profile.empty(predictive.lookback_weeks, "UTC")
    stored = Profile.empty(predictive.lookback_weeks, "Europe/Paris")
    assert known_profile(spec, TickState.start(NOW, profile=held)) is held
    assert known_profile(spec, TickState.start(NOW, profile=stale)) is None, "another zone's bins: read again"
    turn = tick(spec, seen(FOUR, Deployments(1, 3), stored_profile=stored), TickState.start(NOW, profile=stale), NOW)
    assert turn.state.profile is not None and turn.state.profile.updated == NOW, "learns into the stored one"
    waiting = tick(spec, seen(FOUR, Deployments(1, 3)), TickState.start(NOW, profile=stale), NOW)
    assert waiting.state.profile is stale, "nothing stored read yet: pre-warming waits"
