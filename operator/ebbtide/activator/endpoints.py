"""Where the activator may send a request: the ready endpoints of one Service, from its
EndpointSlices, which the EndpointSlice controller writes as kube-proxy reads them.

A replica the operator takes out of the Service (to drain or sleep it) leaves the slices, and a
terminating pod is not `ready` there, so neither gets a new request. The slices are listed and
then watched (one long request, not a poll), in a thread: the kubernetes client blocks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kubernetes
import urllib3

log = logging.getLogger("ebbtide.activator")
WATCH_SECONDS = 60  # the API server ends a watch after this; it is then resumed
MAX_BACKOFF_S = 30.0


@dataclasses.dataclass(frozen=True)
class Endpoint:
    name: str  # the pod's name
    url: str  # http://IP:PORT


def ready_endpoints(slices: Iterable[Mapping[str, Any]], port_name: str = "http") -> list[Endpoint]:
    """The ready endpoints of a Service's EndpointSlices (ready excludes terminating ones), by pod
    name, at the slice's port named `port_name` (else its first)."""
    out = []
    for endpoint_slice in slices:
        ports = [p for p in endpoint_slice.get("ports") or [] if p.get("port")]
        port = next((p["port"] for p in ports if p.get("name") == port_name), ports[0]["port"] if ports else None)
        for endpoint in endpoint_slice.get("endpoints") or []:
            if port is None or not (endpoint.get("conditions") or {}).get("ready"):
                continue
            address = endpoint["addresses"][0]
            host = f"[{address}]" if ":" in address else address
            out.append(Endpoint((endpoint.get("targetRef") or {}).get("name") or address, f"http://{host}:{port}"))
    return sorted(out, key=lambda e: e.name)


def service_selector(service: str) -> str:
    return f"kubernetes.io/service-name={service}"


class EndpointWatch:
    """Lists, then watches, the EndpointSlices of `namespace/service`; calls `publish` with the
    ready endpoints after the list and after every change. On an error it keeps the last known
    endpoints (as kube-proxy does), says so in one line, and lists again with backoff."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str, service: str,
                 publish: Callable[[list[Endpoint]], None]) -> None:
        self.api = kubernetes.client.DiscoveryV1Api(client)
        self.namespace, self.service, self.publish = namespace, service, publish
        self.stopping = threading.Event()
        self.listed = False  # the current attempt's list succeeded
        self._watch: kubernetes.watch.Watch | None = None
        self.thread = threading.Thread(target=self._run, name=f"endpoints-{service}", daemon=True)

    def start(self) -> EndpointWatch:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._watch is not None:
            self._watch.stop()

    def _run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            self.listed = False
            try:
                self._list_and_watch()
                failures = 0
                continue
            except kubernetes.client.ApiException as e:
                if e.status == 410:  # the watch's resourceVersion is too old: list again at once
                    continue
                problem = f"the API server answered {e.status} {e.reason}"
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                problem = f"{type(e).__name__}: {' '.join(str(e).split())}"
            # A watch cut after a good list starts the backoff again from 1 s.
            failures = self._failed(0 if self.listed else failures, problem)

    def _failed(self, failures: int, problem: str) -> int:
        delay = min(2.0 ** failures, MAX_BACKOFF_S)
        log.error("%s/%s: cannot read the Service's EndpointSlices (%s); keeping the last known endpoints, "
                  "retrying in %g s", self.namespace, self.service, problem, delay)
        self.stopping.wait(delay)
        return failures + 1

    def _list_and_watch(self) -> None:
        response = self.api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=service_selector(self.service), _preload_content=False,
            _request_timeout=30)
        listing = json.loads(response.data)
        slices = {s["metadata"]["name"]: s for s in listing.get("items") or []}
        self.publish(ready_endpoints(slices.values()))
        self.listed = True
        self._watch = kubernetes.watch.Watch()
        for event in self._watch.stream(self.api.list_namespaced_endpoint_slice, self.namespace,
                                        label_selector=service_selector(self.service),
                                        resource_version=listing["metadata"]["resourceVersion"],
                                        timeout_seconds=WATCH_SECONDS, _request_timeout=WATCH_SECONDS + 10):
            kind, obj = event["type"], event["raw_object"]
            if kind == "ERROR":
                raise kubernetes.client.ApiException(status=obj.get("code"), reason=obj.get("reason"))
            if kind == "DELETED":
                slices.pop(obj["metadata"]["name"], None)
            elif kind in ("ADDED", "MODIFIED"):
                slices[obj["metadata"]["name"]] = obj
            self.publish(ready_endpoints(slices.values()))
            if self.stopping.is_set():
                break

