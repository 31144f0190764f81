"""The operator's calls to a vLLM replica itself: POST /sleep and POST /wake_up (dev mode).

A call that fails is retried a few times with a short backoff (the engine refuses /sleep
while requests are still in flight, and a busy pod can miss a timeout); what is still failing
after that is returned as a message, and the caller replaces the replica.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

ATTEMPTS = 3
BACKOFF_SECONDS = 0.5


def engine_container(pod: dict) -> dict:
    """The pod's engine container (named vllm, else the first)."""
    containers = (pod.get("spec") or {}).get("containers") or []
    return next((c for c in containers if c.get("name") == "vllm"), containers[0] if containers else {})


def engine_status(pod: dict) -> dict:
    """The kubelet's status of the engine container; {} before it reports one."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    name = engine_container(pod).get("name")
    return next((s for s in statuses if s.get("name") == name), statuses[0] if statuses else {})


def engine_started_at(pod: dict) -> str | None:
    """When the engine container now running started (RFC 3339); None if none runs.

    What the operator records about an engine (asleep, warmed up) holds for one run of the
    container: a restart brings up a fresh engine, awake and cold.
    """
    return ((engine_status(pod).get("state") or {}).get("running") or {}).get("startedAt")


def engine_url(pod: dict) -> str | None:
    """http://podIP:port of the pod's engine (its container port named http, else the first),
    or None before the pod has an IP."""
    ip = (pod.get("status") or {}).get("podIP")
    ports = engine_container(pod).get("ports") or []
    port = next((p for p in ports if p.get("name") == "http"), ports[0] if ports else {}).get("containerPort")
    if not ip or not port:
        return None
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


class EngineClient:
    """One HTTP session for every engine the operator talks to."""

    def __init__(self, timeout_seconds: float, attempts: int = ATTEMPTS, backoff_seconds: float = BACKOFF_SECONDS):
        """`timeout_seconds` bounds one call: /wake_up answers once the weights are back on the
        GPU, in seconds at level 1 (0.3-6 s measured, reference/vllm.md), longer at level 2."""
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def sleep(self, url: str, level: int) -> tuple[float, str | None]:
        """(seconds taken, None) once the engine sleeps, or (seconds, why it failed)."""
        return await self._post(f"{url}/sleep", {"level": str(level)}, "sleep")

    async def wake_up(self, url: str) -> tuple[float, str | None]:
        """(seconds taken, None) once the engine is awake, or (seconds, why it failed)."""
        return await self._post(f"{url}/wake_up", {}, "wake_up")

    async def _post(self, url: str, params: dict[str, str], what: str) -> tuple[float, str | None]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        started = time.monotonic()
        error = "not tried"
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            try:
                async with self._session.post(url, params=params, timeout=self.timeout) as response:
                    if response.status < 300:
                        return time.monotonic() - started, None
                    body = (await response.text())[:200]
                    error = f"HTTP {response.status} {body}".strip()
            except (aiohttp.ClientError, TimeoutError) as e:
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return time.monotonic() - started, f"POST /{what} failed {self.attempts} times: {error}"
