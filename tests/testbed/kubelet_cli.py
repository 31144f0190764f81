"""
The test bed's kubelet as a process of its own (for the end-to-end backend and by hand):

    python -m tests.testbed.kubelet --kubeconfig K --startup-delay 1 --max-grace-seconds 5 --log-dir DIR

Registers the fake Nodes, prints ``kubelet ready`` once the scheduler may use them, and runs
their pods until SIGTERM or SIGINT; then it stops every engine and removes its pod network.
Pods and Nodes stay in the API, as when a real kubelet stops. SIGUSR1 cuts the spot node off
(its Lease is no longer renewed: the node-lifecycle controller marks it NotReady, its engines
run on), SIGUSR2 reconnects it (its status and its pods' are posted again).
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import sys
import threading

from tests.testbed import kubelet as kubelet_module
from tests.testbed import podnetwork


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed.kubelet",
                                     description="Run the test bed kubelet: fake Nodes whose pods run engine simulators.")
    parser.add_argument("--kubeconfig", type=pathlib.Path, required=True, help="credentials for the API server")
    parser.add_argument("--preset", default="tiny", help="engine-simulator preset of every pod (default tiny)")
    parser.add_argument("--startup-delay", type=float, default=1.0, help="seconds an engine takes to start")
    parser.add_argument("--max-grace-seconds", type=float, default=None,
                        help="cap on a pod's termination grace period (default: the pod's own)")
    parser.add_argument("--honor-prestop", action="store_true", help="wait out a `sleep N` preStop hook")
    parser.add_argument("--log-dir", type=pathlib.Path, default=None, help="one log per pod (default: none)")
    parser.add_argument("--engine-log-level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if reason := podnetwork.missing_requirement():
        print(f"kubelet: {reason}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    import kubernetes.config
    client = kubernetes.config.new_client_from_config(config_file=str(args.kubeconfig))
    kubelet = kubelet_module.Kubelet(client, preset=args.preset, startup_delay=args.startup_delay,
                                     max_grace_seconds=args.max_grace_seconds, honor_prestop=args.honor_prestop,
                                     log_dir=args.log_dir, engine_log_level=args.engine_log_level)
    partitioned = kubelet.unavailable_pools  # a pool in it renews no Lease (Kubelet._sync)
    signal.signal(signal.SIGUSR1, lambda *_: partitioned.add("spot"))
    signal.signal(signal.SIGUSR2, lambda *_: partitioned.discard("spot"))
    try:
        kubelet.start()
        print(f"kubelet ready: nodes {', '.join(kubelet.nodes)}, pod network {kubelet.network.subnet}", flush=True)
        while not stop.wait(0.5):  # a short wait: the signal handler runs between waits
            pass
    finally:
        kubelet.stop()
        kubelet.network.close()
        client.close()
    leftovers = kubelet.live_pids()
    if leftovers:
        print(f"kubelet: engines still alive after stop: {sorted(leftovers)}", file=sys.stderr)
        return 1
    print("kubelet stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
