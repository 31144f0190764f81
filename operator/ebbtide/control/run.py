"""`ebbtide run`: start kopf with the handlers and the settings from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging

import kopf

from ebbtide.cluster.kube import wait_for_api_server
from ebbtide.control.config import OperatorConfig


def run_operator(args: argparse.Namespace) -> int:
    import ebbtide.control.handlers  # noqa: F401  (registers the handlers with kopf)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = OperatorConfig.from_env()
    # replace(), not a new OperatorConfig: the environment's other settings (the chart's
    # EBBTIDE_ENGINE_TIMEOUT_SECONDS) must survive the command line's.
    config = dataclasses.replace(config, prometheus_url=args.prometheus_url or config.prometheus_url,
                                 metrics_port=args.metrics_port)
    try:
        wait_for_api_server()
    except KeyboardInterrupt:  # Ctrl-C while waiting: kopf, which handles it later, has not started
        return 130
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        namespaces=args.namespace,
        clusterwide=not args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
        memo=kopf.Memo(config=config),
    )
    return 0
