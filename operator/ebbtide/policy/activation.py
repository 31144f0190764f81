"""Waking a service from zero awake replicas: the one decision no engine metric can make.

With every replica asleep or gone there is no vLLM series left to show that requests are
waiting: they wait in front of the service (a gateway, a router, a queue). The spec's
`scaling.activation.query` reads that, as KEDA's activation does, and when it exceeds the
threshold one replica is asked for: the warm pool wakes a sleeper (seconds) or, with none
left, the Deployment starts one (a cold start). From one awake replica the reactive core
takes over with the engine's own signals.
"""

from __future__ import annotations

import dataclasses

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.behavior import push_highest
from ebbtide.policy.decision import Decision
from ebbtide.policy.observation import FleetState

ACTIVATED = "Activated"


def activate(decision: Decision, spec: InferenceServiceSpec, fleet: FleetState, value: float | None,
             now: float) -> Decision:
    """The decision, raised to one replica when nothing is awake and the activation query,
    read as `value` (None: not configured or not read), is above its threshold.

    The one replica is recorded as a recommendation of the scale-down window, so the core
    keeps it for that window: the engine's metrics show no load until the held requests
    arrive, and a replica woken for them must not go back to sleep at the next tick."""
    activation = spec.scaling.activation
    if activation is None or value is None:
        return decision
    signals = {**decision.signals, "activation": value}
    if decision.desired > 0 or fleet.ready + fleet.starting > 0 or value <= activation.threshold:
        return dataclasses.replace(decision, signals=signals)
    woken = "waking a sleeping replica" if fleet.asleep else "starting a replica"
    memory = dataclasses.replace(decision.memory,
                                 down_recommendations=push_highest(decision.memory.down_recommendations, now, 1))
    return dataclasses.replace(
        decision, desired=1, reason=ACTIVATED, signals=signals, memory=memory,
        message=f"{decision.current} -> 1: the activation query reads {value:g} > {activation.threshold:g} "
                f"with no replica awake; {woken}")
