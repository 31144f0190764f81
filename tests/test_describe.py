"""What `kubectl` shows of an InferenceService, with the real kubectl against the emulated API.

The status and the Events are written the way the operator writes them (status.lastDecision,
lastDecisionSummary, conditions; core v1 Events with involvedObject and generateName), then
read with ``kubectl describe``, ``kubectl get -o json`` and ``kubectl get -o custom-columns``.

The emulated API answers ``kubectl get`` with a server-side Table built from the CRD's
additionalPrinterColumns, as a real API server does, so plain ``kubectl get isvc`` shows them.
"""

from __future__ import annotations

import json
import re

import pytest
from kubernetes import client

from ebbtide.api.crd import crd
from tests.testbed.kubectl import KUBECTL, kubectl
from tests.testbed.operator import ISVC, isvc

pytestmark = pytest.mark.skipif(not KUBECTL.exists(), reason=f"needs the real kubectl at {KUBECTL}: run `make tools`")

SCALED_UP = "1 -> 3: waiting 9.5 per replica > target 2 [prometheus]"
SCALED_DOWN = "3 -> 2: idle for the 20 s stabilization window [prometheus]"
DECISION = {"time": "2025-06-01T12:00:00Z", "fromReplicas": 1, "toReplicas": 3, "reason": "QueueBacklog",
            "message": SCALED_UP, "source": "prometheus", "signals": {"waitingPerReplica": 9.5}, "applied": True}
STATUS = {
    "phase": "Ready",
    "replicas": {"desired": 3, "ready": 3, "starting": 0},
    "lastDecision": DECISION,
    "decisions": [DECISION],
    "lastDecisionSummary": "1->3 QueueBacklog",
    "cost": {"since": "2025-06-01T11:00:00Z", "gpuHours": {"onDemand": 2.5, "spot": 1.0, "asleep": 0.0},
             "usdTotal": 11.6, "usdPerHour": 9.2, "usdPerMillionTokens": 0.31},
    "conditions": [{"type": "MetricsAvailable", "status": "True", "reason": "PrometheusAnswered",
                    "message": "signals from Prometheus", "lastTransitionTime": "2025-06-01T12:00:00Z"}],
}


def event(owner: dict, reason: str, message: str, when: str) -> dict:
    """An Event as ebbtide.cluster.kube.Kube.post_event writes it."""
    meta = owner["metadata"]
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": "Normal", "reason": reason, "message": message, "source": {"component": "ebbtide"},
            "reportingComponent": "ebbtide.dev/operator", "reportingInstance": "ebbtide",
            "firstTimestamp": when, "lastTimestamp": when, "count": 1}


@pytest.fixture()
def described_service(apiserver) -> dict:
    apiserver.register_crd(crd())
    server = apiserver.server
    server.create_object(isvc("chat", replicas={"min": 1, "max": 4}, mode="Active"))
    created = server.get_object(ISVC, "default", "chat")
    with apiserver.api_client() as api:
        client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
            "ebbtide.dev", "v1alpha1", "default", "inferenceservices", "chat", {"status": STATUS})
        core = client.CoreV1Api(api)
        core.create_namespaced_event("default", event(created, "ScaledUp", SCALED_UP, "2025-06-01T12:00:00Z"))
        core.create_namespaced_event("default", event(created, "ScaledDown", SCALED_DOWN, "2025-06-01T12:01:00Z"))
    return server.get_object(ISVC, "default", "chat")


def test_describe_tells_the_story_in_events_and_status(apiserver, described_service):
    out = kubectl(apiserver, "describe", "inferenceservice", "chat", "-n", "default")
    assert "Name:         chat" in out and "Kind:         InferenceService" in out, out
    # The status, as kubectl renders the object's fields.
    assert re.search(r"Last Decision Summary:\s+1->3 QueueBacklog", out), out
    assert "Phase:" in out and "Ready" in out
    assert "MetricsAvailable" in out and "PrometheusAnswered" in out
    # The Events section: kubectl lists core v1 Events by involvedObject (name, namespace, kind, uid).
    events = out.split("\nEvents:", 1)[1]
    assert "Type    Reason" in events and "<none>" not in events, events
    for reason, message in (("ScaledUp", SCALED_UP), ("ScaledDown", SCALED_DOWN)):
        line = next((x for x in events.splitlines() if f" {reason} " in x), None)
        assert line is not None and message in line and "ebbtide" in line, events


def test_get_json_has_the_status(apiserver, described_service):
    out = json.loads(kubectl(apiserver, "get", "isvc", "-n", "default", "-o", "json"))
    (item,) = out["items"]
    assert item["status"]["lastDecision"]["reason"] == "QueueBacklog"
    assert {k: item["status"]["replicas"][k] for k in ("desired", "ready")} == {"desired": 3, "ready": 3}


def test_printer_columns_through_custom_columns(apiserver, described_service):
    """The CRD's additionalPrinterColumns, rendered client-side (the emulator serves no Table)."""
    # Age (a date) left out, Last-Decision (it has spaces) last, so that a row splits into cells.
    columns = [c for c in crd()["spec"]["versions"][0]["additionalPrinterColumns"] if c["type"] != "date"]
    columns.sort(key=lambda c: c["name"] == "Last-Decision")
    spec = ",".join(["NAME:.metadata.name"] + [f"{c['name'].upper()}:{c['jsonPath']}" for c in columns])
    header, row = kubectl(apiserver, "get", "isvc", "-n", "default", "-o", f"custom-columns={spec}").splitlines()
    cells = dict(zip(header.split(), row.split(None, len(header.split()) - 1), strict=True))
    assert cells["NAME"] == "chat"
    assert cells["READY"] == "3" and cells["DESIRED"] == "3"
    assert cells["MODE"] == "Active" and cells["PHASE"] == "Ready"
    assert cells["LAST-DECISION"].startswith("1->3"), cells


def test_plain_get_shows_the_printer_columns_with_the_cost(apiserver, described_service):
    """Plain `kubectl get isvc`: the columns a user reads first, the cost among them."""
    header, row = kubectl(apiserver, "get", "isvc", "-n", "default").splitlines()
    names = header.split()
    assert names[:7] == ["NAME", "READY", "DESIRED", "MODE", "PHASE", "USD/H", "USD/1M-TOK"], header
    cells = row.split()
    assert cells[0] == "chat" and cells[1:3] == ["3", "3"], row
    assert "9.2" in cells and "0.31" in cells, row
    assert "1->3" in row and "QueueBacklog" in row, row
    assert names[-1] == "AGE" and re.fullmatch(r"\d+[smhd]", cells[-1]), row  # an age, as servers render dates
