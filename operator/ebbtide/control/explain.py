"""Explain: a tick's Turn as status, Events and the operator's metrics."""

from __future__ import annotations

import math

from ebbtide.api.conditions import set_authorized, set_condition
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.kube import Kube
from ebbtide.cluster.objects import rfc3339
from ebbtide.control import cadence
from ebbtide.control.decide import Step
from ebbtide.control.metrics import TIERS, OperatorMetrics
from ebbtide.control.state import ServiceState
from ebbtide.control.variant_report import spend, summary, variant_rows
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.policy.profile import Profile
from ebbtide.policy.tick import Turn
from ebbtide.policy.variants import RESERVED

HISTORY = 10  # decisions kept in status: enough to read the last hour's story, small enough for etcd
# A status whose substance has not changed is written again after this many of its service's
# intervals (300 s at the default 15 s; longer in a fleet past the periodic writes' budget:
# control/cadence.py), to refresh the numbers that move every tick: the last decision's time,
# words and signals, the cost totals, the autoscaler memory's times. Written every tick, they
# were ~1,070 PATCHes per tick at 1,000 services (bench/operator_scale.py).
REFRESH_INTERVALS = 20


async def tell(kube: Kube, metrics: OperatorMetrics, ref: ServiceRef, state: ServiceState, step: Step, turn: Turn,
               applied: bool, interval_seconds: float, fleet: int) -> None:
    """The Turn's Events, the API server's refusals not told yet, the metrics and the status
    (`interval_seconds`: the service's own, and the `fleet`'s size: how often an unchanged
    status is written again)."""
    for said in turn.events:
        await kube.post_event(ref, said.type, said.reason, said.message)
    if turn.news:
        metrics.of(metrics.decisions, ref.namespace, ref.name, turn.decision.reason, str(applied).lower()).inc()
    refusals = frozenset(kube.refusals(ref.namespace))
    for message in sorted(refusals - state.refusals):
        await kube.post_event(ref, "Warning", "Forbidden", f"permission denied: {message}")
    state.refusals = refusals
    export(metrics, ref, step, turn)
    # Written when something changed in substance, and otherwise once per refresh period
    # (each service at its own phase: control/cadence.py) for the numbers that move every tick.
    refresh = cadence.crossed(step.now, REFRESH_INTERVALS * interval_seconds, fleet, (ref.namespace, ref.name),
                              state.status_written, cadence.STATUS_REFRESHES_PER_SECOND)

    def unchanged(old: dict, new: dict) -> bool:
        return not refresh and substance(old) == substance(new)

    def render(status: dict) -> dict:
        return render_status(status, state, step, turn, applied)

    written = await kube.update_status(ref, render, unchanged=unchanged) is not None
    if written:
        state.status_written = step.now
    state.unwritten = None if written else render


def export(metrics: OperatorMetrics, ref: ServiceRef, step: Step, turn: Turn) -> None:
    m, ns, name = metrics, ref.namespace, ref.name
    m.of(m.desired, ns, name).set(turn.decision.desired)
    m.of(m.ready, ns, name).set(turn.fleet.ready)
    tiers = dict.fromkeys(TIERS, 0)
    for pod in step.pods.members:
        tiers[pod.capacity if pod.state == "awake" and pod.serving else
              "draining" if pod.state == "awake" else pod.state] += 1
    for tier, count in tiers.items():
        m.of(m.replicas, ns, name, tier).set(count)
    signals = step.seen.signals
    m.of(m.metrics_unavailable, ns, name).set(0 if signals.sampled_at and not signals.error else 1)
    for signal, value in turn.decision.signals.items():
        m.signal(ns, name, signal, value)
    m.of(m.usd_per_hour, ns, name).set(turn.spend.usd_per_hour)
    per_million = turn.spend.usd_per_million_tokens
    m.of(m.usd_per_million_tokens, ns, name).set(math.nan if per_million is None else per_million)
    ledger = turn.state.ledger
    m.accrue(ns, name, ledger.usd, {ON_DEMAND: ledger.gpu_hours_on_demand, SPOT: ledger.gpu_hours_spot,
                                    "asleep": ledger.gpu_hours_asleep, RESERVED: ledger.gpu_hours_reserved})


def render_status(status: dict, state: ServiceState, step: Step, turn: Turn, applied: bool) -> dict:
    decision, fleet = turn.decision, turn.fleet
    stamp = rfc3339(step.now)
    record = {
        "time": stamp,
        "fromReplicas": decision.current,
        "toReplicas": decision.desired,
        "reason": decision.reason,
        "message": decision.message,
        "source": decision.source,
        "signals": {k: round(v, 4) for k, v in decision.signals.items()},
        "applied": applied,
    }
    status["lastDecision"] = record
    if turn.news:
        status["decisions"] = ((status.get("decisions") or []) + [record])[-HISTORY:]
        status["lastDecisionSummary"] = f"{decision.current}->{decision.desired} {decision.reason}"
    else:
        status.setdefault("lastDecisionSummary", f"{decision.current} {decision.reason}")
    conditions = status.get("conditions") or []
    for c in turn.conditions:
        conditions = set_condition(conditions, c.type, c.status, c.reason, c.message, stamp)
    conditions = [c for c in conditions if c.get("type") not in turn.dropped_conditions]
    status["conditions"] = set_authorized(conditions, state.refusals, stamp)
    status["replicas"] = {**(status.get("replicas") or {}), "desired": decision.desired, "ready": fleet.ready,
                          "starting": fleet.starting, "asleep": fleet.asleep, "draining": step.pods.draining,
                          "onDemand": turn.placed.on_demand, "spot": turn.placed.spot}
    status["phase"] = turn.phase
    tick = turn.state
    ledger = tick.ledger
    per_million = turn.spend.usd_per_million_tokens
    status["cost"] = {
        "since": rfc3339(ledger.since),
        "gpuHours": {"onDemand": round(ledger.gpu_hours_on_demand, 4), "spot": round(ledger.gpu_hours_spot, 4),
                     "asleep": round(ledger.gpu_hours_asleep, 4), "reserved": round(ledger.gpu_hours_reserved, 4)},
        "usdTotal": round(ledger.usd, 4),
        "usdThisMonth": round(ledger.usd_month, 4),
        "usdPerHour": round(turn.spend.usd_per_hour, 4),
        "usdPerMillionTokens": None if per_million is None else round(per_million, 4),
    }
    rows = variant_rows(step.spec, decision.variants, step.pods.members)
    # None removes a field: a service without variants (or no longer with them) shows none.
    status["variants"] = rows or None
    status["variantsSummary"] = summary(rows)
    status["spend"] = spend(step.spec, decision.variants)
    status["startup"] = tick.startup.to_json()
    status["demandProfile"] = None if tick.profile is None else _profile_status(tick.profile)  # None: removed
    status["scaler"] = state.to_json()
    return status


def _profile_status(profile: Profile) -> dict:
    """What pre-warming has learned, in a few numbers (the profile itself is in its ConfigMap)."""
    learned = sum(1 for w in profile.weight if w > 0)
    return {"timezone": profile.timezone, "learningSince": None if profile.since is None else rfc3339(profile.since),
            "binsLearned": learned, "predicting": profile.since is not None and profile.updated is not None
            and profile.updated - profile.since >= 7 * 24 * 3600}


def substance(status: dict) -> dict:
    """The status less what moves every tick (see REFRESH_INTERVALS): equal substance, nothing
    a reader or a restarted operator needs has changed. The autoscaler memory counts with its
    values and the times of all but each window's newest entry (a restart takes that one as
    held until then: ServiceState.restore), less what moves every tick: the token rate's
    variability, the mix, the variants' demand readings and Pending sightings' times, a
    monthly cap's hourly allowance, the demand profile's count of bins learned; conditions
    with their status and reason."""
    kept = {k: v for k, v in status.items() if k not in ("lastDecision", "cost", "scaler", "conditions")}
    if isinstance(kept.get("demandProfile"), dict):  # a bin learned every 15 minutes: moves with the clock
        kept["demandProfile"] = {k: v for k, v in kept["demandProfile"].items() if k != "binsLearned"}
    if isinstance(kept.get("spend"), dict):  # a monthly cap's hourly allowance moves with the month's spend
        kept["spend"] = {k: v for k, v in kept["spend"].items() if k != "allowedUsdPerHour"}
    last = status.get("lastDecision") or {}
    kept["lastDecision"] = {k: last.get(k) for k in ("fromReplicas", "toReplicas", "reason", "source", "applied")}
    kept["usdPerHour"] = (status.get("cost") or {}).get("usdPerHour")
    kept["conditions"] = [(c.get("type"), c.get("status"), c.get("reason"), c.get("observedGeneration"))
                          for c in status.get("conditions") or []]
    scaler = dict(status.get("scaler") or {})
    for window in ("upRecommendations", "downRecommendations"):
        entries = scaler.get(window) or []
        scaler[window] = [*entries[:-1], *([None, entry[1]] for entry in entries[-1:])]
    ledger = scaler.pop("cost", None) or {}
    # The token rate's smoothing (policy/headroom.py) takes a reading, stamped, at every tick, and
    # the mix moves with the traffic: numbers that move every tick, refreshed with the rest. As
    # substance they had every service's status written at every evaluation (333 PATCHes a tick
    # at 1,000 services). The limits learned at the mix (weight, gram, moment) stay substance.
    scaler.pop("variability", None)
    # The variants' demand window and their Pending sightings (policy/variant_tick.py) are stamped
    # at every tick too; a restart holds them until then (state.mix_held_until). The mix stays.
    if isinstance(scaler.get("mix"), dict):
        mix = {k: v for k, v in scaler["mix"].items() if k != "demand"}
        mix["variants"] = {name: {**m, "stuckAt": m.get("stuckAt") is not None}
                           for name, m in (mix.get("variants") or {}).items()}
        scaler["mix"] = mix
    performance = scaler.pop("performance", None) or {}
    kept["scaler"] = {**scaler, "held": ledger.get("held"),
                      "performance": {k: v for k, v in performance.items() if k not in ("mix", "updatedAt")}}
    return _without_nulls(kept)


def _without_nulls(value: object) -> object:
    """As the API server keeps it: a null in a merge patch removes the field."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
