"""
A Service's load balancer for the test bed: what kube-proxy does for a ClusterIP.

`LoadBalancer` listens on a loopback port and forwards every ``/v1/*`` request (streaming
responses too, chunk by chunk) to one endpoint of the service: an endpoint the Service's EndpointSlices (written by the
real EndpointSlice controller) list as ready, at its address and the slice's port. It reads
the slices every ``refresh_interval`` seconds (or an ``endpoints`` callable). Asleep pods are not probed: the operator takes them out by flipping the
serving label, and a request that reaches a sleeping engine shows up in its /ebbtide/stats.

Endpoint choice: least outstanding requests (ties at random). No endpoint: 503 (counted), as
kube-proxy rejects a connection to a Service without endpoints; holding requests instead is
the real activator's work (`ebbtide activator`, tests/testbed/activator.py). Every forwarded
response carries the header ``X-Testbed-Pod`` naming the pod. The slices are read and the
requests forwarded by the activator's own code (ebbtide.activator).

In-process::

    with LoadBalancer('chat', 'default', api_client=apiserver.api_client()) as lb:
        requests.post(lb.url + '/v1/completions', json=...)
        lb.stats()

As a process::

    python -m tests.testbed.loadbalancer --kubeconfig KUBECONFIG --namespace default --service chat --port 8080
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import pathlib
import random
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from ebbtide.activator.endpoints import Endpoint, ready_endpoints, service_selector
from ebbtide.activator.proxy import Broken, Unreachable, error, forward
from tests.testbed.engines import LoopThread, call_api, make_api_client
from tests.testbed.waiting import wait_for

logger = logging.getLogger(__name__)

POD_HEADER = "X-Testbed-Pod"
__all__ = ["POD_HEADER", "Endpoint", "LoadBalancer", "ready_endpoints"]


class LoadBalancer:
    """
    Forwards ``/v1/*`` to the ready serving pods of one service (see the module doc).

    ``service`` and ``namespace`` name the Service; its EndpointSlices come from the API
    (``api_client`` or ``kubeconfig``, else the default kubeconfig), or from ``endpoints``, a callable returning `Endpoint`s (then no API is used). ``port`` 0
    picks a free one (see ``url`` after start). ``request_timeout`` bounds a forwarded request.
    """

    def __init__(self, service: str, namespace: str = "default", *, api_client: Any = None,
                 kubeconfig: str | os.PathLike | None = None,
                 endpoints: Callable[[], list[Endpoint]] | None = None, host: str = "127.0.0.1", port: int = 0,
                 refresh_interval: float = 0.5, request_timeout: float = 300.0) -> None:
        self.service = service
        self.namespace = namespace
        self._api_client_arg, self._kubeconfig = api_client, kubeconfig
        self._endpoints_fn = endpoints
        self.host, self.port = host, port
        self.refresh_interval = refresh_interval
        self.request_timeout = request_timeout
        self.url = ""

        self._endpoints: list[Endpoint] = []
        self._outstanding: collections.Counter[str] = collections.Counter()
        self._per_pod: collections.Counter[str] = collections.Counter()
        self._statuses: collections.Counter[int] = collections.Counter()
        self.requests_total = 0
        self.no_endpoint = 0  # answered 503: no ready serving pod
        self.upstream_errors = 0  # the pod could not be reached or broke the response
        self._client: Any = None
        self._owns_client = False
        self._discovery: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._refresher: asyncio.Task | None = None
        self._thread: LoopThread | None = None
        self._refreshed = 0

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> LoadBalancer:
        """Serve from a background thread; returns once listening with a first endpoint list."""
        self._thread = LoopThread(f"load-balancer-{self.service}")
        self._thread.start()
        try:
            self._thread.run(self.astart(), timeout=30)
        except BaseException:
            self._thread.stop()
            raise
        return self

    def stop(self) -> None:
        if self._thread is not None and self._thread.running:
            with contextlib.suppress(Exception):
                self._thread.run(self.astop(), timeout=30)
            self._thread.stop()
        self._thread = None

    def __enter__(self) -> LoadBalancer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def astart(self) -> str:
        """Start in the running loop (for async callers); returns the URL."""
        if self._endpoints_fn is None:
            import kubernetes.client
            self._client, self._owns_client = make_api_client(self._api_client_arg, self._kubeconfig)
            self._discovery = kubernetes.client.DiscoveryV1Api(self._client)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.request_timeout),
                                              connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        await self._refresh_once()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{self.port}"
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
        return self.url

    async def astop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        if self._owns_client and self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    # ------------------------------------------------------------------------------ observing

    def endpoints(self) -> list[str]:
        """The pods requests go to now."""
        return [e.name for e in self._endpoints]

    def refresh(self, timeout: float = 10.0) -> None:
        """Block until the endpoint list has been re-read after this call."""
        target = self._refreshed + 2
        wait_for(lambda: self._refreshed >= target, timeout=timeout, interval=0.02, what="an endpoint refresh")

    def wait_for_endpoints(self, count: int, timeout: float = 30.0) -> list[str]:
        """Block until exactly ``count`` endpoints are in the list; returns them."""
        wait_for(lambda: len(self._endpoints) == count, timeout=timeout, interval=0.05,
                 what=f"{self.service} with {count} endpoints")
        return self.endpoints()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests_total,
            "no_endpoint": self.no_endpoint,
            "upstream_errors": self.upstream_errors,
            "per_pod": dict(self._per_pod),
            "outstanding": {k: v for k, v in self._outstanding.items() if v},
            "statuses": dict(self._statuses),
            "endpoints": self.endpoints(),
        }

    def reset_stats(self) -> None:
        self.requests_total = self.no_endpoint = self.upstream_errors = 0
        self._per_pod.clear()
        self._statuses.clear()

    # ------------------------------------------------------------------------------ internals

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            await self._refresh_once()

    async def _refresh_once(self) -> None:
        try:
            if self._endpoints_fn is not None:
                self._endpoints = list(self._endpoints_fn())
            else:
                slices = await asyncio.to_thread(call_api, self._discovery.list_namespaced_endpoint_slice,
                                                 self.namespace,
                                                 label_selector=service_selector(self.service))
                self._endpoints = ready_endpoints(slices.get("items") or [])
        except Exception as e:  # keep the last known endpoints, as kube-proxy does
            logger.warning("%s: could not refresh the endpoints: %s", self.service, e)
        self._refreshed += 1

    def _pick(self) -> Endpoint | None:
        if not self._endpoints:
            return None
        least = min(self._outstanding[e.name] for e in self._endpoints)
        return random.choice([e for e in self._endpoints if self._outstanding[e.name] == least])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return error(404, "NotFoundError", f"{request.path}: only /v1/* is forwarded")
        self.requests_total += 1
        endpoint = self._pick()
        if endpoint is None:
            self.no_endpoint += 1
            self._statuses[503] += 1
            return error(503, "ServiceUnavailableError", f"no ready endpoint for service {self.service}")
        assert self._session is not None
        self._outstanding[endpoint.name] += 1
        self._per_pod[endpoint.name] += 1
        try:
            response = await forward(self._session, request, await request.read(), endpoint,
                                     headers={POD_HEADER: endpoint.name})
            self._statuses[response.status] += 1
            return response
        except (Unreachable, Broken) as e:
            self.upstream_errors += 1
            logger.info("%s: forwarding to %s failed: %s", self.service, endpoint.name, e)
            if isinstance(e, Broken) and e.begun:
                raise  # the response has begun: all we can do is cut it short
            self._statuses[502] += 1
            return error(502, "BadGateway", f"upstream {endpoint.name} failed: {e}", **{POD_HEADER: endpoint.name})
        finally:
            self._outstanding[endpoint.name] -= 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed.loadbalancer",
                                     description="Forward /v1/* to the ready serving pods of one ebbtide service.")
    parser.add_argument("--kubeconfig", type=pathlib.Path)
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--service", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--refresh-interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    balancer = LoadBalancer(args.service, args.namespace, kubeconfig=args.kubeconfig, host=args.host,
                            port=args.port, refresh_interval=args.refresh_interval)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        url = await balancer.astart()
        print(f"Load balancer for {args.namespace}/{args.service} at {url}", flush=True)
        try:
            await stop.wait()
        finally:
            await balancer.astop()

    asyncio.run(run())


if __name__ == "__main__":
    main()
