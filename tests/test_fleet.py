"""The simulated fleet: fluid and request-by-request agree; baselines behave as documented."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ebbtide.policy.observation import FleetState, PodSignals, Signals
from ebbtide.sim.baselines import AibrixApa, Hpa, Keda, Oracle, Static
from ebbtide.sim.capacity import LLAMA_3_1_8B_H100
from ebbtide.sim.fleet import SimSettings, simulate
from ebbtide.sim.serving import weighted_quantile
from ebbtide.sim.traces import Trace

PROMPT, OUTPUT = 1000, 200


def poisson_trace(rate: float, seconds: int, seed: int = 3) -> Trace:
    rng = np.random.default_rng(seed)
    arrivals = np.sort(rng.uniform(0, seconds, rng.poisson(rate * seconds)))
    prompt = np.full(len(arrivals), PROMPT)
    output = np.full(len(arrivals), OUTPUT)
    counts = np.bincount(arrivals.astype(int), minlength=seconds)
    return Trace(name="poisson", duration_s=float(seconds), counts=counts, prompt_sum=counts * float(PROMPT),
                 output_sum=counts * float(OUTPUT), arrivals=arrivals, prompt_tokens=prompt, output_tokens=output)


def ttft_quantiles(run, qs=(0.5, 0.9)):
    _, ttft, _, w = run.records.arrays()
    return [weighted_quantile(ttft, w, q) for q in qs]


@pytest.mark.parametrize("load", [0.5, 0.8])
def test_fluid_and_request_models_agree_below_saturation(load):
    """Below saturation both see no queue: TTFT is the prefill plus a step, within 30 %."""
    saturation = LLAMA_3_1_8B_H100.saturation_rate(PROMPT, OUTPUT)
    trace = poisson_trace(load * saturation * 2, 600)
    settings = SimSettings(capacity=LLAMA_3_1_8B_H100, fluid_step_s=1.0)
    exact = simulate(trace, Static(replicas=2), settings, per_request=True)
    fluid = simulate(trace, Static(replicas=2), settings, per_request=False)
    (e50, e90), (f50, f90) = ttft_quantiles(exact), ttft_quantiles(fluid)
    assert e50 < 1.0 and f50 < 1.0
    assert f50 == pytest.approx(e50, rel=0.3)
    assert f90 == pytest.approx(e90, rel=0.3)
    # Same work served: tokens within 2 % (the fluid model serves the mean mix).
    assert fluid.tokens_served == pytest.approx(exact.tokens_served, rel=0.02)


def test_fluid_and_request_models_agree_on_overload():
    """Above saturation the queue grows at arrival rate minus capacity in both; the waits that
    follow from it agree within 25 %."""
    saturation = LLAMA_3_1_8B_H100.saturation_rate(PROMPT, OUTPUT)
    trace = poisson_trace(1.3 * saturation, 300)
    settings = SimSettings(capacity=LLAMA_3_1_8B_H100, fluid_step_s=1.0)
    exact = simulate(trace, Static(replicas=1), settings, per_request=True)
    fluid = simulate(trace, Static(replicas=1), settings, per_request=False)
    (e50, e90), (f50, f90) = ttft_quantiles(exact), ttft_quantiles(fluid)
    assert e90 > 10 and f90 > 10, "overload queues"
    assert f50 == pytest.approx(e50, rel=0.25)
    assert f90 == pytest.approx(e90, rel=0.25)


def signals(now, waiting=0.0, kv=0.0, ready=1):
    pods = tuple(PodSignals(pod=f"p{i}", sampled_at=now, waiting=waiting / ready, kv_cache_usage=kv)
                 for i in range(ready))
    return Signals(source="test", sampled_at=now, pods=pods)


def test_hpa_scales_up_at_most_max_of_4_pods_or_double_and_down_after_300s():
    hpa = Hpa(min_replicas=1, max_replicas=50)
    assert hpa.decide(signals(0, kv=1.0, ready=2), FleetState(current=2, ready=2), 0) == 4  # ceil(2 x 2.0)
    assert hpa.decide(signals(15, kv=1.0, ready=1), FleetState(current=1, ready=1), 15) == 2
    big = Hpa(min_replicas=1, max_replicas=50)
    assert big.decide(signals(0, kv=1.0, ready=10), FleetState(current=10, ready=10), 0) == 20
    tiny = Hpa(min_replicas=1, max_replicas=50)
    assert tiny.decide(signals(0, kv=5.0, ready=1), FleetState(current=1, ready=1), 0) == 5  # +4 pods
    # Step down: the load drops, but the highest recommendation of the last 300 s holds.
    down = Hpa(min_replicas=1, max_replicas=50)
    assert down.decide(signals(0, kv=0.5, ready=8), FleetState(current=8, ready=8), 0) == 8
    for t in range(15, 300, 15):
        assert down.decide(signals(t, kv=0.1, ready=8), FleetState(current=8, ready=8), t) == 8
    assert down.decide(signals(315, kv=0.1, ready=8), FleetState(current=8, ready=8), 315) == 2
    # Within tolerance nothing moves; missing metrics change nothing.
    assert down.decide(signals(330, kv=0.52, ready=8), FleetState(current=8, ready=8), 330) == 8
    assert down.decide(Signals.missing("gone"), FleetState(current=8, ready=8), 345) == 8


def test_keda_follows_waiting_over_threshold_5():
    keda = Keda(min_replicas=1, max_replicas=20)
    # ceil(42 / 5) = 9, but HPA underneath adds at most max(4 pods, 100 %) per period.
    assert keda.decide(signals(0, waiting=42, ready=2), FleetState(current=2, ready=2), 0) == 6
    assert keda.decide(signals(15, waiting=42, ready=2), FleetState(current=6, ready=2), 15) == 9
    # An empty queue is a recommendation of zero: after 300 s it collapses to the minimum.
    for t in range(30, 315, 15):
        assert keda.decide(signals(t, waiting=0, ready=9), FleetState(current=9, ready=9), t) == 9
    assert keda.decide(signals(330, waiting=0, ready=9), FleetState(current=9, ready=9), 330) == 1


def test_aibrix_apa_doubles_at_most_and_cools_down_300s():
    apa = AibrixApa(min_replicas=1, max_replicas=64)
    assert apa.decide(signals(0, kv=2.0, ready=4), FleetState(current=4, ready=4), 0) == 8  # x2 cap (not 16)
    assert apa.decide(signals(10, kv=0.52, ready=8), FleetState(current=8, ready=8), 10) == 8  # tolerance
    assert apa.decide(signals(20, kv=0.05, ready=8), FleetState(current=8, ready=8), 20) == 8  # cooldown
    assert apa.decide(signals(301, kv=0.05, ready=8), FleetState(current=8, ready=8), 301) == 4  # ÷2 cap


def test_oracle_runs_what_the_next_interval_needs():
    counts = np.array([10] * 15 + [40] * 15)
    oracle = Oracle.for_trace(counts, rate_per_replica=10.0, epoch=1000.0)
    assert oracle.needed == [1, 4]
    assert oracle.decide(Signals.missing("x"), FleetState(1, 1), 1015.0) == 4


def test_simulate_command_writes_every_policy_in_json(tmp_path):
    out = tmp_path / "out.json"
    plot = tmp_path / "out.png"
    result = subprocess.run([sys.executable, "-m", "ebbtide.cli", "simulate", "--trace", "conv-week",
                             "--hours", "6", "--json", str(out), "--plot", str(plot)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["trace"] == "conv-week" and document["requests"] > 0 and document["duration_s"] > 6 * 3500
    assert set(document["policies"]) == {"ebbtide", "static-peak", "hpa-kv", "keda-queue", "aibrix-apa", "oracle"}
    for metrics in document["policies"].values():
        for key in ("gpu_hours", "gpu_hours_by_type", "cost_usd", "usd_per_million_tokens", "ttft_p50_s",
                    "ttft_p90_s", "ttft_p99_s", "itl_p90_s", "slo_attainment", "scale_actions"):
            assert key in metrics
        assert 0.0 <= metrics["slo_attainment"] <= 1.0
    assert plot.stat().st_size > 10_000
    assert "SLO met" in result.stdout


def test_simulate_reports_a_malformed_trace(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,lots,5\n")
    result = subprocess.run([sys.executable, "-m", "ebbtide.cli", "simulate", "--trace", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "bad.csv:2: ContextTokens 'lots' is not a whole number" in result.stderr
