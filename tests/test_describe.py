"""What the real operator writes, as the real API server keeps it and the real kubectl shows it.

The operator runs once for this module on an InferenceService in a namespace of its own: it
applies the workload, holds the size without Prometheus (none answers here), and scales a
Deployment scaled below replicas.min by hand back up. Its status, its Events and kopf's own
bookkeeping are then read back: nothing the operator wrote may be pruned by the CRD's schema,
and `kubectl get` shows the printer columns from the server's Table.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from ebbtide.api import status as models
from ebbtide.api.crd import PRINTER_COLUMNS
from tests.testbed.fixtures import Cluster
from tests.testbed.kubeapi import path_of
from tests.testbed.kubectl import KUBECTL, kubectl
from tests.testbed.operator import DEPLOYMENTS, ISVC, isvc, running_operator
from tests.testbed.waiting import wait_for

pytestmark = pytest.mark.skipif(not KUBECTL.exists(), reason=f"needs the real kubectl at {KUBECTL}: run `make tools`")
NAMESPACE = "describe"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def keys(model: type) -> set[str]:
    """The wire names of a status model's fields."""
    return {field.alias or name for name, field in model.model_fields.items()}


@dataclasses.dataclass
class Story:
    cluster: Cluster
    output: str  # the operator's log

    @property
    def service(self) -> dict:
        return self.cluster.server.get_object(ISVC, NAMESPACE, "chat")

    def events(self, reason: str | None = None) -> list[dict]:
        found = self.cluster.server.list_objects("v1/events", NAMESPACE, field_selector="involvedObject.name=chat")
        return [e for e in found if reason in (None, e["reason"])]


@pytest.fixture(scope="module")
def story(control_plane):
    cluster = Cluster(control_plane)
    server = cluster.server
    server.create_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    try:
        with running_operator(cluster) as runner:
            server.create_object(isvc("chat", NAMESPACE, replicas={"min": 2, "max": 4}, mode="Active",
                                      scaling={"behavior": {"intervalSeconds": 1}}))
            wait_for(lambda: server.get_object(DEPLOYMENTS, NAMESPACE, "chat"), what="the Deployment")
            wait_for(lambda: (server.get_object(ISVC, NAMESPACE, "chat").get("status") or {}).get("lastDecision"),
                     what="a first decision")
            # A scale below replicas.min (by hand): bounds need no metrics, the operator restores them.
            server.patch_object(DEPLOYMENTS, NAMESPACE, "chat", {"spec": {"replicas": 1}})
            story = Story(cluster, "")
            wait_for(lambda: story.events("ScaledUp"), timeout=30, what="a ScaledUp Event")
            wait_for(lambda: server.get_object(DEPLOYMENTS, NAMESPACE, "chat")["spec"]["replicas"] == 2,
                     what="the Deployment back at 2")
            # Later ticks: an unchanged status is written again at its refresh (every 20 intervals:
            # control/explain.py); kopf must stay quiet about it.
            first = story.service["status"]["lastDecision"]["time"]
            wait_for(lambda: story.service["status"]["lastDecision"]["time"] > first, timeout=60, what="later ticks")
        story.output = runner.output
        yield story
    finally:
        cluster.empty_namespace(NAMESPACE)
        server.delete_object("v1/namespaces", None, NAMESPACE)
        cluster.close()


def test_status_keeps_every_field_the_operator_writes(story):
    status = story.service["status"]
    # demandProfile: pre-warming is on; the variants' fields only with spec.variants (test_operator_variants.py).
    assert set(status) >= keys(models.InferenceServiceStatus) - {"variants", "variantsSummary", "spend"}, set(status)
    assert set(status["lastDecision"]) == keys(models.DecisionRecord)
    assert set(status["replicas"]) == keys(models.ReplicaCounts)
    assert set(status["cost"]) >= keys(models.Cost) - {"usdPerMillionTokens"}  # None: no tokens served
    assert set(status["startup"]) >= {"samples", "count"}
    # status.scaler is free-form (preserve-unknown-fields): the autoscaler's memory comes back whole.
    assert {"since", "cost", "spot"} <= set(status["scaler"]), status["scaler"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert {"SpecValid", "MetricsAvailable", "ScalingLimited"} <= set(conditions)
    assert conditions["SpecValid"]["observedGeneration"] == story.service["metadata"]["generation"]
    assert status["lastDecisionSummary"] == "1->2 MinReplicas", status["decisions"]
    assert status["decisions"][-1]["fromReplicas"] == 1 and status["decisions"][-1]["toReplicas"] == 2


def test_kopf_bookkeeping_settles(story):
    """kopf keeps its state in our annotations; a pruned or refused write would show as
    'Patching failed with inconsistencies' and the creation handled again and again."""
    meta = story.service["metadata"]
    assert "ebbtide.dev/last-handled-configuration" in meta["annotations"]
    assert not meta.get("finalizers"), "no deletion handler: kopf needs no finalizer"
    assert not [k for k in meta["annotations"] if k.startswith("ebbtide.dev/") and "apply_spec" in k], \
        "progress annotations left behind"
    assert "inconsistencies" not in story.output, story.output
    assert story.output.count("Handler 'apply_spec' succeeded") == 1, story.output
    assert "Traceback" not in story.output, story.output


def test_describe_tells_the_story_in_events_and_status(story):
    out = kubectl(story.cluster, "describe", "inferenceservice", "chat", "-n", NAMESPACE)
    assert "Name:         chat" in out and "Kind:         InferenceService" in out, out
    assert re.search(r"Last Decision Summary:\s+1->2 MinReplicas", out), out
    assert "MetricsAvailable" in out and "Prometheus unreachable" in out, out
    events = out.split("\nEvents:", 1)[1]
    assert "Type    Reason" in events and "<none>" not in events, events
    for reason in ("Applied", "ScaledUp"):
        (written,) = story.events(reason)
        line = next((x for x in events.splitlines() if f" {reason} " in x), None)
        assert line is not None and written["message"][:40] in line and "ebbtide" in line, events


def test_get_json_has_the_status(story):
    out = json.loads(kubectl(story.cluster, "get", "isvc", "-n", NAMESPACE, "-o", "json"))
    (item,) = out["items"]
    assert item["status"] == story.service["status"]
    assert item["status"]["replicas"]["desired"] == 2


def test_the_server_serves_the_printer_columns_as_a_table(story):
    """The API server builds the Table from the CRD's additionalPrinterColumns; kubectl prints it."""
    table = story.cluster.server.request("GET", path_of(ISVC, NAMESPACE), accept=TABLE)
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name"] + [c["name"] for c in PRINTER_COLUMNS]
    (row,) = table["rows"]
    cells = dict(zip([c["name"] for c in table["columnDefinitions"]], row["cells"], strict=True))
    status = story.service["status"]
    assert (cells["Name"], cells["Desired"], cells["Mode"]) == ("chat", 2, "Active")
    assert (cells["Phase"], cells["Last-Decision"]) == (status["phase"], "1->2 MinReplicas")

    header, line = kubectl(story.cluster, "get", "isvc", "-n", NAMESPACE).splitlines()
    assert header.split() == ["NAME", "READY", "DESIRED", "MODE", "PHASE", "USD/H", "USD/1M-TOK",
                              "LAST-DECISION", "AGE"], header
    assert line.split()[:5] == ["chat", "0", "2", "Active", status["phase"]], line
    assert "1->2 MinReplicas" in line and re.search(r"\d+[smhd]$", line), line
    wide = kubectl(story.cluster, "get", "isvc", "-n", NAMESPACE, "-o", "wide").splitlines()[0]
    assert "ASLEEP" in wide.split() and "ASLEEP" not in header.split(), "priority 1 columns are for -o wide"


# --- the cost columns, with a cost the operator would only have with pods running and serving ---

COST = {"since": "2025-06-01T11:00:00Z", "gpuHours": {"onDemand": 2.5, "spot": 1.0, "asleep": 0.0},
        "usdTotal": 11.6, "usdPerHour": 9.2, "usdPerMillionTokens": 0.31}


def test_plain_get_shows_the_cost(apiserver):
    """Hand-written status (the closed-loop tests make real cost): how the server's Table renders it."""
    server = apiserver.server
    server.create_object(isvc("chat", replicas={"min": 1, "max": 4}))
    server.patch_object(ISVC, "default", "chat", {"status": {"phase": "Ready", "cost": COST,
                                                             "replicas": {"desired": 3, "ready": 3}}},
                        subresource="status")
    header, row = kubectl(apiserver, "get", "isvc", "-n", "default").splitlines()
    cells = dict(zip(header.split(), row.split(), strict=False))
    assert (cells["READY"], cells["DESIRED"], cells["USD/H"], cells["USD/1M-TOK"]) == ("3", "3", "9.2", "0.31"), row
