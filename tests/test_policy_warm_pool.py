"""The warm pool: wake before create, bounded pool, TTL, deletion order."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebbtide.api.spec import SleepPolicy
from ebbtide.policy.warm_pool import Replica, plan_pool

NOW = 100_000.0
POLICY = SleepPolicy(enabled=True, idle_seconds=120, max_pool=2, ttl_seconds=1800)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def awake(name: str, idle: float | None = None) -> Replica:
    return Replica(name, "awake", idle_since=None if idle is None else NOW - idle)


def asleep(name: str, age: float) -> Replica:
    return Replica(name, "asleep", asleep_since=NOW - age)


def starting(name: str) -> Replica:
    return Replica(name, "starting")


def test_wakes_sleepers_before_creating():
    plan = plan_pool(4, [awake("a"), asleep("s1", 100), asleep("s2", 900)], POLICY, NOW)
    assert plan.wake == ("s2", "s1")  # oldest first
    assert plan.create == 1 and plan.replicas == 4 and not plan.delete
    assert set(plan.serving) == {"a", "s1", "s2"}


def test_surplus_idle_long_enough_sleeps_else_drains():
    plan = plan_pool(1, [awake("a", idle=600), awake("b", idle=30), awake("c")], POLICY, NOW)
    assert plan.sleep == ("a",) and plan.draining == ("b",) and plan.serving == ("c",)
    assert plan.replicas == 3 and not plan.delete
    assert any("putting a to sleep" in r for r in plan.reasons)


def test_the_plan_says_why_per_pod_even_when_one_name_prefixes_another():
    """Events quote what the plan said about their pod: keyed by pod, so "chat-1" is never
    told what was said about "chat-12"."""
    plan = plan_pool(1, [awake("chat-12", idle=600), awake("chat-1", idle=30), awake("chat-2")], POLICY, NOW)
    assert plan.about("chat-12").startswith("putting chat-12 to sleep")
    assert plan.about("chat-1").startswith("draining chat-1:")
    assert plan.about("chat-2") == "chat-2"  # nothing said: serving on


def test_full_pool_deletes_surplus_and_ttl_deletes_sleepers():
    plan = plan_pool(1, [awake("a", idle=600), awake("b"), asleep("s1", 100), asleep("s2", 200)], POLICY, NOW)
    assert plan.delete == ("a",) and plan.replicas == 3
    plan = plan_pool(1, [awake("b"), asleep("old", 2000), asleep("young", 10)], POLICY, NOW)
    assert plan.delete == ("old",) and plan.replicas == 2


def test_sleep_disabled_and_no_drain_deletes_surplus_at_once():
    plan = plan_pool(1, [awake("a", idle=5), awake("b")], SleepPolicy(enabled=False), NOW)
    assert plan.delete == ("a",) and plan.replicas == 1 and not plan.sleep


OFF = SleepPolicy(enabled=False)


def leaving(name: str, out_for: float, drained: bool = False) -> Replica:
    return Replica(name, "awake", left_at=NOW - out_for, drained=drained)


def test_surplus_leaves_the_service_and_goes_only_once_drained():
    plan = plan_pool(1, [awake("a", idle=5), awake("b")], OFF, NOW, drain_seconds=300)
    assert plan.draining == ("a",) and not plan.delete and plan.replicas == 2 and plan.serving == ("b",)
    assert "draining a before deleting it" in plan.about("a")
    # Still busy a minute later: it keeps draining, and a replica already out goes first.
    plan = plan_pool(1, [awake("a", idle=5), leaving("b", 60)], OFF, NOW, drain_seconds=300)
    assert plan.draining == ("b",) and plan.serving == ("a",) and not plan.delete
    plan = plan_pool(1, [awake("a"), leaving("b", 60, drained=True)], OFF, NOW, drain_seconds=300)
    assert plan.delete == ("b",) and plan.replicas == 1 and "drained" in plan.about("b")
    assert plan.deletion_costs["b"] < plan.deletion_costs["a"]


def test_the_drain_deadline_bounds_the_wait():
    plan = plan_pool(1, [awake("a"), leaving("b", 301)], OFF, NOW, drain_seconds=300)
    assert plan.delete == ("b",) and "drain deadline (300 s) passed" in plan.about("b")


def test_a_full_pool_drains_before_deleting_and_the_last_replica_never_leaves():
    full = POLICY.model_copy(update={"max_pool": 1})
    plan = plan_pool(1, [awake("a", idle=600), awake("b"), asleep("s", 60)], full, NOW, drain_seconds=300)
    assert plan.draining == ("a",) and not plan.delete
    keeper = POLICY.model_copy(update={"max_pool": 0})
    plan = plan_pool(0, [awake("a", idle=600)], keeper, NOW, drain_seconds=300)
    assert plan.serving == ("a",) and not plan.draining and not plan.delete
    # Without sleep mode min 0 is scale to zero: the last one drains and goes too.
    plan = plan_pool(0, [awake("a", idle=600)], OFF, NOW, drain_seconds=300)
    assert plan.draining == ("a",) and plan.replicas == 1


def test_surplus_cancels_starting_replicas_first():
    plan = plan_pool(1, [awake("a"), starting("n1"), starting("n2")], POLICY, NOW)
    assert set(plan.delete) == {"n1", "n2"} and plan.replicas == 1


def test_ttl_deletion_waits_for_starting_replicas():
    plan = plan_pool(2, [awake("a"), starting("n"), asleep("old", 5000)], POLICY, NOW)
    assert not plan.delete and plan.replicas == 3


def test_last_replica_sleeps_unless_scale_to_zero():
    plan = plan_pool(0, [awake("a", idle=600)], POLICY.model_copy(update={"max_pool": 0}), NOW)
    assert plan.replicas == 1 and plan.serving == ("a",)  # no pool: kept awake
    plan = plan_pool(0, [asleep("s", 5000)], POLICY, NOW)
    assert plan.replicas == 1 and not plan.delete  # TTL does not apply to the last one
    plan = plan_pool(0, [asleep("s", 5000)], POLICY, NOW, allow_scale_to_zero=True)
    assert plan.replicas == 0 and plan.delete == ("s",)
    plan = plan_pool(0, [awake("a", idle=600), asleep("s", 5000)], POLICY, NOW)
    assert plan.replicas == 1 and plan.sleep == ("a",) and plan.delete == ("s",)


def test_deletion_costs_put_sleepers_first_then_idle_longest():
    plan = plan_pool(3, [awake("busy"), awake("idle-long", 100), awake("idle-short", 10),
                         asleep("s", 60)], POLICY, NOW)
    costs = plan.deletion_costs
    assert costs["s"] < costs["idle-long"] < costs["idle-short"] < costs["busy"]


replica_lists = st.lists(
    st.one_of(
        st.builds(lambda idle, out, drained: Replica("", "awake", idle_since=None if idle is None else NOW - idle,
                                                     left_at=None if out is None else NOW - out,
                                                     drained=out is not None and drained),
                  st.one_of(st.none(), st.floats(0, 5000)), st.one_of(st.none(), st.floats(0, 600)), st.booleans()),
        st.builds(lambda age: Replica("", "asleep", asleep_since=NOW - age), st.floats(0, 5000)),
        st.just(Replica("", "starting")),
    ),
    max_size=10,
).map(lambda rs: [Replica(f"r{i}", r.state, r.idle_since, r.asleep_since, left_at=r.left_at, drained=r.drained)
                 for i, r in enumerate(rs)])
policies = st.builds(lambda enabled, idle, pool, ttl: SleepPolicy(enabled=enabled, idle_seconds=idle,
                                                                   max_pool=pool, ttl_seconds=ttl),
                     st.booleans(), st.integers(0, 600), st.integers(0, 4), st.integers(0, 3000))


@FAST
@given(desired=st.integers(0, 12), replicas=replica_lists, policy=policies, to_zero=st.booleans(),
       drain=st.sampled_from([0, 300]))
def test_pool_invariants(desired, replicas, policy, to_zero, drain):
    plan = plan_pool(desired, replicas, policy, NOW, allow_scale_to_zero=to_zero, drain_seconds=drain)
    by_name = {r.name: r for r in replicas}
    remaining_asleep = ({r.name for r in replicas if r.state == "asleep"} - set(plan.wake)
                        - set(plan.delete)) | set(plan.sleep)
    # Accounting adds up.
    assert plan.replicas == len(replicas) - len(plan.delete) + plan.create >= 0
    assert plan.asleep == len(remaining_asleep)
    # The pool is bounded.
    assert len(remaining_asleep) <= (policy.max_pool if policy.enabled else 0)
    # Wake before create: never create while a sleeper stays asleep.
    if plan.create:
        assert not remaining_asleep
    # Desired awake capacity is met.
    assert len(plan.serving) + plan.starting + plan.create >= min(desired, len(replicas) + plan.create)
    assert len(plan.serving) + plan.starting + plan.create >= desired
    # Sleepers past TTL go, unless a replica starts or it is the last one.
    if not any(r.state == "starting" for r in replicas) and plan.replicas > 1:
        for name in remaining_asleep - set(plan.sleep):
            assert NOW - by_name[name].asleep_since < policy.ttl_seconds
    # Only awake replicas sleep, only sleepers wake; no replica is in two lists.
    assert all(by_name[n].state == "awake" for n in plan.sleep)
    assert all(by_name[n].state == "asleep" for n in plan.wake)
    moves = list(plan.sleep) + list(plan.wake) + list(plan.delete)
    assert len(moves) == len(set(moves))
    # With sleep mode the last replica is kept unless scale to zero is allowed; with no pool, it
    # stays in the Service (or on its way there).
    if replicas and not to_zero and policy.enabled:
        assert plan.replicas >= 1
        if not policy.max_pool:
            assert plan.serving or plan.starting or plan.create
    # Draining before removal: an awake replica goes only drained, or past its deadline.
    if drain:
        for name in plan.delete:
            r = by_name[name]
            assert r.state != "awake" or r.drained or (r.left_at is not None and NOW - r.left_at >= drain)
    # Deletion costs: every remaining pod ranked, deleted ones lowest, then sleepers.
    assert set(plan.deletion_costs) == set(by_name)
    costs = plan.deletion_costs
    if plan.delete and len(plan.delete) < len(by_name):
        assert max(costs[n] for n in plan.delete) < min(costs[n] for n in by_name if n not in plan.delete)
    awake_kept = set(plan.serving) | set(plan.draining)
    if remaining_asleep and awake_kept:
        assert max(costs[n] for n in remaining_asleep) < min(costs[n] for n in awake_kept)


def test_a_replica_on_a_reclaimed_node_drains_within_the_notice_unless_it_is_the_last():
    doomed = Replica("r", "awake", reclaimed=True)
    # Its cover is not ready (the service wants 2 awake, 1 other serves): it serves on.
    plan = plan_pool(2, [awake("a"), doomed], OFF, NOW, drain_seconds=300, service_target=2)
    assert plan.serving == ("a", "r") and not plan.draining
    # The cover serves in the other Deployment: out of the Service now, still counted (its
    # replacement is the ReplicaSet's to make once the node is gone).
    plan = plan_pool(2, [awake("a"), doomed], OFF, NOW, drain_seconds=300, serving_elsewhere=1, service_target=2)
    assert plan.draining == ("r",) and plan.serving == ("a",) and plan.replicas == 2 and not plan.create
    assert "announced a reclaim" in plan.about("r")
    # Surplus: it is the one that goes, never to sleep.
    plan = plan_pool(1, [awake("a", idle=600), doomed], POLICY, NOW, drain_seconds=300)
    assert plan.draining == ("r",) and not plan.sleep
    # Nothing else would serve: it serves to the end; with another Deployment serving, it leaves.
    assert plan_pool(1, [doomed], OFF, NOW, drain_seconds=300).serving == ("r",)
    assert plan_pool(1, [doomed], OFF, NOW, drain_seconds=300, serving_elsewhere=1, service_target=1).draining == ("r",)
