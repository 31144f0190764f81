"""What a tick tells: the words of its Events, the SpotAvailable condition, the phase.

Pure; the shell posts the Events and writes the status.
"""

from __future__ import annotations

from dataclasses import dataclass

from ebbtide.policy.decision import ConditionReport, Decision
from ebbtide.policy.observation import FleetState
from ebbtide.policy.reasons import METRICS_AVAILABLE
from ebbtide.policy.spot import Split, SpotPods

SPOT_AVAILABLE = "SpotAvailable"


@dataclass(frozen=True, slots=True)
class Said:
    """One Event: its type (Normal, Warning), reason and message."""

    type: str
    reason: str
    message: str


def decision_events(decision: Decision, placed: Split, active: bool, spot: bool, news: bool,
                    covering_before: int) -> tuple[Said, ...]:
    """A size change (or, in Advisory mode, the advice), or else a change of capacity alone:
    on-demand covering spot replicas that are not there, or giving the cover back."""
    if news:
        up = decision.desired > decision.current
        kind = ("ScaledUp" if up else "ScaledDown") if active else ("AdvisoryScaleUp" if up else "AdvisoryScaleDown")
        prefix = "" if active else "advisory, not applied: "
        note = f"; {placed.message}" if spot else ""
        return (Said("Normal", kind, f"{prefix}{decision.message} [{decision.source}]{note}"),)
    # Compared with the cover last applied, not the Deployment's count, which also holds sleepers.
    if active and spot and placed.covering != covering_before:
        if placed.covering > covering_before:
            return (Said("Warning", "SpotFallback", placed.message),)
        return (Said("Normal", "SpotRecovered", placed.message),)
    return ()


def spot_condition(pods: SpotPods, placed: Split) -> ConditionReport:
    if pods.unavailable:
        return ConditionReport(SPOT_AVAILABLE, "False", "SpotUnavailable",
                               f"{pods.unavailable} spot replicas unavailable (Pending too long or on a reclaimed "
                               f"node); {placed.message}")
    return ConditionReport(SPOT_AVAILABLE, "True", "SpotReady", placed.message)


def phase(fleet: FleetState, decision: Decision) -> str:
    if decision.desired == 0 and fleet.ready == 0:
        return "Idle"
    if fleet.ready == 0:
        return "Pending"
    metrics = decision.condition(METRICS_AVAILABLE)
    if metrics is not None and metrics.status == "False":
        return "Degraded"
    if decision.changed or fleet.starting or fleet.ready != decision.desired:
        return "Scaling"
    return "Ready"
