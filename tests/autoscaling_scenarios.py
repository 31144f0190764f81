"""Scenarios for the reactive autoscaling core's tests: specs, signals and ticks of `decide`.

Times are seconds from an arbitrary origin; `SETTLED` history is old enough that the restart
guard plays no part.
"""

from __future__ import annotations

from dataclasses import replace

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.autoscaling import decide
from ebbtide.policy.decision import Decision, Memory
from ebbtide.policy.observation import FleetState, PodSignals, Signals

NOW = 1_000_000.0
SETTLED = Memory.empty(NOW - 86_400)  # history began a day ago, nothing recorded since


def make_spec(min: int = 1, max: int = 12, targets: dict | None = None, behavior: dict | None = None,
              ) -> InferenceServiceSpec:
    scaling: dict = {}
    if targets is not None:
        scaling["targets"] = targets
    if behavior is not None:
        scaling["behavior"] = behavior
    return InferenceServiceSpec.model_validate(
        {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, "replicas": {"min": min, "max": max},
         "scaling": scaling})


DEFAULT = make_spec()
KV_ONLY = make_spec(targets={"waitingPerReplica": None, "kvCacheUsage": 0.75, "ttft": None, "tpot": None})


def load(now: float = NOW, pods: int = 3, waiting: float = 0.0, running: float = 0.0, kv: float = 0.0,
         ttft: float | None = None, tpot: float | None = None, tokens: float | None = None, age: float = 5.0,
         source: str = "prometheus") -> Signals:
    """`pods` replicas sharing the totals `waiting` and `running` evenly, each at KV usage `kv`."""
    sampled = now - age
    per_pod = tuple(PodSignals(pod=f"chat-{i}", sampled_at=sampled, waiting=waiting / pods,
                               running=running / pods, kv_cache_usage=kv) for i in range(pods))
    return Signals(source=source, sampled_at=sampled if pods else None, pods=per_pod, ttft_seconds=ttft,
                   tpot_seconds=tpot, tokens_per_second=tokens)


def fleet(current: int, ready: int | None = None, starting: int = 0) -> FleetState:
    return FleetState(current=current, ready=current - starting if ready is None else ready, starting=starting)


def tick(spec: InferenceServiceSpec, signals: Signals, current: int, memory: Memory = SETTLED,
         now: float = NOW, ready: int | None = None, starting: int = 0) -> Decision:
    """One decision at `now`, with signals built at NOW moved to `now` (their age is kept)."""
    return decide(spec, shifted(signals, now - NOW), fleet(current, ready, starting), memory, now)


def shifted(signals: Signals, by: float) -> Signals:
    if not by or signals.sampled_at is None:
        return signals
    pods = tuple(replace(p, sampled_at=p.sampled_at + by) for p in signals.pods)
    return replace(signals, sampled_at=signals.sampled_at + by, pods=pods)


def run(spec: InferenceServiceSpec, signals_at, start: int, seconds: float, memory: Memory = SETTLED,
        every: float = 15.0, now: float = NOW) -> list[Decision]:
    """Ticks every `every` s for `seconds`; the fleet becomes what was decided, ready at once."""
    decisions, current, t = [], start, now
    while t < now + seconds:
        d = decide(spec, signals_at(t, current), fleet(current), memory, t)
        decisions.append(d)
        current, memory, t = d.desired, d.memory, t + every
    return decisions


def condition(d: Decision, type: str) -> tuple[str, str]:
    c = d.condition(type)
    assert c is not None, f"no {type} condition in {d.conditions}"
    return c.status, c.reason
