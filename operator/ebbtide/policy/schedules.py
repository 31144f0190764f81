"""Schedule windows: which ones are open at an instant, and what they change.

    active_windows(schedules, now) -> [ScheduleWindow]
    effective_bounds(spec, now) -> Effective
    effective_spec(spec, now) -> InferenceServiceSpec   (what decide() is called with)
    next_change(schedules, now) -> (time, window, opening) | None
    floor_ahead(spec, now, lead_seconds) -> int

All pure: `now` is unix seconds, nothing reads a clock.

A window opens at each time its cron expression fires, read as wall-clock time in its
timezone, and stays open `duration_minutes` of elapsed real time (a window opened at 01:30
for 60 minutes on the night the clocks go forward closes at 03:30 local: one real hour, which
is what the GPUs are paid for). Around daylight-saving changes it behaves like Vixie cron and
cronie, which is what people who write cron expressions expect:

- Spring forward: a fire time inside the skipped hour (02:30 on the day 02:00 jumps to 03:00)
  fires once, at the instant of the jump (03:00 local), unless the hour field is `*` (an
  hourly "30 * * * *" just skips it, having fired at 01:30 and firing again at 03:30). This
  is croniter's behaviour, used as is, and cron's for fixed-time jobs; it differs from Vixie
  cron only for stepped or listed hours with a wildcard-ish minute ("0 */2 * * *" fires at
  03:00 here). Tested against a minute-by-minute reference.
- Fall back: a fixed-time expression (neither minute nor hour is `*`-based, e.g. "30 2 * * *")
  fires once, at the first of the two 02:30s. croniter fires it at both; the second is
  dropped here, so a daily window is not silently stretched by an hour. Expressions with a
  wildcard minute or hour ("*/15 * * * *", "0 * * * *") fire on wall-clock time and so fire
  in both passes of the repeated hour, as in cron.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from croniter import croniter

from ebbtide.api.spec import InferenceServiceSpec, ScheduleWindow

# Searching back or ahead for fire times is bounded: a window lasts at most a week, so a fire
# older than that cannot hold it open; a sparse expression ("0 0 29 2 *") may not fire for
# years, and then it is closed and has no next change worth waiting for.
_HORIZON = timedelta(days=366 * 5)
# Self-overlapping windows (fires every hour, open 90 minutes) never close; stop looking.
_MAX_CHAINED_FIRES = 2_000


@dataclass(frozen=True, slots=True)
class Effective:
    """The bounds and targets in force at one instant, after the open windows."""

    min_replicas: int
    max_replicas: int
    waiting_per_replica: float | None
    kv_cache_usage: float | None
    running_per_replica: float | None
    off_peak: bool
    windows: tuple[str, ...]  # names of the open windows, in listing order
    note: str = ""  # how a conflict between a floor and a ceiling was resolved, if one was
    throughput: float | None = None  # a window's scaling.targets.throughput, if one sets it


# Off-peak consolidation (a window with offPeak, or a valley the demand profile knows): the load
# is low and changes slowly, so each replica may run closer to its limit (0.9 of it: at peak
# that let queues through on every ripple, bench/notes.md; in a valley a ripple is a few
# requests, and the reactive core still adds a replica on a queue or an SLO breach). Surplus
# replicas go to sleep once drained instead of idling awake first, and spot placement keeps no
# on-demand base (the fallback still covers a reclaim).
OFF_PEAK_THROUGHPUT = 0.9


def consolidated(spec: InferenceServiceSpec) -> InferenceServiceSpec:
    """The spec as off-peak consolidation runs it (see OFF_PEAK_THROUGHPUT)."""
    targets = spec.scaling.targets
    spot = spec.placement.spot
    # A share measured from the load's rises (throughputMax above throughput) already runs close
    # to the limit when the load is steady; raising its floor as well would also pack the first
    # hours of an off-peak window, where the load still falls from the evening (code-week: 22:00
    # held a queue with the floor at 0.9). A fixed share is raised; a measured one runs at
    # OFF_PEAK_THROUGHPUT off-peak only until it is measured (autoscaling.decide's off_peak).
    adaptive = targets.throughput_max > targets.throughput
    share = targets.throughput if adaptive else max(targets.throughput, OFF_PEAK_THROUGHPUT)
    return spec.model_copy(update={
        "scaling": spec.scaling.model_copy(update={"targets": targets.model_copy(update={"throughput": share})}),
        "sleep": spec.sleep.model_copy(update={"idle_seconds": 0}),
        "placement": spec.placement.model_copy(update={"spot": spot.model_copy(update={"on_demand_base": 0})}),
    })


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=256)
def _fixed_time(cron: str) -> bool:
    """Cron's own distinction: jobs with a wildcard minute or hour run in both passes of a
    repeated hour, fixed-time jobs in the first only."""
    minute, hour = cron.split()[:2]
    return not (minute.startswith("*") or hour.startswith("*"))


def _second_pass(t: float, zone: ZoneInfo) -> bool:
    """True if `t` is in the second pass of a repeated (fall-back) hour."""
    local = datetime.fromtimestamp(t, zone)
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _fires(window: ScheduleWindow, t: float, zone: ZoneInfo) -> bool:
    return not (_fixed_time(window.cron) and _second_pass(t, zone))


# Building a croniter costs about a millisecond, and the operator and the simulator ask every
# tick (a week's replay: 40,000 ticks per policy). The answers change only when the window
# fires, so each is kept with the interval of times it holds for: deterministic, like a
# recomputation, and bounded by the number of distinct (cron, time zone) pairs.
_MEMO_SIZE = 256
_last_memo: dict[tuple[str, str], tuple[float, float, float | None]] = {}
_next_memo: dict[tuple[str, str], tuple[float, float, float | None]] = {}


def _memoized(memo: dict, window: ScheduleWindow, t: float,
              search: Callable[[ScheduleWindow, float], float | None],
              holds: Callable[[float, float | None], tuple[float, float | None]]) -> float | None:
    """search(window, t), kept for the interval of times `holds(t, answer)` says it holds for."""
    key = (window.cron, window.timezone)
    cached = memo.get(key)
    if cached is not None and cached[0] <= t < cached[1]:
        return cached[2]
    fire = search(window, t)
    start, end = holds(t, fire)
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[key] = (start, math.inf if end is None else end, fire)
    return fire


def last_fire(window: ScheduleWindow, now: float) -> float | None:
    """The latest time <= now the window opened, or None within the search horizon."""
    # It stays the answer from that opening until the next one.
    return _memoized(_last_memo, window, now, _search_last_fire,
                     lambda t, fire: (t if fire is None else fire, next_fire(window, t)))


def next_fire(window: ScheduleWindow, after: float) -> float | None:
    """The first time > after the window opens, or None within the search horizon."""
    return _memoized(_next_memo, window, after, _search_next_fire, lambda t, fire: (t, fire))


def _search_last_fire(window: ScheduleWindow, now: float) -> float | None:
    zone = _zone(window.timezone)
    # croniter's get_prev is strictly before its start; cron has minute resolution, so starting
    # one second later makes a fire at exactly `now` count.
    start = datetime.fromtimestamp(math.floor(now) + 1, zone)
    it = croniter(window.cron, start)
    oldest = start - _HORIZON
    while True:
        fire = it.get_prev(datetime)
        if fire < oldest:
            return None
        t = fire.timestamp()
        if t <= now and _fires(window, t, zone):
            return t


def _search_next_fire(window: ScheduleWindow, after: float) -> float | None:
    zone = _zone(window.timezone)
    start = datetime.fromtimestamp(after, zone)
    it = croniter(window.cron, start)
    newest = start + _HORIZON
    while True:
        fire = it.get_next(datetime)
        if fire > newest:
            return None
        t = fire.timestamp()
        if t > after and _fires(window, t, zone):
            return t


def is_open(window: ScheduleWindow, now: float) -> bool:
    # Every opening lasts the same, so the latest one is the one that ends last.
    fire = last_fire(window, now)
    return fire is not None and now < fire + window.duration_minutes * 60


def active_windows(schedules: list[ScheduleWindow], now: float) -> list[ScheduleWindow]:
    """The windows open at `now`, in listing order."""
    return [w for w in schedules if is_open(w, now)]


def effective_bounds(spec: InferenceServiceSpec, now: float) -> Effective:
    """Bounds and targets at `now`.

    A window's floor or ceiling replaces the spec's (an off-peak window may lower the floor
    below replicas.min: that is what it is for), but no window lifts the ceiling above
    replicas.max, the most replicas ever run. With several windows open, the highest floor and
    the lowest ceiling win; each target comes from the last listed open window that sets it.
    If a floor ends up above a ceiling, an explicit window value beats an inherited spec value,
    and between two window values the floor wins: a scheduled floor is usually a known peak,
    and missing the SLO there costs more than one replica too many.
    """
    targets = spec.scaling.targets
    open_windows = active_windows(spec.schedules, now) if spec.schedules else []
    floors = [w.min_replicas for w in open_windows if w.min_replicas is not None]
    ceilings = [w.max_replicas for w in open_windows if w.max_replicas is not None]
    lo = max(floors) if floors else spec.replicas.min
    hi = min([spec.replicas.max, *ceilings])
    note = ""
    if lo > hi:
        if floors:
            note = f"window floor {lo} beats window ceiling {hi}"
            hi = lo
        else:
            note = f"window ceiling {hi} beats replicas.min {lo}"
            lo = hi
    waiting, kv, running = targets.waiting_per_replica, targets.kv_cache_usage, targets.running_per_replica
    throughput = None
    for w in open_windows:
        if w.targets is None:
            continue
        if w.targets.throughput is not None:
            throughput = w.targets.throughput
        if w.targets.waiting_per_replica is not None:
            waiting = w.targets.waiting_per_replica
        if w.targets.kv_cache_usage is not None:
            kv = w.targets.kv_cache_usage
        if w.targets.running_per_replica is not None:
            running = w.targets.running_per_replica
    return Effective(
        min_replicas=lo, max_replicas=hi, waiting_per_replica=waiting, kv_cache_usage=kv,
        running_per_replica=running, off_peak=any(w.off_peak for w in open_windows),
        windows=tuple(w.name for w in open_windows), note=note, throughput=throughput,
    )


def effective_spec(spec: InferenceServiceSpec, now: float, floor: int | None = None,
                   off_peak: bool = False) -> InferenceServiceSpec:
    """The spec with the open windows applied, for decide(); the same object when none is open.

    `floor` (from floor_ahead) raises replicas.min further, and the ceiling with it when a
    window's ceiling (a night cap) is still in force while the morning's replicas start.
    An off-peak window, or `off_peak` (a valley the demand profile knows), consolidates (see
    consolidated()); a window's explicit targets still win.
    """
    eff = effective_bounds(spec, now)
    lo, hi = eff.min_replicas, eff.max_replicas
    if floor is not None and floor > lo:
        lo = min(floor, spec.replicas.max)
        hi = max(hi, lo)
    if eff.off_peak or off_peak:
        spec = consolidated(spec)
    targets = spec.scaling.targets
    if not eff.windows and lo == spec.replicas.min and hi == spec.replicas.max:
        return spec
    new_targets = targets.model_copy(update={
        "waiting_per_replica": eff.waiting_per_replica,
        "kv_cache_usage": eff.kv_cache_usage,
        "running_per_replica": eff.running_per_replica,
        "throughput": targets.throughput if eff.throughput is None else eff.throughput,
    })
    return spec.model_copy(update={
        "replicas": spec.replicas.model_copy(update={"min": lo, "max": hi}),
        "scaling": spec.scaling.model_copy(update={"targets": new_targets}),
    })


def _closes_at(window: ScheduleWindow, fire: float) -> float | None:
    """When a window that opened at `fire` closes, following re-openings that overlap it."""
    duration = window.duration_minutes * 60
    end = fire + duration
    for _ in range(_MAX_CHAINED_FIRES):
        again = next_fire(window, fire)
        if again is None or again >= end:
            return end
        fire, end = again, again + duration
    return None  # open for good, as far as it matters


def next_change(schedules: list[ScheduleWindow], now: float) -> tuple[float, ScheduleWindow, bool] | None:
    """The next time > now a window opens or closes: (time, window, opening).

    Ties go to the window listed first, closings before openings at the same instant.
    """
    best: tuple[float, int, int, ScheduleWindow, bool] | None = None
    for index, window in enumerate(schedules):
        fire = last_fire(window, now)
        if fire is not None and now < fire + window.duration_minutes * 60:
            t = _closes_at(window, fire)
            opening = False
        else:
            t = next_fire(window, now)
            opening = True
        if t is None:
            continue
        key = (t, int(opening), index, window, opening)
        if best is None or key[:3] < best[:3]:
            best = key
    return None if best is None else (best[0], best[3], best[4])


def floor_ahead(spec: InferenceServiceSpec, now: float, lead_seconds: float) -> int:
    """The floor to hold now so that a scheduled raise has landed when it takes effect.

    A replica takes `lead_seconds` (the measured startup time) to become useful, so the floor
    in force at now + lead must be asked for now; the floor in force now holds too. A window
    that opens and closes again within the lead is not chased: replicas started for it would
    arrive after it. Bounded by the ceiling in force at now + lead, not by the one in force now:
    a night cap must not stop the morning's replicas from starting before the morning.
    """
    here = effective_bounds(spec, now)
    there = effective_bounds(spec, now + max(0.0, lead_seconds))
    if there.min_replicas <= here.min_replicas:
        return here.min_replicas
    return min(there.min_replicas, there.max_replicas)
