"""`ebbtide activator`: the command line and the process around the proxy (activator/proxy.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal

from aiohttp import web

from ebbtide.api.manifest import check_name, check_namespace
from ebbtide.arguments import number, option, port, refuse

log = logging.getLogger("ebbtide.activator")
PROG = "ebbtide activator"
# Where a pod finds its own namespace (the ServiceAccount mount), so the chart need not repeat it.
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def default_namespace() -> str:
    with contextlib.suppress(OSError):
        with open(POD_NAMESPACE_FILE) as f:
            return f.read().strip()
    return "default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", required=True, type=option(check_name),
                        help="the InferenceService whose replicas requests go to (its Service has its name)")
    parser.add_argument("-n", "--namespace", type=option(check_namespace), default=None,
                        help="the Service's namespace (default: the pod's own, else default)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--port", type=port, default=8000, help="port requests arrive on (default: 8000)")
    parser.add_argument("--metrics-port", type=port, default=9091,
                        help="port of /metrics, /healthz and /readyz (default: 9091)")
    parser.add_argument("--hold-seconds", type=number(above=0), default=600.0,
                        help="the longest a request waits for a ready replica before a 503 (default: 600, "
                             "longer than most cold starts)")
    parser.add_argument("--max-pending", type=number(int, minimum=1), default=1000,
                        help="requests held at once; beyond it a request gets 503 at once (default: 1000)")
    parser.add_argument("--drain-seconds", type=number(minimum=0), default=5.0,
                        help="on SIGTERM, keep taking requests this long (readyz says 503) while the "
                             "Service's endpoints forget this pod, then stop (default: 5)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


async def serve(args: argparse.Namespace) -> None:
    import kubernetes

    from ebbtide.activator.endpoints import EndpointWatch
    from ebbtide.activator.proxy import Activator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    activator = Activator(args.namespace, args.service, hold_seconds=args.hold_seconds,
                          max_pending=args.max_pending)
    # handler_cancellation: a client that gives up stops being held (and counted as pending).
    runners = [web.AppRunner(activator.app(), handler_cancellation=True, access_log=None, shutdown_timeout=30),
               web.AppRunner(activator.metrics_app(), access_log=None)]
    started, watch = [], None
    try:
        for runner, bind_port in zip(runners, (args.port, args.metrics_port), strict=True):
            if bind_port:
                await runner.setup()
                started.append(runner)
                await web.TCPSite(runner, args.host, bind_port, reuse_address=True).start()
        watch = EndpointWatch(kubernetes.client.ApiClient(), args.namespace, args.service,
                              lambda found: loop.call_soon_threadsafe(activator.set_endpoints, found)).start()
        log.info("holding and forwarding requests for %s/%s on %s:%d (metrics on :%d)", args.namespace,
                 args.service, args.host, args.port, args.metrics_port)
        await stop.wait()
        # Endpoints and kube-proxy learn of a terminating pod a moment after it gets SIGTERM;
        # closing the port at once would refuse the connections still sent here meanwhile.
        activator.stopping = True
        await asyncio.sleep(args.drain_seconds)
    finally:
        # Stop taking requests and let the ones in flight finish (shutdown_timeout), still
        # watching the endpoints for those held; then stop watching.
        for runner in started:
            await runner.cleanup()
        if watch is not None:
            watch.stop()


def run(args: argparse.Namespace) -> int:
    from ebbtide.cluster.reachable import wait_for_api_server

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.namespace = args.namespace or os.environ.get("POD_NAMESPACE") or default_namespace()
    try:
        wait_for_api_server(log)
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # the port is taken, or the address is not this host's
        return refuse(PROG, f"cannot listen: {e.strerror or e}")
    return 0
