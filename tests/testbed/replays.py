"""Small synthetic replays for the fleet simulator's tests: phases of Poisson load in whole
replicas' worth, the example spec with its lifecycle switched, and Ebbtide as an operator that
already knows what a replica serves."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from ebbtide.sim.capacity import LLAMA_3_1_8B_H100
from ebbtide.sim.ebbtide_policy import EbbtidePolicy, with_lifecycle
from ebbtide.sim.fleet import SimSettings
from ebbtide.sim.inputs import load_spec
from ebbtide.sim.traces import Trace

# `ebbtide simulate` run as a subprocess sees this checkout's code, whatever is installed.
CLI_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    filter(None, [str(Path(__file__).resolve().parents[2] / "operator"), os.environ.get("PYTHONPATH")])))

PROMPT, OUTPUT = 1000, 200
SATURATION = LLAMA_3_1_8B_H100.saturation_rate(PROMPT, OUTPUT)  # requests/s per replica
CAPACITY = SATURATION * (PROMPT + OUTPUT)  # tokens/s per replica at its limit, as the core learns it
WAKE = LLAMA_3_1_8B_H100.wake_seconds(1)
# A Monday 08:00 UTC, so that the profile's time-of-week bins start on the trace's quarter-hours.
MONDAY = datetime.datetime(2024, 5, 13, 8, 0)


def spec_with(prewarm=False, sleep=False, **sleep_settings):
    """The example spec without its schedule windows (they would move the floor), with
    pre-warming and sleep on or off."""
    _, spec = load_spec(None)
    spec = with_lifecycle(spec.model_copy(update={"schedules": []}), prewarm, sleep)
    return spec.model_copy(update={"sleep": spec.sleep.model_copy(update=sleep_settings)})


def phases(*parts: tuple[float, int], seed: int = 4) -> Trace:
    """Poisson arrivals, 1000 / 200 tokens, in phases of (replicas' worth of load at 70 % of
    saturation, minutes)."""
    rng = np.random.default_rng(seed)
    counts = np.concatenate([rng.poisson(0.7 * replicas * SATURATION, minutes * 60) for replicas, minutes in parts])
    return Trace(name="phases", duration_s=float(len(counts)), counts=counts, prompt_sum=counts * float(PROMPT),
                 output_sum=counts * float(OUTPUT), start_utc=MONDAY)


def per_request(counts: np.ndarray, seed: int = 2) -> Trace:
    """The same load request by request: each second's arrivals at uniform times within it."""
    rng = np.random.default_rng(seed)
    arrivals = np.sort(np.concatenate([s + rng.uniform(0, 1, c) for s, c in enumerate(counts)]))
    return Trace(name="phases", duration_s=float(len(counts)), counts=counts, prompt_sum=counts * float(PROMPT),
                 output_sum=counts * float(OUTPUT), arrivals=arrivals, prompt_tokens=np.full(len(arrivals), PROMPT),
                 output_tokens=np.full(len(arrivals), OUTPUT), start_utc=MONDAY)


def settings(cold_start: float) -> SimSettings:
    return SimSettings(capacity=LLAMA_3_1_8B_H100, cold_start_s=cold_start, seed=1)


def ebbtide(spec, cold_start: float, profile=None) -> EbbtidePolicy:
    return EbbtidePolicy(spec, learned_capacity=CAPACITY, startup_seconds=cold_start, profile=profile)
