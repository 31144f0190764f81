"""The operator's door to the Kubernetes API: the official client, run off the event loop.

Responses are read raw (`_preload_content=False`) and decoded as JSON: the operator works on
plain dicts (what it renders), and a field the client's models do not know cannot break it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import logging
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ForbiddenException as Forbidden
from kubernetes.client.rest import ApiException

from ebbtide import api
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.mirror import Mirror
from ebbtide.cluster.objects import HeldStatus, controller_of, is_subset, newer, now_rfc3339, without_replicas
from ebbtide.cluster.render import MANAGED_SELECTOR

log = logging.getLogger(__name__)
API_CONCURRENCY = {"handlers": 8, "loop": 16}  # API calls in flight at once, by lane (Kube.loop_lane)
_LANE: contextvars.ContextVar[str] = contextvars.ContextVar("ebbtide_kube_lane", default="handlers")
LIST_PAGE = 500  # objects per page of a list

# kind -> (API class, the snake_case name in the client's method names)
_KINDS = {
    "Deployment": (kubernetes.client.AppsV1Api, "deployment"),
    "Service": (kubernetes.client.CoreV1Api, "service"),
    "PodDisruptionBudget": (kubernetes.client.PolicyV1Api, "pod_disruption_budget"),
    "ConfigMap": (kubernetes.client.CoreV1Api, "config_map"),
}

MERGE_PATCH = "application/merge-patch+json"
# Strategic merge: lists such as status.conditions merge item by item (by type), so writing
# one condition leaves the kubelet's conditions alone.
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


def _json(data: bytes) -> Any:
    return json.loads(data) if data else None


def _without_managed_fields(obj: dict) -> dict:
    """The object less the field managers' bookkeeping, which no one here reads: ~45% of a pod."""
    obj.get("metadata", {}).pop("managedFields", None)
    return obj


def _name_and_replicas(obj: dict) -> dict:
    """A Deployment as the loop and reconcile read it in lists: whose it is, whether it is going, its count."""
    meta = obj.get("metadata", {})
    kept = ("namespace", "name", "labels", "ownerReferences", "deletionTimestamp")
    return {"metadata": {k: meta[k] for k in kept if k in meta},
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)}}


class Conflict(Exception):
    """An object we would own already exists and belongs to someone else."""


def refusal(e: ApiException) -> str:
    """The API server's own words for a refused call, less the object's name: 'User "..." cannot
    patch resource "deployments" in API group "apps" in the namespace "ml"'."""
    try:
        message = str(json.loads(e.body)["message"])
    except (TypeError, ValueError, KeyError):
        return f"{e.status} {e.reason}"
    return message.split(" is forbidden: ", 1)[-1]


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient, namespaces: tuple[str, ...] = ()):
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        # `ebbtide run --namespace`: fleet-wide lists go to these namespaces only (empty: all).
        self.namespaces = namespaces
        # Client method (and namespace, for a list in one) -> the API server's refusal (403), until
        # permitted again. A missing RBAC permission is logged once here, not by every caller every tick.
        self.refused: dict[str, str] = {}
        # The client blocks: its calls run on threads of their own. asyncio's default pool has
        # cpu_count + 4 threads, shared with the Prometheus queries; with 1,000 services a tick's
        # writes queued behind one another there (bench/operator_scale.py). The scaling loop has
        # threads apart from kopf's handlers: on a restart, the handlers' 3,000 reads of the owned
        # objects held a tick's list of pods behind them for a minute.
        self._threads = {lane: concurrent.futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"kube-{lane}")
                         for lane, n in API_CONCURRENCY.items()}
        # (namespace, name) -> uid, resourceVersion and status as our last status write left them.
        self._statuses: dict[tuple[str, str], HeldStatus] = {}
        self._mirrors: dict[str, Mirror] = {}  # the watched lists (cluster/mirror.py), by what they hold

    @classmethod
    def from_environment(cls, namespaces: tuple[str, ...] = ()) -> Kube:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        configuration = kubernetes.client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = sum(API_CONCURRENCY.values())  # a connection per thread, kept
        return cls(kubernetes.client.ApiClient(configuration), namespaces)

    async def _call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        method = getattr(fn, "__name__", repr(fn))
        # Keyed by namespace too where one is named: one namespace permitted and another refused
        # must not toggle a single entry (and log) on every tick.
        key = f"{method} in {kwargs['namespace']}" if "namespace" in kwargs else method
        try:
            # The body is read (and decoded) on the thread too: read on the event loop, a slow API
            # server's answers held everything else (kopf's handlers, the other calls) behind each one.
            decoded = await asyncio.get_running_loop().run_in_executor(
                self._threads[_LANE.get()], lambda: _json(fn(*args, _preload_content=False, **kwargs).data))
        except Forbidden as e:
            if key not in self.refused:
                log.error("the API server refused a call (403 Forbidden): %s. Grant it to the operator's "
                          "ServiceAccount (the chart's ClusterRole, or its Role in that namespace); said once, "
                          "until it is permitted again", refusal(e))
            self.refused[key] = refusal(e)
            raise
        if self.refused.pop(key, None) is not None:
            log.info("%s is permitted again", key)
        return decoded

    @staticmethod
    def loop_lane() -> None:
        """The calls of the current task, and of the tasks it starts, go on the scaling loop's threads."""
        _LANE.set("loop")

    def refusals(self, namespace: str) -> set[str]:
        """The standing refusals that concern a namespace: its own and cluster-scoped ones."""
        return {m for m in self.refused.values()
                if f'in the namespace "{namespace}"' in m or 'in the namespace "' not in m}

    def _method(self, kind: str, verb: str) -> Callable:
        api_class, snake = _KINDS[kind]
        return getattr(api_class(self.client), f"{verb}_namespaced_{snake}")

    async def read(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return await self._call(self._method(kind, "read"), name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def apply(self, desired: dict, owner: ServiceRef) -> str:
        """Create the object, or restore the fields we render if they drifted.

        Returns "created", "updated" or "unchanged". Raises Conflict when a same-named
        object is not ours: we never take over someone else's workload.
        """
        kind, meta = desired["kind"], desired["metadata"]
        live = await self.read(kind, meta["namespace"], meta["name"])
        if live is None:
            created = await self._call(self._method(kind, "create"), meta["namespace"], desired)
            if kind == "Deployment":
                self._put("deployments", created)  # a reconcile that follows finds it without waiting for the watch
            return "created"
        controller = controller_of(live)
        if controller is None or controller.get("uid") != owner.uid:
            raise Conflict(f"{kind} {meta['namespace']}/{meta['name']} exists and is not owned by this "
                           f"InferenceService; rename one of them or delete the {kind}")
        if live["metadata"].get("deletionTimestamp"):
            return "unchanged"  # on its way out; it will be re-created once gone
        wanted = without_replicas(desired)
        if is_subset(wanted, live):
            return "unchanged"
        await self._call(self._method(kind, "patch"), meta["name"], meta["namespace"], wanted,
                         _content_type=MERGE_PATCH)
        return "updated"

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self._call(self._method(kind, "delete"), name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        self._put("deployments", await self._call(self._method("Deployment", "patch"), name, namespace,
                                                  {"spec": {"replicas": replicas}}, _content_type=MERGE_PATCH))

    async def read_service(self, namespace: str, name: str) -> dict | None:
        try:
            return await self._call(self.custom.get_namespaced_custom_object,
                                    api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def update_status(self, ref: ServiceRef, mutate: Callable[[dict], dict], attempts: int = 5,
                            unchanged: Callable[[dict, dict], bool] | None = None) -> dict | None:
        """Read-modify-write of the status with optimistic concurrency.

        The operator writes status from two places (spec handlers and the scaling loop);
        the resourceVersion in the patch makes the API server refuse a write based on a stale
        read (409), and we retry on the fresh object instead of losing the other writer's fields.
        `unchanged(old, new)` true: nothing is written (None is returned).
        """
        key = (ref.namespace, ref.name)
        for _ in range(attempts):
            # What our last write left saves a GET per service and tick; if anyone wrote since,
            # its resourceVersion is stale, the API server answers 409 and we read afresh.
            held = self._statuses.pop(key, None)
            if held is None or held.uid != ref.uid:
                obj = await self.read_service(ref.namespace, ref.name)
                if obj is None or obj["metadata"].get("uid") != ref.uid:
                    return None
                held = HeldStatus.of(obj)
            status = mutate(held.status())
            if unchanged is not None and unchanged(held.status(), status):
                self._hold(key, held)
                return None
            body = {"metadata": {"resourceVersion": held.resource_version}, "status": status}
            try:
                written = await self._call(self.custom.patch_namespaced_custom_object_status,
                                           api.GROUP, api.VERSION, ref.namespace, api.PLURAL, ref.name, body,
                                           _content_type=MERGE_PATCH)
            except ApiException as e:
                if e.status == 404:
                    return None
                if e.status != 409:
                    raise
                continue
            self.remember(key, written)
            return written
        log.warning("status of %s/%s not written: it kept changing under us", ref.namespace, ref.name)
        return None

    def remember(self, key: tuple[str, str], obj: dict) -> None:
        """The status as it now stands (a write's answer, a handler's or an event's object: the
        newest wins), and what a write on top of it needs: not the spec."""
        self._hold(key, HeldStatus.of(obj))

    def _hold(self, key: tuple[str, str], held: HeldStatus) -> None:
        before = self._statuses.get(key)
        if before is None or newer(held.resource_version, before.resource_version):
            self._statuses[key] = held

    def forget_status(self, namespace: str, name: str) -> None:
        """A deleted service's last write is no base for anything."""
        self._statuses.pop((namespace, name), None)

    async def post_event(self, ref: ServiceRef, type: str, reason: str, message: str) -> None:
        """An Event on the InferenceService, so `kubectl describe` tells the story."""
        now = now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": ref.name,
                               "namespace": ref.namespace, "uid": ref.uid},
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "ebbtide"},
            "reportingComponent": "ebbtide.dev/operator",
            "reportingInstance": "ebbtide",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._call(self.core.create_namespaced_event, ref.namespace, body)
        except Forbidden:
            pass  # _call said so, once
        except ApiException as e:  # an Event is worth a log line, never a failed reconcile
            log.warning("could not post event %s on %s/%s: %s", reason, ref.namespace, ref.name, e.reason)

    async def _list(self, all_namespaces: Callable, namespaced: Callable, label_selector: str,
                    keep: Callable[[dict], dict]) -> list[dict]:
        """One list across the cluster, or one per watched namespace: all that a Role in each permits."""
        if self.namespaces:
            results = await asyncio.gather(*(self._pages(namespaced, keep, namespace=namespace,
                                                         label_selector=label_selector)
                                             for namespace in self.namespaces))
        else:
            results = [await self._pages(all_namespaces, keep, label_selector=label_selector)]
        return [item for result in results for item in result]

    async def _pages(self, method: Callable, keep: Callable[[dict], dict], **kwargs: Any) -> list[dict]:
        return [item for item, _ in (await self._listing(method, keep, **kwargs))[0]]

    async def _listing(self, method: Callable, keep: Callable[[dict], dict],
                       **kwargs: Any) -> tuple[list[tuple[dict, str]], str]:
        """A list read a page at a time, each item cut down by `keep` before the next page: 3,000
        pods read whole were ~120 MiB of Python objects at once, and the operator's RSS kept
        that high-water mark (bench/operator_scale.py). Each item with its resourceVersion, and
        the list's own (where a watch of it resumes)."""
        items: list[tuple[dict, str]] = []
        token, version = None, ""
        while True:
            page = await self._call(method, limit=LIST_PAGE, _continue=token, **kwargs) or {}
            items += [(keep(item), item["metadata"].get("resourceVersion", "")) for item in page.get("items", [])]
            meta = page.get("metadata") or {}
            token, version = meta.get("continue"), meta.get("resourceVersion") or version
            if not token:
                return items, version

    def _mirror(self, what: str, all_namespaces: Callable, namespaced: Callable, label_selector: str,
                keep: Callable[[dict], dict], cluster_scoped: bool = False) -> Mirror:
        """The list kept by watches (cluster/mirror.py), made at its first read: one watch per
        watched namespace, or one for the cluster. Its watches run on a client of their own:
        each holds a connection for minutes, which the lanes' pool must not lose."""
        if what not in self._mirrors:
            watching = kubernetes.client.ApiClient(self.client.configuration)

            def method(namespace: str | None, on: kubernetes.client.ApiClient | None = None) -> Callable:
                bound = namespaced if namespace else all_namespaces
                return bound if on is None else getattr(type(bound.__self__)(on), bound.__name__)

            async def pages(namespace: str | None) -> tuple[list[tuple[dict, str]], str]:
                where = {"namespace": namespace} if namespace else {}
                return await self._listing(method(namespace), keep, label_selector=label_selector, **where)

            self._mirrors[what] = Mirror(what, pages, lambda namespace: method(namespace, watching), label_selector,
                                         keep, () if cluster_scoped else self.namespaces)
        return self._mirrors[what]

    def _put(self, what: str, written: dict | None) -> None:
        """A write's answer into its mirror, if there is one: the next tick reads what it wrote."""
        if written and what in self._mirrors:
            self._mirrors[what].put(written)

    async def watched_pods(self, label_selector: str, keep: Callable[[dict], dict]) -> list[dict]:
        """The pods a list would return now, from their mirror (`keep`: what of each pod to keep)."""
        return await self._mirror("pods", self.core.list_pod_for_all_namespaces, self.core.list_namespaced_pod,
                                  label_selector, keep).items()

    async def watched_deployments(self) -> list[dict]:
        """The Deployments we manage as a list would return them now (names, owners, labels,
        counts), from their mirror: one mirror, one selector, for the loop and reconcile alike."""
        return await self._mirror("deployments", self.apps.list_deployment_for_all_namespaces,
                                  self.apps.list_namespaced_deployment, MANAGED_SELECTOR, _name_and_replicas).items()

    def stop_watching(self) -> None:
        for mirror in self._mirrors.values():
            mirror.stop()

    async def list_pods(self, label_selector: str, keep: Callable[[dict], dict] = _without_managed_fields) -> list[dict]:
        """`keep`: what of each pod to keep (cluster/pods.py `essentials`: what the tick reads)."""
        return await self._list(self.core.list_pod_for_all_namespaces, self.core.list_namespaced_pod, label_selector,
                                keep)

    async def patch_pod_status(self, namespace: str, name: str, status: dict) -> None:
        """Strategic merge patch of a pod's status (pods/status): e.g. one readiness-gate condition."""
        self._put("pods", await self._call(self.core.patch_namespaced_pod_status, name, namespace,
                                           {"status": status}, _content_type=STRATEGIC_MERGE_PATCH))

    async def watched_nodes(self, keep: Callable[[dict], dict]) -> list[dict]:
        """The nodes, from their mirror (made at the first read: only once some service uses spot)."""
        return await self._mirror("nodes", self.core.list_node, self.core.list_node, "", keep,
                                  cluster_scoped=True).items()

    async def patch_pod_metadata(self, namespace: str, name: str, labels: dict[str, str | None] | None = None,
                                 annotations: dict[str, str | None] | None = None) -> None:
        """Set (or, with None, remove) labels and annotations of a pod: the serving label, the
        sleep annotation, the deletion cost."""
        metadata: dict[str, Any] = {}
        if labels:
            metadata["labels"] = labels
        if annotations:
            metadata["annotations"] = annotations
        if metadata:
            self._put("pods", await self._call(self.core.patch_namespaced_pod, name, namespace,
                                               {"metadata": metadata}, _content_type=MERGE_PATCH))

    async def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod (its ReplicaSet starts a replacement unless the count drops too)."""
        try:
            await self._call(self.core.delete_namespaced_pod, name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise
