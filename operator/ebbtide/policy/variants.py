"""The cheapest mix of accelerator variants that carries the demand (issue 19). Pure.

    choose_mix(demand, views, share, budget_usd_per_hour) -> MixPlan

Demand is tokens/s (prompt + generated), optionally split by the context a request needs; each
variant's capacity is the tokens/s one of its replicas serves at its limit (learned from its
own replicas, seeded from its accelerator until then: policy/variant_tick.py). Every replica
then runs at `share` of its limit, as scaling.targets.throughput says for a single fleet.

In order:
1. Reserved variants first: they are paid for whether they run or not, so while there is any
   demand they run up to their max (their marginal cost is zero).
2. Then the cheapest dollars per token: a variant's $/h over its capacity. Spot is priced with
   its expected reclaim cost: each reclaim throws away one startup of GPU time (the replacement
   holds its GPU while it loads) and the work in flight, which the gateway retries.
3. The last, fractional part of the demand goes to whatever covers it for the fewest dollars
   per hour: a small remainder needs one L4, not another H100. From zero that is the cheapest
   variant that can serve the requests at all.
4. Longer contexts first: a request whose prompt does not fit a variant (max context) must go
   to one that holds it. Routing is the user's gateway's job; the plan says which variants
   carry which sizes so that the gateway can be set up to match (docs/variants.md): the plan's
   `routes` give, per request size, the variants it holds for it, longest first, each size
   placed where a longer one is not (isolation: a short chat request does not share a step with
   an 85k-token prefill chunk when the gateway routes as the plan says).
5. A variant whose new replicas find no node (Pending past the pending timeout) is capped at
   the replicas it has until the shell says otherwise, so the next cheapest takes over.
6. A budget caps the projected $/h: the dearest dollars per token are given up first, and
   cheaper variants filled with what that frees, before the capacity is cut (BudgetLimited).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RESERVED, ON_DEMAND, SPOT = "reserved", "on-demand", "spot"
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Demand:
    """Tokens/s of requests that need up to `context_tokens` of context (None: no long ones)."""

    tokens_per_s: float
    context_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class VariantView:
    """One variant as this tick sees it."""

    name: str
    capacity_type: str  # reserved, on-demand, spot
    usd_per_replica_hour: float
    capacity_tokens_per_s: float  # one replica at its limit
    min: int = 0
    max: int = 4
    ready: int = 0
    starting: int = 0  # created, not ready, with a node (or not Pending for long)
    pending_unschedulable: int = 0  # Pending past the pending timeout: the variant's nodes ran out
    stuck: bool = False  # had unschedulable replicas recently (the shell remembers for how long)
    learned: bool = False  # capacity learned from its own replicas (else the accelerator's seed)
    max_context_tokens: int | None = None  # longest prompt + output it admits; None: any
    reclaims_per_hour: float = 0.0  # spot: expected reclaims of one replica per hour
    startup_seconds: float = 180.0  # what a reclaim costs in GPU time before the replacement serves
    accelerator: str = ""

    @property
    def ceiling(self) -> int:
        """Most replicas it may have now: its max, or, stuck, those that found a node."""
        return min(self.max, self.ready + self.starting) if self.stuck else self.max

    @property
    def effective_usd_per_hour(self) -> float:
        """$/h of one replica with a spot reclaim's expected cost on top (zero for the others)."""
        premium = self.reclaims_per_hour * self.startup_seconds / 3600.0 if self.capacity_type == SPOT else 0.0
        return self.usd_per_replica_hour * (1.0 + premium)

    @property
    def usd_per_million_tokens(self) -> float:
        """At its limit; reserved capacity is sunk, so zero at the margin."""
        if self.capacity_type == RESERVED:
            return 0.0
        return self.effective_usd_per_hour / (self.capacity_tokens_per_s * 3600.0) * 1e6

    def admits(self, context_tokens: int | None) -> bool:
        return context_tokens is None or self.max_context_tokens is None or self.max_context_tokens >= context_tokens


@dataclass(frozen=True)
class MixPlan:
    """Replicas per variant, what they cost and carry, and why."""

    targets: Mapping[str, int]
    usd_per_hour: float  # projected: the replicas asked for at list price, reserved ones all counted
    required_tokens_per_s: float  # the demand over the throughput share: capacity wanted at the limit
    planned_tokens_per_s: float  # the capacity asked for, at the limit
    budget_limited: bool
    reasons: tuple[str, ...]  # one line per variant, and one per constraint that bound
    # Per request size (the context it needs; None: any), the variants carrying it, longest first;
    # empty with one size. The gateway's size routing, if the user's gateway is set up to follow it.
    routes: tuple[tuple[int | None, tuple[str, ...]], ...] = ()
    budget_usd_per_hour: float | None = None  # the hourly cap in force (with a monthly cap, its share now)

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)

    @property
    def total(self) -> int:
        return sum(self.targets.values())


def committed_usd_per_hour(views: Sequence[VariantView]) -> float:
    """What reserved variants cost whatever runs: all their replicas, at their price."""
    return sum(v.max * v.usd_per_replica_hour for v in views if v.capacity_type == RESERVED)


def projected_usd_per_hour(views: Sequence[VariantView], targets: Mapping[str, int]) -> float:
    return committed_usd_per_hour(views) + sum(
        targets[v.name] * v.usd_per_replica_hour for v in views if v.capacity_type != RESERVED)


def choose_mix(demand: Sequence[Demand] | float, views: Sequence[VariantView], share: float = 0.8,
               budget_usd_per_hour: float | None = None, keep: Mapping[str, int] | None = None) -> MixPlan:
    """The mix for `demand`. With `keep` (the targets in force), replicas are only added to it
    (cheapest first) and then taken from it (dearest first): a tick never swaps a running
    replica of one variant for a cold start of another."""
    classes = [Demand(demand)] if isinstance(demand, int | float) else list(demand)
    classes = sorted((c for c in classes if c.tokens_per_s > 0), key=_longest_first)
    required = sum(c.tokens_per_s for c in classes) / share
    by_name = {v.name: v for v in views}
    kept = keep or {}
    targets = {v.name: min(max(v.min, kept.get(v.name, 0)), v.ceiling) for v in views}
    notes: list[str] = []
    if classes:
        for v in views:
            if v.capacity_type == RESERVED:
                targets[v.name] = max(targets[v.name], v.ceiling)
    assigned = 0.0
    for demand_class in classes:
        eligible = [v for v in views if v.admits(demand_class.context_tokens)]
        if not eligible:
            notes.append(f"no variant admits {demand_class.context_tokens} tokens of context: "
                         f"{demand_class.tokens_per_s:.0f} tokens/s of such requests cannot be served")
            continue
        need = demand_class.tokens_per_s / share
        spare = capacity_of(eligible, targets) - assigned
        short = _fill(need - spare, eligible, targets)
        if short > _EPSILON:
            notes.append(f"every variant that admits {_context(demand_class)} is at its ceiling: "
                         f"{short:.0f} tokens/s short")
        assigned += need
        if demand_class.context_tokens is not None and len(eligible) < len(views):
            notes.append(f"requests needing {_context(demand_class)} ({demand_class.tokens_per_s:.0f} tokens/s) "
                         f"only fit {', '.join(v.name for v in eligible)}: the gateway must route them there")
        if len(classes) > 1:  # by request size: where this size is served for the fewest dollars
            cheapest = min(eligible, key=lambda v: v.usd_per_million_tokens)
            notes.append(f"requests needing {_context(demand_class)} are cheapest per token on {cheapest.name} "
                         f"({cheapest.usd_per_million_tokens:.3f} USD/M tokens at the limit)")
    _trim(views, targets, classes, share)
    cut = within_budget(views, targets, budget_usd_per_hour, required, f"the cheapest mix for {required:.0f} tokens/s")
    notes += [cut] if cut else []
    routes = size_routes(views, targets, classes, share)
    notes += [f"route requests needing {_context(Demand(0.0, bound))} to {', '.join(names)}"
              for bound, names in routes if names]
    reasons = tuple(_line(by_name[name], n) for name, n in targets.items() if n or by_name[name].stuck) + tuple(notes)
    return MixPlan(targets=targets, usd_per_hour=projected_usd_per_hour(views, targets),
                   required_tokens_per_s=required, planned_tokens_per_s=capacity_of(views, targets),
                   budget_limited=cut is not None, reasons=reasons, routes=routes,
                   budget_usd_per_hour=budget_usd_per_hour)


def within_budget(views: Sequence[VariantView], targets: dict[str, int], budget: float | None, required: float,
                  what: str) -> str | None:
    """Cut `targets` (in place) to cost at most `budget` per hour, as step 6 says; the
    BudgetLimited reason, or None when `what` (the mix) fits the cap already."""
    if budget is None or projected_usd_per_hour(views, targets) <= budget + _EPSILON:
        return None
    before = capacity_of(views, targets)
    _within_budget(views, targets, budget, required)
    return (f"BudgetLimited: {budget:.2f} USD/h cap; {what} would cost more, so {capacity_of(views, targets):.0f} "
            f"tokens/s of capacity (was {before:.0f}) for {projected_usd_per_hour(views, targets):.2f} USD/h")


def size_routes(views: Sequence[VariantView], targets: Mapping[str, int], demand: Sequence[Demand],
                share: float = 0.8) -> tuple[tuple[int | None, tuple[str, ...]], ...]:
    """Per request size, longest first, the variants of the mix that carry it: each size takes
    the capacity left on the variants that admit it, those no longer size uses first (so sizes
    share a variant only when the mix leaves no other), then the cheapest per token (reserved
    first). The variant named first, the size's own (the gateway's first choice), is the one that
    carries most of it: not a replica added for a remainder. () with a single size."""
    classes = sorted((c for c in demand if c.tokens_per_s > 0), key=_longest_first)
    if len(classes) < 2:
        return ()
    left = {v.name: targets.get(v.name, 0) * v.capacity_tokens_per_s for v in views}
    used: set[str] = set()
    routes = []
    for demand_class in classes:
        open_ = [v for v in views if left[v.name] > _EPSILON and v.admits(demand_class.context_tokens)]
        need, taken = demand_class.tokens_per_s / share, {}
        for v in sorted(open_, key=lambda v: (v.name in used, v.usd_per_million_tokens)):
            if need <= _EPSILON:
                break
            taken[v.name] = min(need, left[v.name])
            left[v.name] -= taken[v.name]
            need -= taken[v.name]
        used.update(taken)
        routes.append((demand_class.context_tokens, tuple(sorted(taken, key=lambda name: -taken[name]))))
    return tuple(routes)


def _longest_first(demand_class: Demand) -> float:
    return -math.inf if demand_class.context_tokens is None else -demand_class.context_tokens


def _context(demand_class: Demand) -> str:
    return f"{demand_class.context_tokens} tokens of context" if demand_class.context_tokens else "any context"


def capacity_of(views: Sequence[VariantView], targets: Mapping[str, int]) -> float:
    """Tokens/s the mix carries at the limit."""
    return sum(targets[v.name] * v.capacity_tokens_per_s for v in views)


def _room(v: VariantView, targets: Mapping[str, int]) -> int:
    return max(0, v.ceiling - targets[v.name])


def _fill(amount: float, eligible: Sequence[VariantView], targets: dict[str, int]) -> float:
    """Add replicas of the eligible variants until they carry `amount` more tokens/s, for the
    fewest dollars; returns what could not be placed (0 when it all was)."""
    while amount > _EPSILON:
        open_ = [v for v in eligible if _room(v, targets) > 0 and v.capacity_tokens_per_s > 0]
        if not open_:
            return amount
        # Whole replicas of the cheapest per token while the demand fills them.
        best = min(open_, key=lambda o: o.usd_per_million_tokens)
        n = min(_room(best, targets), math.floor(amount / best.capacity_tokens_per_s + _EPSILON))
        if n >= 1:
            targets[best.name] += n
            amount -= n * best.capacity_tokens_per_s
            continue
        # The rest in one go, if some variant can take it: the fewest dollars per hour for it. A
        # variant dearer per token takes one remainder, not one more each tick: kept, remainders
        # piled up (four L4s where one L40S carries as much), and trimming never swaps them back.
        whole = [(max(1, math.ceil(amount / v.capacity_tokens_per_s - _EPSILON)), v) for v in open_
                 if v.usd_per_million_tokens <= best.usd_per_million_tokens or not targets[v.name]]
        whole = [(n, v) for n, v in whole if n <= _room(v, targets)]
        if whole:
            n, v = min(whole, key=lambda nv: (nv[0] * nv[1].effective_usd_per_hour, nv[1].usd_per_million_tokens))
            targets[v.name] += n
            return 0.0
        # Otherwise one of the cheapest per token, and look again.
        targets[best.name] += 1
        amount -= best.capacity_tokens_per_s
    return 0.0


def _covers(views: Sequence[VariantView], targets: Mapping[str, int], classes: Sequence[Demand],
            share: float) -> bool:
    """Every class, with the longer ones, fits the capacity of the variants that admit it."""
    need = 0.0
    for demand_class in classes:  # longest first
        need += demand_class.tokens_per_s / share
        if capacity_of([v for v in views if v.admits(demand_class.context_tokens)], targets) < need - _EPSILON:
            return False
    return True


def _trim(views: Sequence[VariantView], targets: dict[str, int], classes: Sequence[Demand], share: float) -> None:
    """Take away the replicas the demand does not need, the dearest dollars per token first
    (reserved ones stay while there is demand: they cost the same either way)."""
    if not _covers(views, targets, classes, share):
        return  # short already: nothing is surplus
    for v in sorted(views, key=lambda v: v.usd_per_million_tokens, reverse=True):
        if v.capacity_type == RESERVED and classes:
            continue
        while targets[v.name] > v.min:
            targets[v.name] -= 1
            if not _covers(views, targets, classes, share):
                targets[v.name] += 1
                break


def _within_budget(views: Sequence[VariantView], targets: dict[str, int], budget: float, required: float) -> None:
    """Give up the dearest dollars per token first (never below a variant's min), then spend
    what that freed on the cheapest per token that still has room, while the demand wants it."""
    dearest_first = sorted((v for v in views if v.capacity_type != RESERVED),
                           key=lambda v: v.usd_per_million_tokens, reverse=True)
    for v in dearest_first:
        while targets[v.name] > v.min and projected_usd_per_hour(views, targets) > budget + _EPSILON:
            targets[v.name] -= 1
    for v in reversed(dearest_first):
        while (_room(v, targets) and capacity_of(views, targets) < required - _EPSILON
               and projected_usd_per_hour(views, targets) + v.usd_per_replica_hour <= budget + _EPSILON):
            targets[v.name] += 1


def _line(v: VariantView, n: int) -> str:
    seed = "learned" if v.learned else f"seed for {v.accelerator or 'its accelerator'}"
    if v.capacity_type == RESERVED:
        price = f"reserved at {v.usd_per_replica_hour:.2f} USD/h, sunk"
    else:
        premium = (f", {v.effective_usd_per_hour:.2f} with reclaims" if v.capacity_type == SPOT
                   and v.effective_usd_per_hour > v.usd_per_replica_hour + 0.005 else "")
        price = (f"{v.capacity_type} {v.usd_per_replica_hour:.2f} USD/h{premium}, "
                 f"{v.usd_per_million_tokens:.3f} USD/M tokens at the limit")
    stuck = (f"; capped at {v.ceiling}: {v.pending_unschedulable} replicas found no node"
             if v.stuck else "")
    return f"{v.name}: {n} x {v.capacity_tokens_per_s:.0f} tokens/s ({seed}; {price}){stuck}"
