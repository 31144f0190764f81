"""`ebbtide engine-sim`: an HTTP server that behaves like one vLLM replica, without a GPU.

It serves vLLM's OpenAI routes, /health, /metrics (vLLM's names, labels and buckets) and the
dev-mode sleep routes, and runs requests through EngineCore on the wall clock, so latencies,
queueing, KV-cache pressure and preemptions follow the CapacityModel in use.

Where it is deliberately stricter than vLLM: a request reaching a sleeping or waking engine gets
503, and /sleep with requests in flight gets 409 (real vLLM has crashed in both cases); both are
counted on GET /ebbtide/stats so tests can assert they never happened.

Request size: prompt tokens are estimated as ceil(characters / 4) of the prompt (or messages),
unless the body has `"ebbtide_prompt_tokens": N`; output is exactly max_tokens (default 16),
as with vLLM's ignore_eos.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping

from aiohttp import web

from ebbtide.arguments import Parser, port
from ebbtide.sim.capacity import PRESETS, CapacityModel, get_preset
from ebbtide.sim.engine_routes import Routes
from ebbtide.sim.engine_sim import EngineSimulator

log = logging.getLogger("ebbtide.engine-sim")


def build_app(sim: EngineSimulator) -> web.Application:
    routes = Routes(sim)
    app = web.Application()
    app.router.add_get("/health", routes.health)
    app.router.add_get("/version", routes.version)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_get("/ebbtide/stats", routes.stats)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/chat/completions", routes.chat_completions)
    if sim.sleep_routes:
        app.router.add_post("/sleep", routes.sleep)
        app.router.add_post("/wake_up", routes.wake_up)
        app.router.add_get("/is_sleeping", routes.is_sleeping)
        app.router.add_post("/reset_prefix_cache", routes.no_op)
        app.router.add_post("/collective_rpc", routes.no_op)

    async def engine_loop(app: web.Application):
        task = asyncio.get_running_loop().create_task(sim.drive())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(engine_loop)
    return app


async def start(sim: EngineSimulator, host: str, port: int, shutdown_timeout: float = 5.0) -> web.AppRunner:
    """Bind and serve; the caller calls `await runner.cleanup()` to stop, which lets requests in
    flight finish for up to `shutdown_timeout` seconds."""
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the
    # request in the engine, as vLLM aborts requests of closed connections.
    # aiohttp reads a timeout of 0 as "no limit": 0 here means what it means to vLLM, stop now.
    runner = web.AppRunner(build_app(sim), handler_cancellation=True, access_log=None,
                           shutdown_timeout=max(shutdown_timeout, 0.001))
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner


# -- command line --------------------------------------------------------------------------

_KNOBS = [f for f in dataclasses.fields(CapacityModel) if f.name != "name"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="ebbtide engine-sim",
                                     description="Serve a simulated vLLM replica (OpenAI routes, /metrics, sleep mode).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=8000)
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B-Instruct")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="names the model is served under; the first labels the metrics")
    parser.add_argument("--preset", default="llama-3.1-8b-h100", choices=sorted(PRESETS),
                        help="capacity model of the replica")
    parser.add_argument("--startup-delay", type=float, default=0.0, metavar="SECONDS",
                        help="bind the port only after this long, as vLLM does after loading the model")
    parser.add_argument("--enable-sleep-mode", action="store_true",
                        help="serve /sleep, /wake_up, /is_sleeping (also needs VLLM_SERVER_DEV_MODE=1)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, stop accepting connections and let requests in flight finish "
                             "for up to this long")
    parser.add_argument("--min-tick", type=float, default=0.005, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=logging.getLevelNamesMapping())
    knobs = parser.add_argument_group("capacity overrides (default: the preset's)")
    for f in _KNOBS:
        knobs.add_argument("--" + f.name.replace("_", "-"), type=int if f.type == "int" else float, default=None)
    return parser.parse_args(argv)


def simulator_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> EngineSimulator:
    environ = os.environ if environ is None else environ
    overrides = {f.name: getattr(args, f.name) for f in _KNOBS if getattr(args, f.name) is not None}
    model = get_preset(args.preset).with_overrides(**overrides)
    dev_mode = environ.get("VLLM_SERVER_DEV_MODE") == "1"
    if args.enable_sleep_mode and not dev_mode:
        log.warning("--enable-sleep-mode without VLLM_SERVER_DEV_MODE=1: sleep routes are not served")
    return EngineSimulator(model, model_path=args.model,
                           served_model_name=args.served_model_name[0] if args.served_model_name else None,
                           sleep_routes=args.enable_sleep_mode and dev_mode, min_tick=args.min_tick)


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = simulator_from_args(args)
    if args.startup_delay > 0:
        log.info("loading (simulated) for %.1f s", args.startup_delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.startup_delay)
        if stop.is_set():
            return
    runner = await start(sim, args.host, args.port, args.shutdown_timeout)
    log.info("serving %s (%s) on http://%s:%d", sim.served_model_name, sim.model.name, args.host, args.port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except ValueError as exc:  # a capacity override out of range
        log.error("%s", exc)
        return 2
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot serve: %s", exc)
        return 1
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and local runs)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
