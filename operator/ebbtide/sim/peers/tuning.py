"""`<peer>-tuned`: a peer with its main threshold set with hindsight, as a careful user would
after watching their own dashboard.

The sweep walks a coarse grid of the threshold from the safest setting (most replicas) towards
the cheapest, replaying the trace at each, and stops at the first setting that misses the SLO
after one that met it; then it bisects (geometrically) between those two, `refine` times. It
keeps the setting with the fewest GPU-hours among those meeting the SLO for `slo` of the
requests; if none does, the one that came closest. The SLO is not monotone in the threshold
(a KV-usage HPA meets it at 0.05 and 0.1, not at 0.2 or 0.3), hence a walk and not a bisection
from the start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.sim import report
from ebbtide.sim.fleet import PolicyRun, SimSettings, simulate
from ebbtide.sim.peers.base import Peer
from ebbtide.sim.traces import Trace

SLO = 0.99
REFINE = 2


@dataclass(frozen=True)
class Tuning:
    parameter: str
    value: float
    met: bool  # whether any setting met the SLO bar
    tried: tuple[tuple[float, float, float], ...]  # (value, GPU-hours, SLO attainment), in order

    def to_json(self) -> dict:
        return {"parameter": self.parameter, "value": self.value, "met": self.met,
                "tried": [{"value": v, "gpu_hours": round(h, 2), "slo_attainment": round(s, 5)}
                          for v, h, s in self.tried]}


def sweep(make: Callable[[float], Peer], grid: tuple[float, ...], evaluate: Callable[[Peer], tuple[PolicyRun, float, float]],
          parameter: str, slo: float = SLO, refine: int = REFINE) -> tuple[Peer, PolicyRun, Tuning]:
    """`grid` runs from the safest setting to the cheapest; `evaluate` replays one policy and
    returns (its run, GPU-hours, SLO attainment)."""
    tried: list[tuple[float, float, float]] = []
    best: tuple[tuple[bool, float], float, Peer, PolicyRun] | None = None

    def attempt(value: float) -> bool:
        nonlocal best
        policy = make(value)
        run, hours, attained = evaluate(policy)
        tried.append((value, hours, attained))
        met = attained >= slo
        rank = (met, -hours if met else attained)  # met first, then cheapest; else closest
        if best is None or rank > best[0]:
            best = (rank, value, policy, run)
        return met

    passed = failed = None
    for value in grid:
        if attempt(value):
            passed = value
        elif passed is not None:
            failed = value
            break
    for _ in range(refine if failed is not None else 0):
        middle = _round((passed * failed) ** 0.5)
        if middle in (passed, failed):
            break
        if attempt(middle):
            passed = middle
        else:
            failed = middle
    assert best is not None
    (met, _), value, policy, run = best
    return policy, run, Tuning(parameter=parameter, value=value, met=met, tried=tuple(tried))


def _round(value: float) -> float:
    """Three significant digits: a setting a user would write."""
    return float(f"{value:.3g}")


@dataclass
class Tuned:
    """Stands for `<peer>-tuned` in a list of policies until the replay is known: `tune` sweeps
    `parameter` over `grid` on it and returns the peer at the setting kept, its run and the
    sweep (sim/command.py)."""

    name: str
    make: Callable[[float], Peer]
    parameter: str
    grid: tuple[float, ...]

    def tune(self, spec: InferenceServiceSpec, trace: Trace, settings: SimSettings, slo: float = SLO
             ) -> tuple[Peer, PolicyRun, Tuning]:
        def evaluate(policy: Peer) -> tuple[PolicyRun, float, float]:
            run = simulate(trace, policy, settings)
            return run, report.gpu_hours(run), report.slo_attainment(run, spec)

        def make(value: float) -> Peer:
            policy = self.make(value)
            policy.name = self.name
            return policy

        return sweep(make, self.grid, evaluate, self.parameter, slo)
