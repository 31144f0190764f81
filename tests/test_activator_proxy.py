"""The activator's data path on its own: the in-process `Activator` app in front of real
engine-simulator processes (`ebbtide engine-sim`), its endpoints set directly as its
EndpointSlice watch would (the watch itself runs on the real control plane in test_activator.py).

A held request goes as soon as a replica is ready; a streamed answer reaches the client while
the engine is still generating it; a replica that refuses the connection is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ebbtide.activator.endpoints import Endpoint
from ebbtide.activator.proxy import Activator
from ebbtide.sim.engine_server import free_port
from tests.testbed.engines import reaped, spawn
from tests.testbed.replays import CLI_ENV

pytestmark = pytest.mark.slow  # each test starts an engine process (seconds of imports)

COMPLETION = {"model": "sim", "prompt": "hello", "max_tokens": 4}


async def until(probe: Callable[[], object], what: str, timeout: float = 30.0) -> object:
    """Wait, in the event loop, until `probe()` is truthy (returned)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := probe()):
        assert loop.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.02)
    return result


@contextlib.asynccontextmanager
async def engine(session: aiohttp.ClientSession, *options: str) -> AsyncIterator[Endpoint]:
    """A real engine-simulator process on a free loopback port, once it answers /health."""
    port = free_port()
    process = spawn(["--preset", "tiny", "--served-model-name", "sim", "--host", "127.0.0.1", "--port", str(port),
                     *options], CLI_ENV, None)
    url = f"http://127.0.0.1:{port}"
    healthy: list[bool] = []

    async def probe() -> None:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{url}/health") as response:
                healthy.append(response.status == 200)

    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not any(healthy):
            assert process.poll() is None, "the engine simulator exited"
            assert loop.time() < deadline, "the engine simulator never answered /health"
            await probe()
            await asyncio.sleep(0.05)
        yield Endpoint(f"engine-{port}", url)
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        process.kill()
        process.wait()
        reaped(process)


@contextlib.asynccontextmanager
async def serving(activator: Activator) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """The activator's app on a free loopback port, and a client session."""
    runner = web.AppRunner(activator.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}", session
    finally:
        await runner.cleanup()


def sample(activator: Activator, name: str, **labels: str) -> float | None:
    return activator.registry.get_sample_value(name, {"service": "chat", "service_namespace": "default", **labels})


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 120))


def test_a_held_request_goes_to_the_first_ready_replica():
    async def scenario() -> None:
        activator = Activator("default", "chat", hold_seconds=60)
        async with serving(activator) as (url, session):
            activator.set_endpoints([])
            request = asyncio.ensure_future(session.post(f"{url}/v1/completions", json=COMPLETION))
            await until(lambda: sample(activator, "ebbtide_activator_pending_requests") == 1, "a request held")
            assert not request.done()

            async with engine(session) as replica:
                activator.set_endpoints([replica])
                async with await request as response:
                    assert response.status == 200, await response.text()
                    assert (await response.json())["choices"][0]["text"]
            assert sample(activator, "ebbtide_activator_pending_requests") == 0
            assert sample(activator, "ebbtide_activator_hold_seconds_count") == 1
            assert sample(activator, "ebbtide_activator_requests_total", outcome="forwarded") == 1

    run(scenario())


def test_a_streamed_answer_reaches_the_client_while_the_engine_still_generates():
    """SSE passes through event by event: the first `data:` event is read while the engine
    still counts the request as running (a proxy that buffered would deliver it only at the end)."""
    async def scenario() -> None:
        activator = Activator("default", "chat", hold_seconds=5)
        async with serving(activator) as (url, session):
            # 300 tokens at 10 ms a step: seconds of generation, far more than one read of /metrics.
            async with engine(session, "--step-base-s", "0.01") as replica:
                activator.set_endpoints([replica])
                body = {**COMPLETION, "max_tokens": 300, "stream": True}
                async with session.post(f"{url}/v1/completions", json=body) as response:
                    assert response.status == 200
                    assert response.headers["Content-Type"].startswith("text/event-stream")
                    assert "Content-Length" not in response.headers
                    first = await response.content.readline()
                    assert first.startswith(b"data: {"), first
                    assert await running(session, replica) == 1, "the whole answer was buffered first"
                    events = [first] + [line async for line in response.content if line.startswith(b"data: ")]
                assert events[-1].strip() == b"data: [DONE]"
                text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
                assert len(events) > 100 and text, (len(events), text[:80])

    run(scenario())


async def running(session: aiohttp.ClientSession, replica: Endpoint) -> float:
    async with session.get(f"{replica.url}/metrics") as response:
        families = text_string_to_metric_families(await response.text())
    return sum(s.value for f in families for s in f.samples if s.name == "vllm:num_requests_running")


def test_a_replica_that_refuses_the_connection_is_skipped(caplog):
    """A request whose only replica refuses the connection (nothing was sent) waits for
    another and is answered by it; with both listed, no request fails."""
    caplog.set_level(logging.INFO, logger="ebbtide.activator")

    async def scenario() -> None:
        activator = Activator("default", "chat", hold_seconds=60)
        gone = Endpoint("gone", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        async with serving(activator) as (url, session):
            activator.set_endpoints([gone])
            request = asyncio.ensure_future(session.post(f"{url}/v1/completions", json=COMPLETION))
            await until(lambda: sample(activator, "ebbtide_activator_pending_requests") == 1,
                        "the request held after the refusal")
            assert "gone" in caplog.text and "sending the request elsewhere" in caplog.text

            async with engine(session) as replica:
                activator.set_endpoints([gone, replica])
                async with await request as response:
                    assert response.status == 200, await response.text()
                for _ in range(20):
                    async with session.post(f"{url}/v1/completions", json=COMPLETION) as response:
                        assert response.status == 200, await response.text()
            assert sample(activator, "ebbtide_activator_requests_total", outcome="forwarded") == 21
            assert not sample(activator, "ebbtide_activator_requests_total", outcome="upstream_error")

    run(scenario())
