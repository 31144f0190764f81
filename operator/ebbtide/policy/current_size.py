"""The size a service runs at now, as the core compares its recommendation with it.

    fleet_state(spec, pods, deployments, target) -> FleetState
"""

from __future__ import annotations

from collections.abc import Iterable

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.observation import Deployments, FleetState, Pod


def current_size(spec: InferenceServiceSpec, target: int | None, deployments: Deployments, asleep: int,
                 draining: int = 0) -> int:
    """The awake size last asked for.

    Without spot or sleep that is the Deployment's count, less the replicas draining on their
    way out (a hand scale counts, as with the HPA). With them the Deployments hold more than
    that (over-provisioning, on-demand cover, sleepers), so it is `target`, the size last asked for; without one (just enabled, status
    lost, or Advisory mode, which asks for nothing) it is estimated from the Deployments less
    the sleepers, high rather than low: a size too high shrinks after the scale-down window, one
    too low would shrink now.
    """
    if not (spec.placement.spot.enabled or spec.sleep.enabled or asleep):
        return max(0, deployments.on_demand - draining)
    if spec.mode == "Active" and target is not None:
        return target
    spot = deployments.spot or 0
    held = max(deployments.on_demand, deployments.on_demand + spot - spec.placement.spot.overprovision)
    return max(0, held - asleep)


def fleet_state(spec: InferenceServiceSpec, pods: Iterable[Pod], deployments: Deployments,
                target: int | None) -> FleetState:
    """The pods counted as the core counts them: ready (awake and in the Service), starting,
    asleep; an awake pod out of the Service is surplus draining away, none of these."""
    ready = starting = asleep = draining = 0
    names = []
    for pod in pods:
        names.append(pod.name)
        if pod.state == "starting":
            starting += 1
        elif pod.state == "asleep":
            asleep += 1
        elif pod.serving:
            ready += 1
        else:
            draining += 1
    return FleetState(current=current_size(spec, target, deployments, asleep, draining), ready=ready,
                      starting=starting,
                      asleep=asleep, pod_names=tuple(names))
