"""Per-service state between ticks: the tick's own (policy/tick.py TickState), mirrored into
status so that a restart loses nothing that matters, and the shell's bookkeeping."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.blind import fresh
from ebbtide.policy.cost import Ledger
from ebbtide.policy.decision import Entries, Memory
from ebbtide.policy.observation import Signals
from ebbtide.policy.startup import StartupEstimate
from ebbtide.policy.tick import TickState
from ebbtide.policy.variant_tick import MixMemory


@dataclass
class ServiceState:
    tick: TickState
    last_evaluated: float = float("-inf")
    # The period of the service's interval it was last evaluated in (control/cadence.py), and
    # the spec it was evaluated on: a new spec (or a new service) is evaluated at once.
    evaluated_slot: int | None = None
    evaluated_spec: InferenceServiceSpec | None = None
    # When the demand profile was last saved: its ConfigMap is written once per profile bin (or
    # longer in a large fleet), at the service's phase (control/cadence.py `crossed`).
    profile_saved: float = float("-inf")
    # When its status was last written: an unchanged one is refreshed once per refresh period.
    status_written: float = float("-inf")
    # The last evaluation's status, when held back as no news: what a graceful stop still writes
    # (ScalingLoop.flush), so that the next leader resumes from this tick's cost totals.
    unwritten: Callable[[dict], dict] | None = None
    # The API server's refusals (403) this service has been told of: each gets one Event.
    refusals: frozenset[str] = frozenset()
    # The last signals a Prometheus observation returned with samples, by observation key (the
    # service's, or (service, variant)): what a failed observation falls back on (signals_through).
    last_signals: dict[Hashable, Signals] = field(default_factory=dict)

    def signals_through(self, key: Hashable, observed: Signals, failed: bool, now: float,
                        stale_after: float) -> Signals:
        """What to decide on: `observed`; or, when the whole observation `failed` (Prometheus
        unreachable, or late past its budget), the last signals it returned for `key` while the
        policy's own staleness rule still takes them as fresh (policy/blind.py `fresh`).

        Prometheus repeats a sample at every query until the next scrape, so deciding again on
        the last one is what a tick sees anyway between scrapes. A single stalled observation
        then changes nothing: at 1,000 services it turned every `MetricsAvailable` False and
        back, 2 x 1,000 status writes and the longest ticks (bench/operator_scale.py). Once the
        last samples are older than staleAfterSeconds the failure is decided on as before:
        MetricsAvailable=False (QueryFailed, with Prometheus's error) and the size held."""
        if not failed:
            if observed.sampled_at is None:  # Prometheus answered: no samples now is the news
                self.last_signals.pop(key, None)
            else:
                self.last_signals[key] = observed
            return observed
        last = self.last_signals.get(key)
        if last is not None and last.sampled_at is not None and fresh(last.sampled_at, now, stale_after):
            return last
        return observed

    @classmethod
    def restore(cls, status: dict | None, now: float) -> ServiceState:
        """From the status a restarted operator found, or fresh; unreadable parts start over.
        Not kept: idle times (they start over, which only delays a sleep) and the last advice."""
        stored = (status or {}).get("scaler")
        stored = stored if isinstance(stored, dict) else {}
        spot = stored.get("spot") if isinstance(stored.get("spot"), dict) else {}
        try:
            target = None if spot.get("target") is None else max(0, int(spot["target"]))
            cover = tuple((float(t), int(r)) for t, r in spot.get("cover", []))
        except (TypeError, ValueError):
            target, cover = None, ()
        startup = (status or {}).get("startup")
        # With spec.variants: each variant's learned limit and the mix (policy/variant_tick.py).
        mix = mix_held_until(MixMemory.load(stored["mix"], now), now) if "mix" in stored else None
        return cls(TickState(memory=held_until(Memory.load(stored or None, now), now),
                             ledger=Ledger.load(stored.get("cost"), now),
                             target=target, spot_cover=cover,
                             startup=StartupEstimate.load(startup if isinstance(startup, dict) else None), mix=mix))

    def to_json(self) -> dict:
        """status.scaler (the startup estimate has a status field of its own)."""
        t = self.tick
        kept = {**t.memory.to_json(), "cost": t.ledger.to_json(),
                "spot": {"target": t.target, "cover": [list(e) for e in t.spot_cover]}}
        if t.mix is not None:
            kept["mix"] = t.mix.to_json()
        return kept


def held_until(memory: Memory, now: float) -> Memory:
    """The stored memory, each window's newest recommendation taken as held until `now`.

    Status is written when the memory's values change, but the time of a recommendation that
    stays the same only every refresh period (control/explain.py): the stored time can be that
    much behind when the operator stopped. Held until the restart, it keeps a scale-down
    waiting its whole window after one, never less."""
    def held(entries: Entries) -> Entries:
        return (*entries[:-1], (max(entries[-1][0], now), entries[-1][1])) if entries else entries
    return replace(memory, up_recommendations=held(memory.up_recommendations),
                   down_recommendations=held(memory.down_recommendations))


def mix_held_until(mix: MixMemory, now: float) -> MixMemory:
    """The stored mix memory, with what it stamps at every tick taken as held until `now`: its
    scale-down window's highest demand, and each variant's last sight of Pending replicas.

    Those stamps are written only with the rest of a refresh (control/explain.py): after a restart
    they can be that much behind. Held until the restart, the mix shrinks and a variant short of
    nodes stays capped no sooner than without one."""
    demand = ((max(mix.demand[0][0], now), mix.demand[0][1]),) if mix.demand else ()
    variants = {name: replace(m, stuck_at=None if m.stuck_at is None else max(m.stuck_at, now))
                for name, m in mix.variants.items()}
    return replace(mix, demand=demand, variants=variants)
