"""The activator's data path: hold a request while the Service has no ready endpoint, then
forward it, streaming, to the ready endpoint with the fewest requests in flight.

No request is turned away while a replica may still come: a held request waits for the next
ready endpoint (woken by the EndpointSlice watch, not a poll) up to `hold_seconds`, and one
whose connection an endpoint refuses (a pod that just went) is sent to another or held again.
Only what cannot be helped fails: the hold running out, more requests held than `max_pending`,
or a replica that breaks a response it had begun.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Callable, Mapping

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ebbtide.activator.endpoints import Endpoint

log = logging.getLogger("ebbtide.activator")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailers", "transfer-encoding", "upgrade", "content-length", "host"})
# A cold start (image pull, weight load) takes minutes; the hold must outlast the likely one.
HOLD_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
CONNECT_TIMEOUT_S = 5.0


class Unreachable(Exception):
    """The endpoint took no part in the request (no connection): safe to send it elsewhere."""


class Broken(Exception):
    """The endpoint failed the request after the connection was made; `begun`: the answer had
    started reaching the client, so it can only be cut short."""

    def __init__(self, problem: BaseException, begun: bool) -> None:
        super().__init__(repr(problem))
        self.begun = begun


async def forward(session: aiohttp.ClientSession, request: web.Request, body: bytes, endpoint: Endpoint,
                  headers: Mapping[str, str] | None = None,
                  begun: Callable[[], None] = lambda: None) -> web.StreamResponse:
    """Send the request to `endpoint` and stream its answer back chunk by chunk (token streams
    stay streams), `headers` added; `begun` is called once the answer reaches the client.
    Raises Unreachable if no connection was made, Broken if the endpoint failed after that."""
    sent = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    try:
        upstream = await session.request(request.method, endpoint.url + request.path_qs, data=body, headers=sent)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
        raise Unreachable(f"{endpoint.name}: {e}") from e
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise Broken(e, begun=False) from e
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    try:
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers[key] = value
        response.headers.update(headers or {})
        await response.prepare(request)
        begun()
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        if request.transport is None or request.transport.is_closing():
            return response  # the client left (a streaming one may, once it has read [DONE]): not a fault
        raise Broken(e, begun=response.prepared) from e
    finally:
        upstream.release()
    return response


def error(status: int, kind: str, message: str, **headers: str) -> web.Response:
    """An answer in the OpenAI error shape, which clients of vLLM already parse."""
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status,
                             headers=headers)


class Activator:
    """Holds and forwards the requests of one Service. `set_endpoints` (from the watch, in the
    event loop) says where requests may go; `app()` serves them, `metrics_app()` the metrics."""

    def __init__(self, namespace: str, service: str, *, hold_seconds: float = 600.0, max_pending: int = 1000,
                 registry: CollectorRegistry | None = None) -> None:
        self.namespace, self.service = namespace, service
        self.hold_seconds, self.max_pending = hold_seconds, max_pending
        self.endpoints: list[Endpoint] = []
        self.known = False  # the endpoint list has been read at least once
        self.stopping = False  # SIGTERM: still serving, but no longer ready
        self.outstanding: collections.Counter[str] = collections.Counter()
        self.pending = 0
        self._changed: asyncio.Condition | None = None
        self._session: aiohttp.ClientSession | None = None
        self.registry = registry or CollectorRegistry()
        labels = {"service": service, "service_namespace": namespace}
        # The gauge `scaling.activation.query` reads: requests waiting for a ready replica.
        self.pending_gauge = Gauge("ebbtide_activator_pending_requests",
                                   "Requests held waiting for a ready replica of the service.",
                                   list(labels), registry=self.registry).labels(**labels)
        self.ready_gauge = Gauge("ebbtide_activator_ready_endpoints", "Ready endpoints requests may go to.",
                                 list(labels), registry=self.registry).labels(**labels)
        self.requests = Counter("ebbtide_activator_requests", "Requests received, by how they ended: forwarded (a replica's answer reached the client), "
                                "hold_timeout, overflow, upstream_error, client_gone (left before any answer).",
                                [*labels, "outcome"], registry=self.registry)
        self.labels = labels
        self.held_for = Histogram("ebbtide_activator_hold_seconds",
                                  "How long a request that found no ready replica was held.",
                                  list(labels), buckets=HOLD_BUCKETS, registry=self.registry).labels(**labels)

    # --- where requests may go -------------------------------------------------------------

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        """Called in the event loop; wakes every held request to look again."""
        if endpoints != self.endpoints or not self.known:
            log.info("%s/%s: %d ready endpoint(s): %s", self.namespace, self.service, len(endpoints),
                     ", ".join(e.name for e in endpoints) or "none")
        self.endpoints, self.known = list(endpoints), True
        self.ready_gauge.set(len(endpoints))
        if self._changed is not None:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    def pick(self, avoid: set[str] = frozenset()) -> Endpoint | None:
        """The ready endpoint with the fewest requests in flight (ties at random)."""
        candidates = [e for e in self.endpoints if e.name not in avoid]
        if not candidates:
            return None
        least = min(self.outstanding[e.name] for e in candidates)
        return random.choice([e for e in candidates if self.outstanding[e.name] == least])

    async def _hold(self, deadline: float, avoid: set[str]) -> Endpoint | None:
        """Wait for a ready endpoint not in `avoid` until `deadline` (loop time); None if none came."""
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        self.pending += 1
        self.pending_gauge.set(self.pending)
        started = loop.time()
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.pick(avoid) is not None),
                                       max(0.0, deadline - loop.time()))
            return self.pick(avoid)
        except TimeoutError:
            return None
        finally:
            self.pending -= 1
            self.pending_gauge.set(self.pending)
            self.held_for.observe(loop.time() - started)

    # --- serving ---------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self.requests.labels(**self.labels, outcome=outcome).inc()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        answered = asyncio.Event()
        try:
            return await self._serve(request, answered.set)
        except asyncio.CancelledError:
            # The client went away: before any answer (held, or the replica had not begun), or
            # mid-answer, which a streaming client also does once it has read `[DONE]`.
            self._count("forwarded" if answered.is_set() else "client_gone")
            raise

    async def _serve(self, request: web.Request, answered: Callable[[], None]) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()  # read once: a request sent elsewhere needs it again
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_seconds
        refused: set[str] = set()  # endpoints that refused this request's connection
        while True:
            endpoint = self.pick(refused)
            if endpoint is None:
                if self.pending >= self.max_pending:
                    self._count("overflow")
                    return error(503, "ServiceUnavailableError", f"{self.max_pending} requests are already held "
                                 f"for {self.namespace}/{self.service}", **{"Retry-After": "10"})
                endpoint = await self._hold(deadline, refused)
            if endpoint is None:
                self._count("hold_timeout")
                return error(503, "ServiceUnavailableError", f"no replica of {self.namespace}/{self.service} "
                             f"became ready within {self.hold_seconds:g} s", **{"Retry-After": "10"})
            self.outstanding[endpoint.name] += 1
            try:
                response = await forward(self._session, request, body, endpoint, begun=answered)
            except Unreachable as e:
                log.info("%s/%s: %s; sending the request elsewhere", self.namespace, self.service, e)
                refused.add(endpoint.name)
                continue
            except Broken as e:
                self._count("upstream_error")
                log.warning("%s/%s: %s failed a request: %s", self.namespace, self.service, endpoint.name, e)
                if e.begun:
                    raise  # the answer has begun: all that is left is to cut it short
                return error(502, "BadGateway", f"replica {endpoint.name} failed: {e}")
            finally:
                self.outstanding[endpoint.name] -= 1
            self._count("forwarded")
            return response

    async def _context(self, app: web.Application):
        self._changed = asyncio.Condition()
        # No total timeout: a long generation is not a fault. A replica that cannot be connected
        # to within a few seconds is treated as gone.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        yield
        await self._session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 ** 2)  # long prompts, images
        app.cleanup_ctx.append(self._context)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def metrics_app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            response = web.Response(body=generate_latest(self.registry))
            response.content_type, response.charset = CONTENT_TYPE_LATEST.split(";")[0], "utf-8"
            return response

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def readyz(_: web.Request) -> web.Response:
            # Ready once the endpoints have been read (before that every request would be held),
            # and no longer once stopping, so that the Service stops sending requests here.
            if self.stopping:
                return web.Response(status=503, text="stopping\n")
            return web.Response(text="ok\n") if self.known else web.Response(status=503, text="no endpoints read yet\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app
