"""Status conditions: set one, keep the others, move lastTransitionTime only on a real change."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Status = Literal["True", "False", "Unknown"]
AUTHORIZED = "Authorized"


def set_condition(conditions: list[dict], type: str, status: Status, reason: str, message: str,
                  now: str, generation: int | None = None) -> list[dict]:
    """A new list with `type` set; the transition time only moves when the status flips,
    so `kubectl describe` shows since when something has been true, not the last tick."""
    old = next((c for c in conditions if c.get("type") == type), None)
    changed = old is None or old.get("status") != status
    new = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    if old is None:
        return [*conditions, new]
    return [new if c is old else c for c in conditions]


def set_authorized(conditions: list[dict], refusals: Iterable[str], now: str) -> list[dict]:
    """Authorized=False naming what the API server refused (RBAC); absent until a first refusal,
    then True again once none stands."""
    refusals = sorted(refusals)
    if refusals:
        return set_condition(conditions, AUTHORIZED, "False", "Forbidden", "permission denied: " + "; ".join(refusals),
                             now)
    if get_condition(conditions, AUTHORIZED) is None:
        return conditions
    return set_condition(conditions, AUTHORIZED, "True", "Permitted", "no call the operator makes is refused", now)


def get_condition(conditions: list[dict] | None, type: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type), None)
