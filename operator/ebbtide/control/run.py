"""`ebbtide run`: start kopf with the handlers and the settings from the command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.server
import logging
import signal
import threading
from collections.abc import Iterator

import kopf

from ebbtide.cluster.reachable import wait_for_api_server
from ebbtide.control.config import OperatorConfig
from ebbtide.control.leader import LeaseElector, identity, lose_leadership, own_namespace
from ebbtide.control.metrics import OperatorMetrics
from ebbtide.control.shard import parse_selector


def run_operator(args: argparse.Namespace) -> int:
    import ebbtide.control.handlers  # noqa: F401  (registers the handlers with kopf)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Until kopf's own handler is in place, SIGTERM is a clean exit too (the Lease released below).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    config = OperatorConfig.from_env()
    # replace(), not a new OperatorConfig: the environment's other settings (the chart's
    # EBBTIDE_ENGINE_TIMEOUT_SECONDS) must survive the command line's.
    config = dataclasses.replace(config, prometheus_url=args.prometheus_url or config.prometheus_url,
                                 metrics_port=args.metrics_port, namespaces=tuple(args.namespace))
    # Served from the start: a standby is scrapeable too (ebbtide_leader 0, nothing else).
    metrics = OperatorMetrics()
    metrics.serve(config.metrics_port)
    elector = None
    try:
        wait_for_api_server()
        if args.leader_election:
            # Nothing of kopf runs before the Lease is held: no handler, no loop, no write.
            elector = LeaseElector(args.lease_namespace or own_namespace(), args.lease_name, identity())
            with standby_health(args.health_port):
                elector.acquire()
            metrics.leader.set(1)  # from the Lease on, not from kopf's start some seconds later
            elector.keep(on_lost=lose_leadership)
    except KeyboardInterrupt:  # Ctrl-C while waiting: kopf, which handles it later, has not started
        return 130
    try:
        kopf.run(
            standalone=True,  # one writer is the Lease's job; kopf's own peering is not used
            namespaces=args.namespace,
            clusterwide=not args.namespace,
            liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
            memo=kopf.Memo(config=config, metrics=metrics, in_shard=parse_selector(args.selector)),
        )
    finally:
        if elector is not None:
            elector.release()
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


@contextlib.contextmanager
def standby_health(port: int) -> Iterator[None]:
    """/healthz answers 200 while a standby waits for the Lease, so that its liveness probe does
    not restart it; kopf's own endpoint takes the port over once this one is closed."""
    if not port:
        yield
        return

    class Standby(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"standing by\n")

        def log_message(self, *args) -> None:  # one probe every few seconds: not worth a log line
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Standby)
    thread = threading.Thread(target=server.serve_forever, name="standby-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
