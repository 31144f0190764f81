"""Plain-dict facts about API objects: timestamps as the API server writes them, whether a live
object already has what we render, and who controls it."""

from __future__ import annotations

import copy
import datetime
import json
import time
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class HeldStatus:
    """A service's status as last seen, and the uid and resourceVersion a write on top of it needs.

    Kept as its JSON text: decoded, a status is some 450 small objects (its decisions and their
    signals), and a thousand services' of them, each replaced at every write or event, are what
    scatter pymalloc's arenas (RSS 607 MiB at 1,000 services under load, bench/operator_scale.py)."""

    uid: str | None
    resource_version: str
    text: bytes

    @classmethod
    def of(cls, obj: dict) -> HeldStatus:
        meta = obj["metadata"]
        return cls(meta.get("uid"), meta["resourceVersion"],
                   json.dumps(obj.get("status") or {}, separators=(",", ":")).encode())

    def status(self) -> dict:
        """A fresh copy: the caller may change it."""
        return json.loads(self.text)
