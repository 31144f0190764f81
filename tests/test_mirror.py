"""The scaling loop's mirror of pods (cluster/mirror.py) on the real API server: listed once, then
kept by a watch; a write's answer shows at once; an older event never undoes it; while the API
server is away it says so, and once back it lists again."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable

import pytest

from ebbtide.cluster.kube import Kube
from ebbtide.cluster.mirror import Unavailable
from ebbtide.cluster.pods import essentials
from ebbtide.cluster.render import LABEL_SERVICE

NS = "default"
PODS = "v1/pods"


def pod(name: str, service: str | None = "chat") -> dict:
    """A pod no node takes (its node selector matches none): it stays as created."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {LABEL_SERVICE: service} if service else {}},
            "spec": {"nodeSelector": {"ebbtide.dev/test": "nowhere"},
                     "containers": [{"name": "engine", "image": "engine-sim"}]}}


async def until(probe: Callable, what: str, timeout: float = 30.0):
    """Await `probe()` (a coroutine function) until it returns something truthy; Unavailable counts as not yet."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = await probe()
        except Unavailable as e:
            last = e
        else:
            if last:
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last seen: {last!r}")


@pytest.fixture()
def kube(apiserver):
    client = apiserver.api_client()
    kube = Kube(client)
    yield kube
    kube.stop_watching()
    client.close()


def names(pods: list[dict]) -> set[str]:
    return {p["metadata"]["name"] for p in pods}


def test_the_mirror_follows_the_api_server_and_its_own_writes(apiserver, kube):
    server = apiserver.server
    for name, service in (("a", "chat"), ("b", "chat"), ("other", None)):
        server.create_object(pod(name, service))

    async def scenario():
        async def mirrored():
            return await kube.watched_pods(LABEL_SERVICE, essentials)

        assert names(await mirrored()) == {"a", "b"}  # the first read waits for the list; only labelled pods
        server.create_object(pod("c"))
        server.delete_object(PODS, NS, "b")
        server.patch_object(PODS, NS, "a", {"metadata": {"annotations": {"seen": "yes"}}})
        await until(lambda: _holds(mirrored, lambda pods: names(pods) == {"a", "c"} and any(
            p["metadata"].get("annotations", {}).get("seen") == "yes" for p in pods)), "the watch's changes")

        before = server.get_object(PODS, NS, "c")
        await kube.patch_pod_metadata(NS, "c", annotations={"ebbtide.dev/asleep-since": "1"})
        written = {p["metadata"]["name"]: p for p in await mirrored()}["c"]  # no wait: the write's answer
        assert written["metadata"]["annotations"] == {"ebbtide.dev/asleep-since": "1"}
        kube._mirrors["pods"].put(copy.deepcopy(before))  # an event older than the write, arriving late
        kept = {p["metadata"]["name"]: p for p in await mirrored()}["c"]
        assert kept["metadata"]["annotations"] == {"ebbtide.dev/asleep-since": "1"}

    asyncio.run(scenario())


async def _holds(read: Callable, check: Callable[[list[dict]], bool]) -> bool:
    return check(await read())


@pytest.mark.slow
def test_the_mirror_is_unavailable_while_the_api_server_is_away_and_lists_again_after(apiserver, kube):
    server, plane = apiserver.server, apiserver.plane
    server.create_object(pod("a"))

    async def scenario():
        async def mirrored():
            return await kube.watched_pods(LABEL_SERVICE, essentials)

        assert names(await mirrored()) == {"a"}
        async def out_of_step():
            try:
                await mirrored()
            except Unavailable as e:
                return e
            return None

        await asyncio.to_thread(plane.kill, "kube-apiserver")
        try:
            said = await until(out_of_step, "the mirror to say it is out of step")
        finally:
            await asyncio.to_thread(plane.restart, "kube-apiserver")
        assert "pods not in step with the API server" in str(said), said
        server.create_object(pod("b"))
        await until(lambda: _holds(mirrored, lambda pods: names(pods) == {"a", "b"}), "the mirror in step again",
                    timeout=60)

    asyncio.run(scenario())
