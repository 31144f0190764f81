"""The HTTP engine simulator over real HTTP: vLLM's routes, metrics, load behaviour and sleep mode."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ebbtide.sim.capacity import TINY
from ebbtide.sim.engine_server import free_port, parse_args, simulator_from_args, start

DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1"}
# From reference/vllm.md, written out again so a change in the server cannot go unnoticed.
TTFT_BUCKETS = "0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.25 0.5 0.75 1 2.5 5 7.5 10 20 40 80 160 640 2560"
ITL_BUCKETS = "0.01 0.025 0.05 0.075 0.1 0.15 0.2 0.3 0.4 0.5 0.75 1 2.5 5 7.5 10 20 40 80"
LATENCY_BUCKETS = "0.3 0.5 0.8 1 1.5 2 2.5 5 10 15 20 30 40 50 60 120 240 480 960 1920 7680"


@contextlib.asynccontextmanager
async def engine(*argv, environ=None):
    """A simulator on a free port, with a client session whose base URL points at it."""
    port = free_port()
    args = parse_args(["--preset", "tiny", "--served-model-name", "sim", "--port", str(port), *argv])
    sim = simulator_from_args(args, environ=environ or {})
    runner = await start(sim, "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            yield session, sim
    finally:
        await runner.cleanup()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def metrics(session):
    async with session.get("/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families, name, **labels):
    """The value of the sample `name` (as on the wire, e.g. with _total) that has `labels`."""
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError((name, labels))


async def complete(session, max_tokens=4, **extra):
    body = {"model": "sim", "prompt": "hello there", "max_tokens": max_tokens, **extra}
    async with session.post("/v1/completions", json=body) as r:
        return r.status, await r.json()


async def stream_ttft(session, max_tokens, prompt_tokens=50):
    """Client-side time to the first streamed token, and the number of token chunks."""
    started = time.monotonic()
    ttft, chunks = None, 0
    body = {"prompt": "x", "max_tokens": max_tokens, "stream": True, "ebbtide_prompt_tokens": prompt_tokens}
    async with session.post("/v1/completions", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                ttft = ttft or time.monotonic() - started
                chunks += 1
    return ttft, chunks


def test_metrics_have_vllm_names_labels_and_buckets():
    async def scenario():
        async with engine() as (session, _):
            status, body = await complete(session, max_tokens=3, ebbtide_prompt_tokens=40)
            assert status == 200 and body["usage"] == {"prompt_tokens": 40, "completion_tokens": 3,
                                                       "total_tokens": 43}
            families = await metrics(session)
        labels = {"model_name": "sim", "engine": "0"}
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            assert families[name].type == "gauge" and value(families, name, **labels) == 0
        for state, expected in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
            assert value(families, "vllm:engine_sleep_state", sleep_state=state, **labels) == expected
        assert value(families, "vllm:prompt_tokens_total", **labels) == 40
        assert value(families, "vllm:generation_tokens_total", **labels) == 3
        assert value(families, "vllm:num_preemptions_total", **labels) == 0
        assert value(families, "vllm:request_success_total", finished_reason="length", **labels) == 1
        for name, buckets in (("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
                              ("vllm:inter_token_latency_seconds", ITL_BUCKETS),
                              ("vllm:e2e_request_latency_seconds", LATENCY_BUCKETS),
                              ("vllm:request_queue_time_seconds", LATENCY_BUCKETS)):
            family = families[name]
            assert family.type == "histogram"
            les = [float(s.labels["le"]) for s in family.samples if s.name == name + "_bucket"]
            assert les == [float(b) for b in buckets.split()] + [float("inf")]
            assert all(s.labels["model_name"] == "sim" and s.labels["engine"] == "0" for s in family.samples)
        assert value(families, "vllm:time_to_first_token_seconds_count") == 1
        assert value(families, "vllm:inter_token_latency_seconds_count") == 2  # tokens after the first
        assert value(families, "vllm:cache_config_info", num_gpu_blocks=str(TINY.num_gpu_blocks)) == 1

    run(scenario())


def test_openai_shapes_models_health_and_errors():
    async def scenario():
        async with engine() as (session, _):
            async with session.get("/health") as r:
                assert r.status == 200
            async with session.get("/v1/models") as r:
                models = await r.json()
            assert [m["id"] for m in models["data"]] == ["sim"]
            body = {"messages": [{"role": "user", "content": "a" * 400}], "max_completion_tokens": 2}
            async with session.post("/v1/chat/completions", json=body) as r:
                chat = await r.json()
            assert chat["object"] == "chat.completion" and chat["usage"]["prompt_tokens"] == 100
            assert chat["choices"][0]["message"]["role"] == "assistant"
            assert chat["choices"][0]["finish_reason"] == "length"
            status, body = await complete(session, model="other")
            assert status == 404 and "does not exist" in body["error"]["message"]
            status, body = await complete(session, max_tokens=TINY.max_model_len)
            assert status == 400 and "context length" in body["error"]["message"]
            async with session.post("/v1/completions", data=b"{not json") as r:
                assert r.status == 400
            async with session.post("/sleep") as r:
                assert r.status == 404  # no sleep mode without the flag

    run(scenario())


def test_streaming_sends_every_token_then_done():
    async def scenario():
        async with engine() as (session, _):
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with session.post("/v1/chat/completions", json=body) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                lines = [line.strip() async for line in r.content if line.strip()]
        assert lines[-1] == b"data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
        assert len(content) == 7
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 7

    run(scenario())


def test_overload_grows_the_queue_and_ttft_then_drains():
    async def scenario():
        async with engine() as (session, _):
            # Below capacity: one request at a time never waits.
            calm = [await stream_ttft(session, 10) for _ in range(3)]
            assert all(chunks == 10 for _, chunks in calm)
            assert max(ttft for ttft, _ in calm) < 0.1
            # Above capacity: 40 requests at once on 4 sequences.
            burst = [asyncio.create_task(stream_ttft(session, 10)) for _ in range(40)]
            await asyncio.sleep(0.15)
            busy = await metrics(session)
            assert value(busy, "vllm:num_requests_running") == TINY.max_num_seqs
            assert value(busy, "vllm:num_requests_waiting") > 20
            assert value(busy, "vllm:kv_cache_usage_perc") > 0
            ttfts = sorted(ttft for ttft, _ in await asyncio.gather(*burst))
            assert ttfts[-1] > 5 * max(ttft for ttft, _ in calm) and ttfts[-1] > 0.5
            drained = await metrics(session)
            assert value(drained, "vllm:num_requests_waiting") == 0
            assert value(drained, "vllm:num_requests_running") == 0
            assert value(drained, "vllm:request_success_total", finished_reason="length") == 43
            assert value(drained, "vllm:request_queue_time_seconds_sum") > 5  # summed over the burst

    run(scenario())


def test_sleep_routes_need_the_flag_and_dev_mode():
    async def scenario():
        for argv, environ in (((), DEV_MODE), (("--enable-sleep-mode",), {})):
            async with engine(*argv, environ=environ) as (session, _):
                for method, path in (("POST", "/sleep?level=1"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
                    async with session.request(method, path) as r:
                        assert r.status == 404, (argv, environ, path)

    run(scenario())


def test_sleep_refuses_requests_and_wake_takes_the_model_time():
    async def scenario():
        async with engine("--enable-sleep-mode", environ=DEV_MODE) as (session, sim):
            in_flight = asyncio.create_task(complete(session, max_tokens=30))
            await asyncio.sleep(0.05)
            async with session.post("/sleep?level=1") as r:
                assert r.status == 409 and "in flight" in (await r.json())["error"]["message"]
            assert (await in_flight)[0] == 200
            async with session.post("/sleep?level=1") as r:
                assert r.status == 200
            async with session.get("/is_sleeping") as r:
                assert await r.json() == {"is_sleeping": True}
            async with session.get("/health") as r:
                assert r.status == 200  # like vLLM: health does not tell a sleeping replica apart
            status, body = await complete(session)
            assert status == 503 and body["error"]["type"] == "ServiceUnavailableError"
            families = await metrics(session)
            assert value(families, "vllm:engine_sleep_state", sleep_state="weights_offloaded") == 1
            assert value(families, "vllm:engine_sleep_state", sleep_state="awake") == 0
            started = time.monotonic()
            waking = asyncio.create_task(session.post("/wake_up"))
            await asyncio.sleep(0.05)
            assert (await complete(session))[0] == 503  # still waking
            async with await waking as r:
                assert r.status == 200
            assert time.monotonic() - started >= TINY.wake_level1_s
            assert (await complete(session))[0] == 200
            async with session.post("/sleep?level=2") as r:
                assert r.status == 200
            assert value(await metrics(session), "vllm:engine_sleep_state", sleep_state="discard_all") == 1
            started = time.monotonic()
            async with session.post("/wake_up") as r:
                assert r.status == 200
            assert time.monotonic() - started >= TINY.wake_level2_s
            async with session.get("/ebbtide/stats") as r:
                stats = await r.json()
        assert stats["sleep_calls"] == 3 and stats["sleeps_refused"] == 1 and stats["wake_up_calls"] == 2
        assert stats["requests_refused_asleep"] == 2 and stats["is_sleeping"] is False
        assert stats["requests_received"] == 4 and stats["requests_finished"] == 2

    run(scenario())


def test_a_client_that_leaves_aborts_its_request():
    async def scenario():
        async with engine() as (session, sim):
            body = {"prompt": "x", "max_tokens": 1000, "stream": True}
            async with session.post("/v1/completions", json=body) as r:
                await r.content.readline()
            for _ in range(50):
                await asyncio.sleep(0.02)
                if sim.core.idle:
                    break
            families = await metrics(session)
            assert value(families, "vllm:request_success_total", finished_reason="abort") == 1
            assert value(families, "vllm:num_requests_running") == 0
            assert value(families, "vllm:kv_cache_usage_perc") == 0

    run(scenario())


def test_startup_delay_binds_the_port_late_and_sigterm_drains():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "operator")}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ebbtide.sim.engine_server", "--preset", "tiny",
                             "--port", str(port), "--startup-delay", "1.5", "--served-model-name", "sim"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async def probe():
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/health") as r:
                    return r.status

        time.sleep(0.5)
        with pytest.raises(aiohttp.ClientConnectorError):
            run(probe())
        while time.monotonic() - started < 10:
            try:
                assert run(probe()) == 200
                break
            except aiohttp.ClientConnectorError:
                time.sleep(0.05)
        assert 1.5 <= time.monotonic() - started < 10

        async def terminate_during_a_request():
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
                request = asyncio.create_task(complete(session, max_tokens=60))
                await asyncio.sleep(0.1)
                proc.send_signal(signal.SIGTERM)
                return await request

        status, body = run(terminate_during_a_request())  # drained, not cut off
        assert status == 200 and body["usage"]["completion_tokens"] == 60
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
