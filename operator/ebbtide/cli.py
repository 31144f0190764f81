"""The `ebbtide` command: run the operator, simulate a spec on a trace, render, generate the CRD."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ebbtide.arguments import Parser, option, port, refuse
from ebbtide.control.shard import namespace_option, selector_option


def _crd(args: argparse.Namespace) -> int:
    from ebbtide.api.crd import CRD_FILENAME, crd_yaml

    text = crd_yaml()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CRD_FILENAME).write_text(text)
    except OSError as e:
        return refuse("ebbtide crd", f"cannot write {e.filename or out}: {e.strerror or e}")
    print(f"wrote {out / CRD_FILENAME}")
    return 0


def _render(args: argparse.Namespace) -> int:
    from ebbtide.api.manifest import InvalidSpec, load_manifests
    from ebbtide.cluster.render import render_workload

    try:
        services = load_manifests(args.file)
    except InvalidSpec as e:
        return refuse("ebbtide render", e)
    objects = [obj for ref, spec in services for obj in render_workload(ref, spec)]
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, explicit_start=True))
    return 0


def _run(args: argparse.Namespace) -> int:
    from ebbtide.control.run import run_operator

    return run_operator(args)


def _simulate(args: argparse.Namespace) -> int:
    from ebbtide.memory import keep_freed_memory
    from ebbtide.sim.command import run

    keep_freed_memory()  # a replay reallocates arrays of millions of points: reuse, don't re-fault
    return run(args)


def _activator(args: argparse.Namespace) -> int:
    from ebbtide.activator.command import run

    return run(args)


def _engine_sim(argv: list[str]) -> int:
    from ebbtide.sim.engine_server import main

    return main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ebbtide",
        description="Runs vLLM model servers on Kubernetes and scales them for the lowest cost per token "
        "within latency SLOs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the operator (kopf) against the current cluster")
    run.add_argument("-n", "--namespace", action="append", default=[], type=option(namespace_option),
                     help="watch only this namespace (repeatable); default: all namespaces")
    run.add_argument("--prometheus-url", default=None,
                     help="Prometheus the signals are read from (default: $EBBTIDE_PROMETHEUS_URL)")
    run.add_argument("--metrics-port", type=port, default=9090, help="port of the operator's own /metrics (0: off)")
    run.add_argument("--health-port", type=port, default=8080, help="port of the liveness endpoint (0: off)")
    run.add_argument("-l", "--selector", default="", type=option(selector_option),
                     help="run only the InferenceServices whose labels match (e.g. shard=a): one shard")
    run.add_argument("--leader-election", action="store_true",
                     help="run only while holding a Lease, so that several replicas have one leader")
    run.add_argument("--lease-name", default="ebbtide-operator", help="the Lease's name (one per shard)")
    run.add_argument("--lease-namespace", default=None,
                     help="the Lease's namespace (default: the pod's own, from its service account)")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_run)

    simulate = sub.add_parser(
        "simulate", help="replay a traffic trace through a spec and the usual alternatives; cost and SLO",
        description="Replay a trace through the same decision core the operator runs, over a simulated "
        "vLLM fleet, next to static provisioning, HPA, KEDA, AIBrix APA and an oracle.")
    from ebbtide.sim.command import add_arguments

    add_arguments(simulate)
    simulate.set_defaults(func=_simulate)

    crd = sub.add_parser("crd", help="write the InferenceService CRD generated from the API models")
    crd.add_argument("--output-dir", default="crds", help="directory to write into (default: crds)")
    crd.add_argument("--stdout", action="store_true", help="print instead of writing a file")
    crd.set_defaults(func=_crd)

    render = sub.add_parser("render", help="print the objects the operator would create for a manifest")
    render.add_argument("file", help="a YAML file with one or more InferenceServices")
    render.set_defaults(func=_render)

    activator = sub.add_parser(
        "activator", help="a proxy in front of a service that holds requests while no replica is ready",
        description="Forward requests to the ready replicas of one InferenceService; while none is ready, "
        "hold them (scale from zero) and export how many for scaling.activation.query.")
    from ebbtide.activator.command import add_arguments as activator_arguments

    activator_arguments(activator)
    activator.set_defaults(func=_activator)

    sub.add_parser("engine-sim", help="run a vLLM engine simulator (HTTP), for tests and demos",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # engine-sim owns its own options; hand them over untouched.
    if argv and argv[0] == "engine-sim":
        return _engine_sim(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
