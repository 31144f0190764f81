"""Plain-dict facts about API objects: timestamps as the API server writes them, whether a live
object already has what we render, and who controls it."""

from __future__ import annotations

import copy
import datetime
import time
from typing import Any

from ebbtide import api


def rfc3339(ts: float) -> str:
    """Unix seconds as the API server writes a timestamp."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339() -> str:
    return rfc3339(time.time())


def is_subset(wanted: Any, live: Any) -> bool:
    """True when every field we set has our value in the live object.

    The API server adds defaults (extra keys), so dicts compare as subsets; lists we own
    entirely (containers, env, ports), so their lengths must match.
    """
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(k in live and is_subset(v, live[k]) for k, v in wanted.items())
    if isinstance(wanted, list):
        return (isinstance(live, list) and len(wanted) == len(live)
                and all(is_subset(w, v) for w, v in zip(wanted, live, strict=True)))
    return wanted == live


def without_replicas(obj: dict) -> dict:
    """The replica count belongs to the autoscaler: drift correction never touches it."""
    obj = copy.deepcopy(obj)
    obj.get("spec", {}).pop("replicas", None)
    return obj


def controller_of(obj: dict) -> dict | None:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return next((r for r in refs if r.get("controller") and r.get("kind") == api.KIND), None)


def newer(version: str, than: str | None) -> bool:
    """Whether an object's resourceVersion is as new as the one held, or newer. Opaque to
    clients in principle; etcd's revisions in practice. A write's answer can arrive before a
    watch's older events: those must not undo it."""
    if than is None or not (version.isdigit() and than.isdigit()):
        return True
    return int(version) >= int(than)
