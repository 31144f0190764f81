"""How a simulated fleet serves its load: request by request, or as a fluid.

Both models are driven the same way (replicas join and leave, time advances in steps, and at
every scrape the gauges and windowed quantiles Prometheus would hold are read), and both leave
behind the same latency records. Both read replica performance from one `CapacityModel`.

- `RequestServing` (sim/request_serving.py) runs one `EngineCore` (the engine simulator's own scheduler) per replica
  and routes every request as the Service in front of them would (request_serving.ROUTINGS).
  Exact, and fast enough for hour-long request logs.
- `FluidServing` (sim/fluid_serving.py) treats the replicas as one pool fed by a FCFS queue and moves load in
  aggregates per step. A week of traffic at a hundred requests per second is tens of millions
  of requests: too many to replay one by one within a minute, and the fluid view is accurate
  where it matters for autoscaling: when replicas are busy, the pool runs at the capacity
  model's steady-state throughput, and when they are not, the queue is empty and TTFT is the
  prefill time. The queueing delay of each arrival is the exact fluid FCFS delay: the time until
  cumulative admissions reach the arrival's position. What it does not see is the short-term
  queueing of Poisson bursts inside one step below saturation, imbalance between replicas
  (a Service routes at random), and the ITL spread prefill chunks give short requests;
  tests/test_fleet.py and bench/fluid_check.py measure the gap against `RequestServing`
  (docs/simulator.md has the numbers: it is optimistic, by several points of SLO attainment
  with random routing).

Signals are only computed for what the policy reads (`observes`: "pods", "latency",
"tokens"): a quantile nobody reads costs time and changes nothing.
"""

from __future__ import annotations

ALL_SIGNALS = frozenset({"pods", "latency", "tokens"})
