"""
Engine processes for the test bed's kubelet, and the small helpers the test bed shares.

`engine_command` turns a pod's vLLM container (``vllm serve MODEL --served-model-name S
[--enable-sleep-mode] ...``) into an engine-simulator command line; `spawn` starts it tied to
this process (a test run killed hard leaves no engines behind).
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# The vLLM flags whose values the simulator models (they are also its capacity knobs).
ENGINE_KNOB_FLAGS = ("--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size")
# vLLM's store-true flags that may come before a positional argument.
BOOLEAN_FLAGS = frozenset({"--enable-sleep-mode", "--enforce-eager", "--trust-remote-code",
                           "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
                           "--disable-log-requests", "--disable-log-stats", "--enable-lora"})

# Every engine process started here and not reaped yet: killed at exit.
_LIVE_PROCESSES: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE_PROCESSES)
    for proc in leftovers:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)


def now_rfc3339(micro: bool = False) -> str:
    """Now as the API server writes times: whole seconds (Time), or microseconds (MicroTime)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def make_api_client(api_client: Any = None, kubeconfig: str | os.PathLike | None = None) -> tuple[Any, bool]:
    """The given ApiClient, or one from a kubeconfig (or the default one); and whether we own it."""
    if api_client is not None:
        return api_client, False
    import kubernetes.config
    if kubeconfig is not None:
        return kubernetes.config.new_client_from_config(config_file=str(kubeconfig)), True
    return kubernetes.config.new_client_from_config(), True


def call_api(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an official client method and decode the raw JSON (plain dicts, as the operator uses)."""
    response = fn(*args, _preload_content=False, **kwargs)
    data = response.data
    return json.loads(data) if data else None


def is_pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def readiness_gates_passed(pod: Mapping[str, Any]) -> bool:
    """True when the condition of every ``spec.readinessGates`` entry is True (none: True)."""
    gates = {g.get("conditionType") for g in (pod.get("spec") or {}).get("readinessGates") or []}
    conditions = {c.get("type"): c.get("status") for c in (pod.get("status") or {}).get("conditions") or []}
    return all(conditions.get(gate) == "True" for gate in gates)


class LoopThread:
    """An asyncio event loop in a daemon thread, driven from synchronous code."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        started = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            started.set()
            try:
                self.loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                    self.loop.run_until_complete(self.loop.shutdown_default_executor())
                self.loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        started.wait()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Schedule a coroutine in the loop; a concurrent.futures.Future."""
        assert self.loop is not None, "the loop thread is not started"
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop is not None and self.running:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)


@dataclasses.dataclass(frozen=True)
class EngineCommand:
    argv: list[str]
    env: dict[str, str]
    served_model_name: str


def engine_command(container: Mapping[str, Any], *, host: str, port: int, preset: str = "tiny", startup_delay: float = 0.0,
                   shutdown_timeout: float = 30.0, capacity_overrides: Mapping[str, Any] | None = None,
                   log_level: str = "WARNING", base_env: Mapping[str, str] | None = None) -> EngineCommand:
    """
    The simulator command (without the interpreter) and environment for a vLLM container.

    Reads ``vllm serve MODEL --served-model-name S [--enable-sleep-mode] [...]`` from the
    container's command and args (``--model M`` works too); the container's port is replaced by
    ``port``; vLLM flags the simulator does not model are dropped; ``--shutdown-timeout`` (how
    long vLLM lets requests in flight finish on SIGTERM) is kept. ``capacity_overrides`` (knob
    name to value, e.g. ``{'max_num_seqs': 8}``) win over the container's flags.
    """
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if command[:2] == ["vllm", "serve"]:
        args = command[2:] + args
    model: str | None = None
    served: list[str] = []
    sleep_mode = False
    knobs: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        i += 1
        if not arg.startswith("-"):
            model = model or arg
            continue
        flag, eq, inline = arg.partition("=")
        values: list[str] = [inline] if eq else []
        if not eq and flag not in BOOLEAN_FLAGS:
            while i < len(args) and not str(args[i]).startswith("--"):
                values.append(str(args[i]))
                i += 1
                if flag != "--served-model-name":
                    break  # every other flag takes at most one value
        if flag == "--served-model-name":
            served = values
        elif flag == "--model" and values:
            model = values[0]
        elif flag == "--enable-sleep-mode":
            sleep_mode = not values or values[0].lower() not in ("false", "0")
        elif flag == "--no-enable-sleep-mode":
            sleep_mode = False
        elif flag in ENGINE_KNOB_FLAGS and values:
            knobs[flag] = values[0]
        elif flag == "--shutdown-timeout" and values:  # vLLM's own flag: the container's wins
            shutdown_timeout = float(values[0])
        # anything else (--port, --tensor-parallel-size, ...) is not modelled
    model = model or "model"
    argv = ["--host", host, "--port", str(port), "--model", model, "--preset", preset,
            "--startup-delay", f"{startup_delay:g}", "--shutdown-timeout", f"{shutdown_timeout:g}",
            "--log-level", log_level]
    if served:
        argv += ["--served-model-name", *served]
    if sleep_mode:
        argv.append("--enable-sleep-mode")
    for flag, value in knobs.items():
        with contextlib.suppress(ValueError):
            argv += [flag, str(int(value))]
    for name, value in (capacity_overrides or {}).items():
        argv += ["--" + name.replace("_", "-"), str(value)]

    env = dict(os.environ if base_env is None else base_env)
    env.pop("VLLM_SERVER_DEV_MODE", None)  # only the container's env decides
    for var in container.get("env") or []:
        if var.get("name") and "valueFrom" not in var:  # secrets are not the test bed's to read
            env[var["name"]] = str(var.get("value", ""))
    env["PYTHONUNBUFFERED"] = "1"
    return EngineCommand(argv=argv, env=env, served_model_name=served[0] if served else model)


# A trampoline that ties the engine's life to the thread that started it (PR_SET_PDEATHSIG
# survives exec), so a runner killed hard leaves no engines behind.
_TRAMPOLINE = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'ebbtide.sim.engine_server', *sys.argv[2:]])\n"
)


def spawn(argv: list[str], env: Mapping[str, str], log_path: pathlib.Path | None,
          wrap: Callable[[list[str]], list[str]] = list) -> subprocess.Popen:
    """Start the engine; ``wrap`` prefixes the command (``ip netns exec NS``, which keeps the pid)."""
    cmd = wrap([sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *argv])
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    else:
        proc = subprocess.Popen(cmd, env=dict(env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with _LIVE_LOCK:
        _LIVE_PROCESSES.add(proc)
    return proc


def reaped(proc: subprocess.Popen) -> None:
    with _LIVE_LOCK:
        _LIVE_PROCESSES.discard(proc)
