"""When a replica out of the Service may go: a sample taken after the endpoints caught up shows
nothing in flight."""

from __future__ import annotations

from ebbtide.policy.idle import PROPAGATION_SECONDS, seen_drained
from ebbtide.policy.observation import PodSignals, Signals

LEFT = 1_000.0


def signals(*pods: PodSignals) -> Signals:
    return Signals(source="prometheus", sampled_at=max(p.sampled_at for p in pods), pods=pods)


def test_drained_only_on_a_quiet_sample_taken_after_the_endpoints_caught_up():
    late = LEFT + PROPAGATION_SECONDS
    assert seen_drained(signals(PodSignals("a", sampled_at=late)), {"a": LEFT}) == {"a"}
    # Sampled too soon after leaving: a request routed just before may not show yet.
    assert seen_drained(signals(PodSignals("a", sampled_at=late - 1)), {"a": LEFT}) == set()
    # Still working, or still queueing.
    assert seen_drained(signals(PodSignals("a", sampled_at=late, running=1)), {"a": LEFT}) == set()
    assert seen_drained(signals(PodSignals("a", sampled_at=late, waiting=2)), {"a": LEFT}) == set()
    # In the Service (not in left_at), quiet or not: nothing to drain.
    assert seen_drained(signals(PodSignals("b", sampled_at=late)), {"a": LEFT}) == set()
    # No sample at all: unknown is not drained.
    assert seen_drained(Signals.missing("Prometheus unreachable"), {"a": LEFT}) == set()
