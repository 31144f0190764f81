"""
A pass-through proxy in front of the API server that counts one client's requests by verb and
resource, as the API server's own `apiserver_request_total{verb,resource}` does, but for that
client alone (the API server's counter has no user label). Watches are counted when they open,
and `open_watches` says how many are open now.

    with CountingProxy(plane.url, ca_file) as proxy:   # give the client proxy.url
        before = proxy.snapshot()
        ...
        proxy.since(before)   # {'patch inferenceservices/status': 12, 'list pods': 3, ...}
"""
from __future__ import annotations

import collections
import threading
import urllib.parse

from aiohttp import web

from tests.testbed.faultproxy import FaultProxy


def classify(method: str, path: str, query: str) -> tuple[str, str]:
    """(verb, resource) of a request, with the API server's verb names (`list`, `watch`, `get`...)."""
    parts = [p for p in path.split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]  # past /api/v1 or /apis/GROUP/VERSION
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    resource = rest[0] if rest else ""
    if len(rest) >= 3:
        resource += "/" + rest[2]  # a subresource: inferenceservices/status
    params = urllib.parse.parse_qs(query)
    if method == "GET":
        if params.get("watch", [""])[0] in ("1", "true"):
            verb = "watch"
        else:
            verb = "get" if len(rest) >= 2 else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
    return verb, resource


class CountingProxy(FaultProxy):
    def __init__(self, upstream: str, ca_file: str) -> None:
        super().__init__(upstream, ca_file)
        self.counts: collections.Counter[str] = collections.Counter()
        self.open_watches = 0
        self._lock = threading.Lock()  # counted in the proxy's thread, read from the caller's

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        verb, resource = classify(request.method, request.path, request.query_string)
        with self._lock:
            self.counts[f"{verb} {resource}"] += 1
        watching = verb == "watch"
        self.open_watches += watching
        try:
            return await super()._handle(request)
        finally:
            self.open_watches -= watching

    def snapshot(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self.counts)

    def since(self, before: collections.Counter[str]) -> dict[str, int]:
        return {k: v for k, v in sorted((self.snapshot() - before).items()) if v}
