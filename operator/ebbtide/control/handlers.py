"""kopf handlers: translate Kubernetes events into calls to the reconciler and the scaling loop.

They hold no policy. Run with `ebbtide run`, or `kopf run -m ebbtide.control.handlers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import kopf

from ebbtide import api
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.diffbase import RedactedDiffBaseStorage
from ebbtide.cluster.kube import Forbidden, Kube, refusal
from ebbtide.cluster.mirror import Unavailable
from ebbtide.cluster.render import MANAGED_BY
from ebbtide.control.config import OperatorConfig
from ebbtide.control.loop import ScalingLoop
from ebbtide.control.metrics import OperatorMetrics
from ebbtide.control.reconcile import Registry, reconcile, restore_owned
from ebbtide.control.shard import parse_selector
from ebbtide.signals.prometheus import PrometheusSource


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_) -> None:
    # Keep kopf's bookkeeping in our own annotations and out of status, which is the user's view.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="ebbtide.dev")
    settings.persistence.diffbase_storage = RedactedDiffBaseStorage(  # kopf's copy of the spec, without env values
        prefix="ebbtide.dev", key="last-handled-configuration")
    settings.persistence.finalizer = "ebbtide.dev/finalizer"
    settings.posting.level = logging.WARNING  # our own Events tell the story; kopf's would repeat it
    settings.watching.server_timeout = 300
    memo.setdefault("config", OperatorConfig.from_env())
    memo.setdefault("in_shard", parse_selector(os.environ.get("EBBTIDE_SELECTOR", "")))
    if memo.config.namespaces:
        # Exact namespaces (cli.py refuses patterns): kopf need not list Namespaces or watch CRDs,
        # both cluster-wide, which a namespaced install does not grant. The CRD must exist at
        # start (helm installs it first); a CRD version added later is served after a restart.
        settings.scanning.disabled = True
    memo.kube = Kube.from_environment(memo.config.namespaces)
    memo.registry = Registry()
    if "metrics" not in memo:  # `ebbtide run` serves them before the Lease is held
        memo.metrics = OperatorMetrics()
        memo.metrics.serve(memo.config.metrics_port)
    memo.metrics.leader.set(1)  # kopf runs only in the leader (control/leader.py)
    memo.source = PrometheusSource(memo.config.prometheus_url)
    memo.stopped = asyncio.Event()
    loop = ScalingLoop(memo.kube, memo.registry, memo.source, memo.metrics, memo.config.tick_seconds,
                       engine_timeout_seconds=memo.config.engine_timeout_seconds)
    memo.loop_task = asyncio.create_task(loop.run(memo.stopped), name="ebbtide-scaling-loop")
    logger.info("ebbtide operator started with %s", memo.config)


@kopf.on.cleanup()
async def stop_loop(memo: kopf.Memo, **_) -> None:
    memo.stopped.set()
    await memo.loop_task


def in_shard(labels: kopf.Labels, memo: kopf.Memo, **_) -> bool:
    """`ebbtide run --selector`: only this shard's services enter the registry (control/shard.py)."""
    return memo.in_shard(labels)


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL, when=in_shard)
@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL, when=in_shard)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec", when=in_shard)
async def apply_spec(spec: kopf.Spec, status: kopf.Status, name: str, namespace: str, uid: str, meta: kopf.Meta,
                     memo: kopf.Memo, **_) -> None:
    ref = ServiceRef(name=name, namespace=namespace, uid=uid)
    memo.registry.recall(ref, dict(status))
    # The status as kopf just read it: the first status write needs no read of its own (after
    # a restart, 1,000 services were 1,000 GETs).
    memo.kube.remember((namespace, name), {"metadata": meta, "status": dict(status)})
    try:
        await reconcile(memo.kube, memo.registry, ref, dict(spec), meta.get("generation"))
    except Forbidden as e:  # Kube logged it; kopf retries later with one line, not a traceback
        raise kopf.TemporaryError(f"permission denied: {refusal(e)}", delay=60) from e
    except Unavailable as e:  # the Deployments' watch is listing again (the API server was away)
        raise kopf.TemporaryError(str(e), delay=10) from e


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def service_changed(event: dict, name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    if event.get("type") == "DELETED":
        memo.registry.forget(namespace, name)
    elif event.get("object") and memo.registry.get(namespace, name) is not None:
        # The next status write builds on this resourceVersion: kopf's own patch after a handler
        # (its record of the spec handled) made the loop's next write a 409 and a GET, 0.7 a
        # tick at rest under load at 1,000 services (bench/operator_scale.py).
        memo.kube.remember((namespace, name), event["object"])


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY)
@kopf.on.event("v1", "services", labels=MANAGED_BY)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED_BY)
async def owned_changed(event: dict, memo: kopf.Memo, **_) -> None:
    if event.get("type") in ("MODIFIED", "DELETED") and event.get("object"):
        with contextlib.suppress(Forbidden):  # Kube logged it once; the next event tries again
            await restore_owned(memo.kube, memo.registry, event["object"], gone=event["type"] == "DELETED")
