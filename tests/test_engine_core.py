"""The clock-free engine model: scheduling, KV cache and preemption, sleep, and the decode-run shortcut."""

import math
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebbtide.sim.capacity import LLAMA_3_1_8B_H100, TINY
from ebbtide.sim.engine_core import EngineCore
from ebbtide.sim.engine_types import EngineBusy, EngineSleeping, Finished, FirstToken, Tokens


def finished_by_id(events):
    return {e.request_id: e for e in events if isinstance(e, Finished)}


def test_a_lone_request_follows_the_step_equation():
    m = TINY
    core = EngineCore(m)
    core.submit("a", 100, 5, now=1.0)
    events = core.advance(10.0)
    first = next(e for e in events if isinstance(e, FirstToken))
    prefill = m.step_seconds(0, 0, 100)
    assert first.time == pytest.approx(1.0 + prefill) and first.ttft == pytest.approx(prefill)
    # Four decode steps with a context of 101, 102, 103, 104 tokens.
    decode = sum(m.decode_step_seconds(1, 100 + k) for k in range(1, 5))
    done = finished_by_id(events)["a"]
    assert done.finished_at == pytest.approx(1.0 + prefill + decode)
    assert done.mean_itl == pytest.approx(decode / 4)
    assert done.queue_time == 0 and done.output_tokens == 5 and done.reason == "length"
    assert core.prompt_tokens_total == 100 and core.generation_tokens_total == 5
    assert core.idle and core.kv_cache_usage == 0 and core.next_event_time() is None
    assert sum(n for _, n in core.take_itl_samples()) == 4 and core.take_itl_samples() == []


def test_ttft_includes_the_queue():
    core = EngineCore(TINY.with_overrides(max_num_seqs=1))
    core.submit("a", 10, 20, now=0.0)
    core.submit("b", 10, 20, now=0.0)
    core.advance(0.001)
    assert (core.num_running, core.num_waiting) == (1, 1)
    done = finished_by_id(core.advance(10.0))
    assert done["b"].scheduled_at == pytest.approx(done["a"].finished_at)
    assert done["b"].ttft == pytest.approx(done["a"].e2e + TINY.step_seconds(0, 0, 10))


def test_long_prompts_are_prefilled_in_chunks():
    m = TINY  # 512-token step budget
    core = EngineCore(m)
    core.submit("a", 1200, 2, now=0.0)
    first = next(e for e in core.advance(10.0) if isinstance(e, FirstToken))
    assert first.ttft == pytest.approx(3 * m.step_base_s + 1200 / m.prefill_tokens_per_s)


def test_running_is_bounded_and_the_queue_drains():
    core = EngineCore(TINY)
    for i in range(20):
        core.submit(f"r{i}", 50, 30, now=0.0)
    core.advance(0.05)
    assert core.num_running == TINY.max_num_seqs and core.num_waiting == 16
    done = finished_by_id(core.advance(100.0))
    assert len(done) == 20 and core.num_running == core.num_waiting == 0
    ttfts = [done[f"r{i}"].ttft for i in range(20)]
    assert ttfts[-1] > 4 * ttfts[0]  # later arrivals waited for earlier ones


def test_kv_exhaustion_preempts_the_newest_and_recomputes():
    m = TINY.with_overrides(kv_cache_tokens=16 * 16, max_num_seqs=8)  # 16 blocks
    core = EngineCore(m)
    for i in range(4):  # 4 x (40 + 60) tokens need 28 blocks at the end
        core.submit(f"r{i}", 40, 60, now=0.0)
    events = []
    while not core.idle:
        events += core.advance(core.now + 0.05)
        assert 0 <= core.kv_cache_usage <= 1
    done = finished_by_id(events)
    assert core.preemptions_total > 0 and len(done) == 4
    assert all(e.output_tokens == 60 for e in done.values())
    assert core.generation_tokens_total == 4 * 60 and core.prompt_tokens_total == 4 * 40  # no double count
    assert done["r0"].finished_at < done["r3"].finished_at  # the oldest was never preempted
    assert sum(1 for e in events if isinstance(e, FirstToken)) == 4


def test_token_events_account_for_every_token():
    m = TINY.with_overrides(kv_cache_tokens=16 * 16, max_num_seqs=8)
    core = EngineCore(m, emit_tokens=True)
    for i in range(5):
        core.submit(f"r{i}", 30, 50, now=0.01 * i)
    events = core.advance(100.0)
    for i in range(5):
        mine = [e for e in events if e.request_id == f"r{i}"]
        assert isinstance(mine[0], FirstToken) and isinstance(mine[-1], Finished)
        assert 1 + sum(e.count for e in mine if isinstance(e, Tokens)) == 50
        times = [e.finished_at if isinstance(e, Finished) else e.time for e in mine]
        assert times == sorted(times)


def test_abort_frees_everything():
    core = EngineCore(TINY)
    core.submit("a", 100, 100, now=0.0)
    core.submit("b", 100, 100, now=0.0)
    core.advance(0.1)
    assert core.kv_cache_usage > 0
    aborted = core.abort("a", now=0.1)
    assert aborted.reason == "abort" and 0 < aborted.output_tokens < 100
    assert core.abort("a", now=0.1) is None and core.abort("nope", now=0.1) is None
    assert core.abort("b", now=0.1).reason == "abort"
    core.advance(1.0)
    assert core.idle and core.kv_cache_usage == 0


def test_sleep_only_when_idle_and_refuse_while_asleep():
    core = EngineCore(TINY)
    core.submit("a", 10, 3, now=0.0)
    with pytest.raises(EngineBusy):
        core.sleep(1)
    core.advance(1.0)
    core.sleep(1)
    assert core.is_sleeping and core.sleep_level == 1
    with pytest.raises(EngineSleeping):
        core.submit("b", 10, 3, now=1.0)
    with pytest.raises(ValueError):
        core.sleep(3)
    core.wake_up()
    core.submit("b", 10, 3, now=1.0)
    assert "b" in finished_by_id(core.advance(2.0))


def test_invalid_requests_are_rejected():
    core = EngineCore(TINY)
    with pytest.raises(ValueError, match="maximum context length"):
        core.submit("a", 2000, 100, now=0.0)
    with pytest.raises(ValueError):
        core.submit("a", 0, 10, now=0.0)
    core.submit("a", 10, 10, now=1.0)
    with pytest.raises(ValueError, match="duplicate"):
        core.submit("a", 10, 10, now=1.0)
    with pytest.raises(ValueError, match="backwards"):
        core.advance(0.5)


requests_strategy = st.lists(
    st.tuples(st.floats(0, 2, allow_nan=False), st.integers(1, 600), st.integers(1, 200)),
    min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=requests_strategy, kv_blocks=st.integers(50, 300), max_num_seqs=st.integers(1, 16),
       tick=st.floats(0.001, 0.5))
def test_invariants_and_shortcut_equivalence(requests, kv_blocks, max_num_seqs, tick):
    model = TINY.with_overrides(kv_cache_tokens=kv_blocks * 16, max_num_seqs=max_num_seqs)
    requests = sorted(requests)

    def run(step_by_step):
        core = EngineCore(model, step_by_step=step_by_step)
        events, pending, now = [], list(enumerate(requests)), 0.0
        while pending or not core.idle:
            now += tick
            while pending and pending[0][1][0] <= now:
                i, (arrival, prompt, output) = pending.pop(0)
                events += core.advance(arrival)
                core.submit(f"r{i}", prompt, output, arrival)
            events += core.advance(now)
            assert 0 <= core.kv_cache_usage <= 1
            assert core.num_running <= max_num_seqs
        return core, events

    fast, fast_events = run(False)
    slow, slow_events = run(True)
    done = finished_by_id(fast_events)
    assert len(done) == len(requests)  # everything finishes, with all its tokens
    assert fast.generation_tokens_total == sum(o for _, _, o in requests)
    assert fast.prompt_tokens_total == sum(p for _, p, _ in requests)
    for i, (_, _, output) in enumerate(requests):
        e = done[f"r{i}"]
        assert e.output_tokens == output and e.first_token_at <= e.finished_at and e.ttft > 0
    # The decode-run shortcut changes nothing but speed.
    slow_done = finished_by_id(slow_events)
    assert fast.preemptions_total == slow.preemptions_total
    for rid, e in done.items():
        assert e.finished_at == pytest.approx(slow_done[rid].finished_at, rel=1e-9)
        assert e.first_token_at == pytest.approx(slow_done[rid].first_token_at, rel=1e-9)
    fast_itl = fast.take_itl_samples()
    slow_itl = slow.take_itl_samples()
    assert sum(n for _, n in fast_itl) == sum(n for _, n in slow_itl)
    assert sum(s * n for s, n in fast_itl) == pytest.approx(sum(s * n for s, n in slow_itl), rel=1e-9)


def test_an_hour_of_traffic_is_fast():
    """An hour at 10 requests/s on one H100 replica: the fleet simulator runs ~70 of these."""
    rng, t, arrivals = random.Random(3), 0.0, []
    while t < 3600:
        t += rng.expovariate(10)
        arrivals.append((t, rng.randint(50, 3000), rng.randint(20, 500)))
    core = EngineCore(LLAMA_3_1_8B_H100)
    started = time.perf_counter()
    n_done = 0
    for i, (t, prompt, output) in enumerate(arrivals):
        n_done += sum(isinstance(e, Finished) for e in core.advance(t))
        core.submit(str(i), prompt, output, t)
    n_done += sum(isinstance(e, Finished) for e in core.advance(math.inf))
    elapsed = time.perf_counter() - started
    assert n_done == len(arrivals)
    assert elapsed < 10, f"{len(arrivals)} requests took {elapsed:.1f} s"
