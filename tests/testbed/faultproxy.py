"""
A thin fault-injecting proxy in front of the real API server, for faults it does not produce on
demand: a slow read, a 409 storm, a 500. Everything else passes through unchanged, watches too
(streamed chunk by chunk).

    with FaultProxy(apiserver.url, ca_file) as proxy:       # proxy.api_client(token): a client through it
        proxy.delay('GET', r'/inferenceservices/chat$', 0.5)  # every matching request waits first
        proxy.fail('PATCH', r'/deployments/', 409, times=3)   # the next 3 matching answer 409
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl

import aiohttp
from aiohttp import web

from tests.testbed.engines import LoopThread

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "host",
                        "content-encoding"})


@dataclasses.dataclass
class Rule:
    method: str
    pattern: re.Pattern
    delay: float = 0.0
    status: int | None = None
    times: int | None = None  # None: every matching request
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and bool(self.pattern.search(path)) and (
            self.times is None or self.hits < self.times)


class FaultProxy:
    def __init__(self, upstream: str, ca_file: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.ssl = ssl.create_default_context(cafile=ca_file)
        self.rules: list[Rule] = []
        self.url = ""
        self._loop = LoopThread("fault-proxy")
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def delay(self, method: str, path_regex: str, seconds: float, times: int | None = None) -> Rule:
        return self._add(Rule(method, re.compile(path_regex), delay=seconds, times=times))

    def fail(self, method: str, path_regex: str, status: int, times: int | None = None) -> Rule:
        return self._add(Rule(method, re.compile(path_regex), status=status, times=times))

    def api_client(self, token: str):
        """An official client that talks to the API server through this proxy (plain HTTP on loopback)."""
        import kubernetes.client
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        configuration.api_key = {"authorization": f"Bearer {token}"}
        return kubernetes.client.ApiClient(configuration)

    def clear(self) -> None:
        self.rules.clear()

    def _add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        for rule in self.rules:
            if rule.matches(request.method, request.path):
                rule.hits += 1
                if rule.delay:
                    await asyncio.sleep(rule.delay)
                if rule.status is not None:
                    return web.json_response(
                        {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": rule.status,
                         "reason": "Conflict" if rule.status == 409 else "InternalError",
                         "message": f"injected by the test bed: {rule.status}"}, status=rule.status)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        # skip_auto_headers: a body sent without a Content-Type must reach the server without one
        # (the official client sends creates that way), not as application/octet-stream.
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=await request.read(), ssl=self.ssl,
                                         skip_auto_headers=("Content-Type",)) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def _start(self) -> str:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A client that goes away (a killed process) ends its forwarded request, watches too, as
        # with the real API server; else stop() waits for watches that nobody reads any more.
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def start(self) -> FaultProxy:
        self._loop.start()
        self.url = self._loop.run(self._start(), timeout=10)
        return self

    def stop(self) -> None:
        self._loop.run(self._stop(), timeout=10)
        self._loop.stop()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
