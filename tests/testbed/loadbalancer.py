"""
A Service's load balancer for the test bed: what kube-proxy does for a ClusterIP.

`LoadBalancer` listens on a loopback port and forwards every ``/v1/*`` request (streaming
responses too, chunk by chunk) to one endpoint of the service: an endpoint the Service's EndpointSlices (written by the
real EndpointSlice controller) list as ready, at its address and the slice's port. It reads
the slices every ``refresh_interval`` seconds (or an ``endpoints`` callable). Asleep pods are not probed: the operator takes them out by flipping the
serving label, and a request that reaches a sleeping engine shows up in its /ebbtide/stats.

Endpoint choice: least outstanding requests (ties at random). No endpoint: 503 (counted).
Every forwarded response carries the header ``X-Testbed-Pod`` naming the pod.

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
import dataclasses
import logging
import os
import pathlib
import random
import signal
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from tests.testbed.engines import LoopThread, call_api, make_api_client, wait_until

logger = logging.getLogger(__name__)

POD_HEADER = 'X-Testbed-Pod'
HOP_BY_HOP = frozenset({'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'te',
                        'trailers', 'transfer-encoding', 'upgrade', 'content-length', 'content-encoding', 'host'})


@dataclasses.dataclass(frozen=True)
class Endpoint:
    name: str  # the pod's name
    url: str  # http://IP:PORT


def ready_endpoints(slices: list[Mapping[str, Any]]) -> list[Endpoint]:
    """The ready endpoints of a Service's EndpointSlices (ready excludes terminating ones), by pod name."""
    out = []
    for endpoint_slice in slices:
        port = next((p.get('port') for p in endpoint_slice.get('ports') or [] if p.get('port')), None)
        for endpoint in endpoint_slice.get('endpoints') or []:
            if port is None or not (endpoint.get('conditions') or {}).get('ready'):
                continue
            name = (endpoint.get('targetRef') or {}).get('name') or endpoint['addresses'][0]
            out.append(Endpoint(name, f"http://{endpoint['addresses'][0]}:{port}"))
    return sorted(out, key=lambda e: e.name)


class LoadBalancer:
    """
    Forwards ``/v1/*`` to the ready serving pods of one service (see the module doc).

    ``service`` and ``namespace`` name the Service; its EndpointSlices come from the API
    (``api_client`` or ``kubeconfig``, else the default kubeconfig), or from ``endpoints``, a callable returning `Endpoint`s (then no API is used). ``port`` 0
    picks a free one (see ``url`` after start). ``request_timeout`` bounds a forwarded request.
    ``hold_seconds`` > 0 holds a request that finds no endpoint until one appears (up to that
    long); ``GET /metrics`` shows how many are held, for an activation query.
    """

    def __init__(self, service: str, namespace: str = 'default', *, api_client: Any = None,
                 kubeconfig: str | os.PathLike | None = None,
                 endpoints: Callable[[], list[Endpoint]] | None = None, host: str = '127.0.0.1', port: int = 0,
                 refresh_interval: float = 0.5, request_timeout: float = 300.0, hold_seconds: float = 0.0) -> None:
        self.service = service
        self.namespace = namespace
        self._api_client_arg, self._kubeconfig = api_client, kubeconfig
        self._endpoints_fn = endpoints
        self.host, self.port = host, port
        self.refresh_interval = refresh_interval
        self.request_timeout = request_timeout
        # Like an activator (Knative's, or a gateway in front of a scaled-to-zero service): a
        # request that finds no endpoint waits up to this long for one before the 503.
        self.hold_seconds = hold_seconds
        self.held = 0  # requests waiting for an endpoint now (exported on /metrics)
        self.url = ''

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
        self._thread = LoopThread(f'load-balancer-{self.service}')
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
                                              connector=aiohttp.TCPConnector(limit=0))
        await self._refresh_once()
        app = web.Application()
        app.router.add_route('*', '/{tail:.*}', self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f'http://{self.host}:{self.port}'
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
        wait_until(lambda: self._refreshed >= target, timeout=timeout, interval=0.02)

    def wait_for_endpoints(self, count: int, timeout: float = 30.0) -> list[str]:
        """Block until exactly ``count`` endpoints are in the list; returns them."""
        wait_until(lambda: len(self._endpoints) == count, timeout=timeout,
                   message=f'{self.service}: expected {count} endpoints, have {self.endpoints()}')
        return self.endpoints()

    def stats(self) -> dict[str, Any]:
        return {
            'requests': self.requests_total,
            'no_endpoint': self.no_endpoint,
            'upstream_errors': self.upstream_errors,
            'per_pod': dict(self._per_pod),
            'outstanding': {k: v for k, v in self._outstanding.items() if v},
            'statuses': dict(self._statuses),
            'endpoints': self.endpoints(),
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
                                                 label_selector=f'kubernetes.io/service-name={self.service}')
                self._endpoints = ready_endpoints(slices.get('items') or [])
        except Exception as e:  # keep the last known endpoints, as kube-proxy does
            logger.warning('%s: could not refresh the endpoints: %s', self.service, e)
        self._refreshed += 1

    def _pick(self) -> Endpoint | None:
        if not self._endpoints:
            return None
        least = min(self._outstanding[e.name] for e in self._endpoints)
        return random.choice([e for e in self._endpoints if self._outstanding[e.name] == least])

    def metrics_text(self) -> str:
        labels = f'service="{self.service}",namespace="{self.namespace}"'
        return ('# HELP gateway_pending_requests Requests held waiting for an endpoint.\n'
                '# TYPE gateway_pending_requests gauge\n'
                f'gateway_pending_requests{{{labels}}} {self.held}\n'
                '# HELP gateway_requests_total Requests received.\n'
                '# TYPE gateway_requests_total counter\n'
                f'gateway_requests_total{{{labels}}} {self.requests_total}\n')

    async def _wait_for_endpoint(self) -> Endpoint | None:
        endpoint = self._pick()
        if endpoint is not None or self.hold_seconds <= 0:
            return endpoint
        self.held += 1
        try:
            deadline = asyncio.get_running_loop().time() + self.hold_seconds
            while endpoint is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
                endpoint = self._pick()
            return endpoint
        finally:
            self.held -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == '/metrics':
            return web.Response(text=self.metrics_text(), content_type='text/plain')
        if not request.path.startswith('/v1/'):
            return web.json_response({'error': {'message': f'{request.path}: only /v1/* is forwarded',
                                                'code': 404}}, status=404)
        self.requests_total += 1
        endpoint = await self._wait_for_endpoint()
        if endpoint is None:
            self.no_endpoint += 1
            self._statuses[503] += 1
            return web.json_response({'error': {'message': f'no ready endpoint for service {self.service}',
                                                'type': 'ServiceUnavailableError', 'code': 503}}, status=503)
        assert self._session is not None
        self._outstanding[endpoint.name] += 1
        self._per_pod[endpoint.name] += 1
        response: web.StreamResponse | None = None
        try:
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            async with self._session.request(request.method, endpoint.url + request.path_qs, data=body,
                                             headers=headers) as upstream:
                self._statuses[upstream.status] += 1
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        response.headers[key] = value
                response.headers[POD_HEADER] = endpoint.name
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            self.upstream_errors += 1
            logger.info('%s: forwarding to %s failed: %r', self.service, endpoint.name, e)
            if response is not None and response.prepared:
                raise  # the response has begun: all we can do is cut it short
            self._statuses[502] += 1
            return web.json_response({'error': {'message': f'upstream {endpoint.name} failed: {e!r}',
                                                'type': 'BadGateway', 'code': 502}},
                                     status=502, headers={POD_HEADER: endpoint.name})
        finally:
            self._outstanding[endpoint.name] -= 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m tests.testbed.loadbalancer',
                                     description="Forward /v1/* to the ready serving pods of one ebbtide service.")
    parser.add_argument('--kubeconfig', type=pathlib.Path)
    parser.add_argument('--namespace', default='default')
    parser.add_argument('--service', required=True)
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=0)
    parser.add_argument('--refresh-interval', type=float, default=0.5)
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
        print(f'Load balancer for {args.namespace}/{args.service} at {url}', flush=True)
        try:
            await stop.wait()
        finally:
            await balancer.astop()

    asyncio.run(run())


if __name__ == '__main__':
    main()
