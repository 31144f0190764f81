"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

`ebbtide run --leader-election` holds the Lease before kopf starts (no handler, no scaling
loop, no write before that), renews it from a thread of its own, and ends the process at
once when it cannot renew within the deadline: Kubernetes restarts the pod as a standby,
and the new leader rebuilds everything from the cluster (status.scaler, the registry).

Expiry is judged as client-go judges it: by this process's own clock since it last saw the
record change, never by comparing the holder's timestamps with ours (clock skew).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import kubernetes
import urllib3
from kubernetes.client.rest import ApiException

log = logging.getLogger("ebbtide.leader")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class Timing:
    # 12 s, not client-go's 15: a standby takes over at most lease + retry after the leader's
    # last renewal, and kopf needs ~2 s to start, so a kill is covered within 15 s.
    lease_seconds: int = 12
    renew_seconds: float = 4.0  # the leader renews this often ...
    deadline_seconds: float = 8.0  # ... and exits if no renewal succeeded for this long (< lease)
    retry_seconds: float = 1.0  # a standby looks at the Lease this often
    # One call's limit: a hung connection must not keep a leader past its deadline (8 + 2 < 12).
    request_seconds: float = 2.0


def identity() -> str:
    """holderIdentity: the pod's name (the chart sets POD_NAME); outside a pod, host and a nonce."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def own_namespace() -> str:
    """The Lease lives in the operator's namespace (the chart's Role grants it there only)."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        return "default"


def _micro(ts: float) -> str:
    """MicroTime, always with its six digits (the API server refuses a MicroTime without them)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(self, namespace: str, name: str, holder: str, timing: Timing = Timing(),
                 api_client: kubernetes.client.ApiClient | None = None) -> None:
        self.namespace, self.name, self.holder, self.timing = namespace, name, holder, timing
        self.api = kubernetes.client.CoordinationV1Api(api_client or kubernetes.client.ApiClient())
        self._seen: tuple | None = None  # (holder, renewTime, transitions) last observed ...
        self._seen_at = 0.0  # ... and when (monotonic), to judge expiry by our own clock
        self._lease = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._timeout = timing.request_seconds

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True if we hold the Lease now. Writes carry the resourceVersion read, so two
        standbys racing for an expired Lease cannot both win (the loser gets 409 Conflict)."""
        now = time.time()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self._timeout)
        except ApiException as e:
            if e.status != 404:
                raise
            body = {"metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._spec(now, 0, now)}
            return self._write(lambda: self.api.create_namespaced_lease(self.namespace, body,
                                                                           _request_timeout=self._timeout))
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions)
        if record != self._seen:
            self._seen, self._seen_at = record, time.monotonic()
        mine = spec.holder_identity == self.holder
        expired = (not spec.holder_identity
                   or time.monotonic() - self._seen_at > (spec.lease_duration_seconds or self.timing.lease_seconds))
        if not mine and not expired:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        acquired = spec.acquire_time.timestamp() if mine and spec.acquire_time else now
        body = {"metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": self._spec(acquired, transitions, now)}
        return self._write(lambda: self.api.replace_namespaced_lease(self.name, self.namespace, body,
                                                                     _request_timeout=self._timeout))

    def _spec(self, acquired: float, transitions: int, now: float) -> dict:
        return {"holderIdentity": self.holder, "leaseDurationSeconds": self.timing.lease_seconds,
                "acquireTime": _micro(acquired), "renewTime": _micro(now), "leaseTransitions": transitions}

    def _write(self, call: Callable) -> bool:
        try:
            self._lease = call()
        except ApiException as e:
            if e.status in (409, 422):  # someone else wrote first (or created it meanwhile)
                return False
            raise
        return True

    def acquire(self) -> None:
        """Block until this process holds the Lease; say once that it is waiting, and for whom."""
        said = False
        while not self._attempt():
            if not said and self._seen:
                log.info("standing by: Lease %s/%s is held by %s", self.namespace, self.name, self._seen[0])
                said = True
            time.sleep(self.timing.retry_seconds)
        log.info("leading: acquired Lease %s/%s as %s", self.namespace, self.name, self.holder)

    def _attempt(self) -> bool:
        try:
            return self.try_acquire_or_renew()
        except (ApiException, OSError, urllib3.exceptions.HTTPError, kubernetes.client.exceptions.OpenApiException) as e:
            log.warning("Lease %s/%s: %s", self.namespace, self.name, getattr(e, "reason", None) or e)
            return False

    def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew in the background; call on_lost if no renewal succeeded within the deadline, or
        if the renewer itself fails (a leader that does not renew must not go on writing)."""
        def renew() -> None:
            try:
                self._renew_until_lost()
            except Exception:
                log.exception("Lease %s/%s: the renewer failed", self.namespace, self.name)
            if not self._stop.is_set():
                on_lost()
        self._renewer = threading.Thread(target=renew, name="lease-renewer", daemon=True)
        self._renewer.start()

    def _renew_until_lost(self) -> None:
        """Return when stopped, or when the Lease is lost: to another holder, or past the deadline."""
        last = time.monotonic()
        while not self._stop.wait(self.timing.renew_seconds):
            while not self._attempt():
                if time.monotonic() - last > self.timing.deadline_seconds or self._lost_to_other():
                    return
                if self._stop.wait(self.timing.retry_seconds):
                    return
            last = time.monotonic()

    def _lost_to_other(self) -> bool:
        return bool(self._seen and self._seen[0] and self._seen[0] != self.holder)

    def release(self) -> None:
        """On a clean stop: stop renewing and hand the Lease over now (holder cleared), not at expiry."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._lease is None:
            return
        body = {"metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": self._lease.metadata.resource_version},
                "spec": {**self._spec(time.time(), self._lease.spec.lease_transitions or 0, time.time()),
                         "holderIdentity": None, "leaseDurationSeconds": 1}}
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=self._timeout)
            log.info("released Lease %s/%s", self.namespace, self.name)
        except (ApiException, OSError, urllib3.exceptions.HTTPError) as e:  # it expires on its own
            log.warning("Lease %s/%s not released (%s); it expires in %d s", self.namespace, self.name,
                        getattr(e, "reason", None) or e, self.timing.lease_seconds)


def lose_leadership() -> None:
    """Leadership lost: stop now, mid-write if need be, as controller-runtime does; the state is in
    the cluster and the next leader picks it up. A graceful kopf stop could still write."""
    log.error("leadership lost (the Lease could not be renewed in time): exiting so a standby takes over")
    logging.shutdown()
    os._exit(1)
