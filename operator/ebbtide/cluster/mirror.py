"""A list the API server keeps current by a watch (what client-go calls an informer).

The scaling loop reads the fleet's pods and Deployments at every tick. Listed every tick, they
were 9 paged LISTs a tick at 1,000 services (3,000 pods) whether anything changed or not
(bench/operator_scale.py); mirrored, they are listed once and then only their changes arrive.

A watch runs on a thread of its own (the official client's watch blocks) per namespace the
operator watches (one for the cluster otherwise), on its own connection pool. After an error
the mirror lists again, and until that list succeeds it is unavailable: a tick fails with one
line, as a failed list did, rather than decide on pods the API server may no longer have.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from ebbtide.cluster.objects import newer

log = logging.getLogger(__name__)

WATCH_SECONDS = 300  # the API server ends a watch after this; it is resumed from where it ended
RETRY_SECONDS = (1, 2, 5, 10)  # after an error: the waits before each new list, the last repeated
Key = tuple[str, str]  # (namespace, name)


class Unavailable(Exception):
    """The mirror is not in step with the API server (not listed yet, or listing again after an error)."""


class Mirror:
    """The objects one list would return, kept by a watch: `items()` reads it, `put()` writes through.

    `pages(namespace)` lists (every page, each item cut down) and returns (items, resourceVersion);
    `watch_method(namespace)` is the client's list method to watch with; `keep` cuts an object
    down to what readers use."""

    def __init__(self, what: str, pages: Callable[[str | None], Any], watch_method: Callable[[str | None], Callable],
                 label_selector: str, keep: Callable[[dict], dict], namespaces: tuple[str, ...]) -> None:
        self.what = what
        self._pages, self._watch_method = pages, watch_method
        self.label_selector, self.keep = label_selector, keep
        self.namespaces = namespaces or (None,)  # None: one watch for the whole cluster
        self._lock = threading.Lock()
        self._objects: dict[Key, dict] = {}
        self._versions: dict[Key, str] = {}
        self._in_step: set[str | None] = set()  # namespaces listed and watched without error since
        self._failure: dict[str | None, str] = {}
        self._stopped = threading.Event()
        self._watches: list[kubernetes.watch.Watch] = []
        self._started: asyncio.Future | None = None

    async def items(self) -> list[dict]:
        """Every object, as the API server last told; raises Unavailable while not in step."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)
        with self._lock:
            out_of_step = [ns for ns in self.namespaces if ns not in self._in_step]
            if out_of_step:
                where = f" in {out_of_step[0]}" if out_of_step[0] else ""
                raise Unavailable(f"{self.what}{where} not in step with the API server: "
                                  f"{self._failure.get(out_of_step[0], 'listing')}")
            return list(self._objects.values())

    async def _start(self) -> None:
        """The first list of each namespace, before the first read: on the event loop's terms,
        so that a tick waits for it; the watches then run on their threads."""
        loop = asyncio.get_running_loop()
        for namespace in self.namespaces:
            try:
                items, version = await self._pages(namespace)
            except Exception as e:  # the watch thread lists again, after its first wait
                self._fail(namespace, e)
                version = None
            else:
                self._replace(namespace, items)
            thread = threading.Thread(target=self._run, args=(namespace, version, loop), daemon=True,
                                      name=f"mirror-{self.what}-{namespace or 'cluster'}")
            thread.start()

    def _run(self, namespace: str | None, version: str | None, loop: asyncio.AbstractEventLoop) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                if version is None:  # (again) after an error: a fresh list is the only proof of being in step
                    items, version = asyncio.run_coroutine_threadsafe(self._pages(namespace), loop).result()
                    self._replace(namespace, items)
                version = self._watch(namespace, version)
                failures = 0
            except Exception as e:
                if self._stopped.is_set():
                    return
                self._fail(namespace, e)
                version = None  # a 410 (too old to resume from) and every other error: list again
                self._stopped.wait(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
                failures += 1

    def _watch(self, namespace: str | None, version: str) -> str:
        """One watch from `version` until the API server ends it; returns where to resume."""
        watch = kubernetes.watch.Watch()
        self._watches.append(watch)
        try:
            kwargs: dict[str, Any] = {"namespace": namespace} if namespace else {}
            for event in watch.stream(self._watch_method(namespace), label_selector=self.label_selector,
                                      resource_version=version, allow_watch_bookmarks=True,
                                      timeout_seconds=WATCH_SECONDS, deserialize=False,
                                      # a connection gone quiet (no end, no bookmark) is a dead one
                                      _request_timeout=(10, WATCH_SECONDS + 30), **kwargs):
                obj = event.get("object") or {}
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if event.get("type") == "DELETED":
                    self._forget(obj)
                elif event.get("type") in ("ADDED", "MODIFIED"):
                    self.put(obj)
                if self._stopped.is_set():
                    break
            return version
        finally:
            self._watches.remove(watch)

    def put(self, obj: dict) -> None:
        """An object as the API server answered a write, or as a watch event carries it."""
        meta = obj.get("metadata") or {}
        key, version = (meta.get("namespace", ""), meta.get("name", "")), meta.get("resourceVersion", "")
        with self._lock:
            if newer(version, self._versions.get(key)):
                self._objects[key], self._versions[key] = self.keep(obj), version

    def _forget(self, obj: dict) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self._lock:
            self._objects.pop(key, None)
            self._versions.pop(key, None)

    def _replace(self, namespace: str | None, items: list[tuple[dict, str]]) -> None:
        """A namespace's objects (all of them with None) as a list just returned them."""
        with self._lock:
            for key in [k for k in self._objects if namespace is None or k[0] == namespace]:
                del self._objects[key], self._versions[key]
            for obj, version in items:
                meta = obj.get("metadata") or {}
                key = (meta.get("namespace", ""), meta.get("name", ""))
                self._objects[key], self._versions[key] = obj, version
            self._in_step.add(namespace)
            self._failure.pop(namespace, None)

    def _fail(self, namespace: str | None, error: Exception) -> None:
        reason = f"{error.status} {error.reason}" if isinstance(error, ApiException) else \
            f"{type(error).__name__}: {error}"
        with self._lock:
            first = namespace in self._in_step or namespace not in self._failure
            self._in_step.discard(namespace)
            self._failure[namespace] = reason
        if first:
            log.warning("%s%s: the watch failed (%s); listing again", self.what,
                        f" in {namespace}" if namespace else "", reason)

    def stop(self) -> None:
        """End the watches: each thread returns at its watch's next event or end."""
        self._stopped.set()
        for watch in list(self._watches):
            watch.stop()
