"""The request mix the fluid model serves, window by window (sim/size_mix.py says where the
windows come from): each window's mean prompt and output set its replicas' steady state, and its
prompt sizes the spread of TTFT."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.size_mix import SizeMix

# Each step's requests are represented by this many points in the fluid model's latency records:
# prompt-size quantiles paired (Latin-hypercube style, fixed permutation) with quantiles of the
# wait behind other prompts' prefill.
PROMPT_POINTS = 32

# The prefill load of a step (rho, see _unit_waits) is kept to 1/RHO_LEVELS, and capped below 1
# where the M/D/1 wait has no steady state.
RHO_LEVELS = 10_000
RHO_MAX = 0.95

_QUANTILES = (np.arange(PROMPT_POINTS) + 0.5) / PROMPT_POINTS
_WAIT_QUANTILES = np.random.default_rng(7).permutation(_QUANTILES)[None, :]


@dataclass(frozen=True)
class MixWindow:
    """One window's mix as the fluid model uses it: itl(n) = c0 + c1 n (the capacity model's
    steady state, capacity.py), at most n_max requests per replica."""

    P: float  # mean prompt tokens
    O: float  # noqa: E741  mean output tokens (at least 1), named as in capacity.py
    c0: float
    c1: float
    n_max: float
    prefill_points: np.ndarray  # prefill seconds of the window's prompt-size quantiles

    @classmethod
    def of(cls, capacity: CapacityModel, prompts: np.ndarray, mean_prompt: float, mean_output: float) -> MixWindow:
        points = np.quantile(prompts, _QUANTILES) if len(prompts) else np.full(PROMPT_POINTS, mean_prompt)
        c0 = capacity.itl_at(0.0, mean_prompt, mean_output)
        return cls(P=mean_prompt, O=mean_output, c0=c0, c1=capacity.itl_at(1.0, mean_prompt, mean_output) - c0,
                   n_max=capacity.max_concurrency(mean_prompt, mean_output),
                   prefill_points=np.array([capacity.prefill_seconds(p) for p in points]))


def _unit_waits() -> np.ndarray:
    """Waits behind other prompts' prefill (levels x PROMPT_POINTS) for a mean prefill time of
    one second, at every prefill load rho in 1/RHO_LEVELS up to RHO_MAX. The wait is an M/D/1
    queue of prefill work at load rho: 0 with probability 1 - rho, else exponential with the
    Pollaczek-Khinchine mean D / (2 (1 - rho)); it scales with D, so one table serves every mix."""
    rho = (np.arange(int(RHO_MAX * RHO_LEVELS) + 1) / RHO_LEVELS)[:, None]
    tail = np.maximum(0.0, -np.log(np.maximum(1e-12, (1.0 - _WAIT_QUANTILES) / np.maximum(rho, 1e-9))))
    return np.where(_WAIT_QUANTILES > 1.0 - rho, tail / (2.0 * (1.0 - rho)), 0.0)


_UNIT_WAITS = _unit_waits()


class MixSchedule:
    """The windows of a replay in fluid steps of `dt`: which window each step is in, and each
    window's `MixWindow`."""

    def __init__(self, capacity: CapacityModel, mix: SizeMix, steps: int, dt: float):
        means_p, means_o = mix.means()
        self.windows = [MixWindow.of(capacity, p, float(mp), float(mo))
                        for p, mp, mo in zip(mix.prompts, means_p, means_o, strict=True)]
        self.of_step = mix.window_of((np.arange(steps) + 0.5) * dt)
        # Steps where the window changes: replays advance window by window.
        self.changes = (np.nonzero(np.diff(self.of_step))[0] + 1).tolist()
        self._mean_prefill = np.array([w.P / capacity.prefill_tokens_per_s for w in self.windows])
        self._points = np.array([w.prefill_points for w in self.windows])

    def at(self, step: int) -> MixWindow:
        return self.windows[self.of_step[min(step, len(self.of_step) - 1)]]

    def segment_end(self, step: int, last: int) -> int:
        """The end of the run of steps from `step` (before `last`) in one window."""
        i = bisect.bisect_right(self.changes, step)
        return min(last, self.changes[i]) if i < len(self.changes) else last

    def rows(self, first: int, last: int, levels: list[int]) -> np.ndarray:
        """TTFT points (steps x PROMPT_POINTS) of steps [first, last) before queue wait and ITL:
        the wait behind other prompts' prefill + own prefill. `levels` is each step's prefill
        load rho in 1/RHO_LEVELS (capped at RHO_MAX, where the M/D/1 wait has no steady state)."""
        window = self.of_step[first:last]
        waits = _UNIT_WAITS[np.minimum(np.asarray(levels, dtype=np.int64), len(_UNIT_WAITS) - 1)]
        return waits * self._mean_prefill[window][:, None] + self._points[window]


def fluid_mix(trace_prompt_sum: float, trace_output_sum: float, requests: int) -> tuple[float, float]:
    """(mean prompt, mean output) tokens of a trace; an output is at least one token."""
    mean_p = trace_prompt_sum / max(requests, 1)
    mean_o = max(trace_output_sum / max(requests, 1), 1.0)
    return float(mean_p), float(mean_o)
