"""What one list of pods says about a service (cluster/pods.summarize): pure, on pod objects
shaped as the API server returns them."""

from __future__ import annotations

from ebbtide.cluster.pods import ANNOTATION_ASLEEP_SINCE, essentials, summarize
from ebbtide.cluster.render import LABEL_CAPACITY, LABEL_SERVICE, LABEL_SERVING, ON_DEMAND, SPOT
from ebbtide.policy.startup import Startup

STARTED = "2026-12-03T10:00:00Z"  # 1796292000
ASLEEP_AT = 1796292600.0  # ten minutes later


def pod(name: str, *, serving: bool = True, asleep_since: float | None = None, started: str | None = STARTED,
        ready: bool = True, spot: bool = False) -> dict:
    annotations = {} if asleep_since is None else {ANNOTATION_ASLEEP_SINCE: f"{asleep_since:.0f}"}
    state = {"running": {"startedAt": started}} if started else {"waiting": {"reason": "CrashLoopBackOff"}}
    return {
        "metadata": {"name": name, "namespace": "default", "creationTimestamp": "2026-12-03T09:58:00Z",
                     "labels": {LABEL_SERVICE: "chat", LABEL_SERVING: "true" if serving else "false",
                                LABEL_CAPACITY: SPOT if spot else ON_DEMAND},
                     "annotations": annotations},
        "spec": {"nodeName": "node-1", "containers": [{"name": "vllm", "ports": [{"containerPort": 8000}]}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1",
                   "conditions": [{"type": "PodScheduled", "status": "True",
                                   "lastTransitionTime": "2026-12-03T09:59:00Z"},
                                  {"type": "Ready", "status": "True" if ready else "False",
                                   "lastTransitionTime": "2026-12-03T10:02:00Z"}],
                   "containerStatuses": [{"name": "vllm", "ready": ready, "restartCount": 0, "state": state}]},
    }


def states(pods: list[dict]) -> dict[str, tuple[str, bool, float | None]]:
    (service,) = summarize(pods).values()
    return {m.name: (m.state, m.serving, m.asleep_since) for m in service.members}


def test_serving_draining_and_asleep_pods():
    service = summarize([pod("a"), pod("b", serving=False), pod("c", serving=False, asleep_since=ASLEEP_AT)])
    (counts,) = service.values()
    assert (counts.ready, counts.draining, counts.asleep, counts.starting) == (1, 1, 1, 0)
    assert counts.held.on_demand == 2 and counts.held.asleep_on_demand == 1
    assert states([pod("c", serving=False, asleep_since=ASLEEP_AT)]) == {"c": ("asleep", False, ASLEEP_AT)}


def test_a_sleeper_whose_engine_restarted_is_awake_and_out_of_the_service():
    """The engine crashed after /sleep and the kubelet restarted it: a fresh engine runs, with
    its weights on the GPU. It is awake surplus (out of the Service), not a sleeper."""
    restarted = pod("c", serving=False, asleep_since=ASLEEP_AT, started="2026-12-03T10:20:00Z")
    assert states([restarted]) == {"c": ("awake", False, None)}
    (counts,) = summarize([restarted]).values()
    assert (counts.asleep, counts.draining) == (0, 1) and counts.held.on_demand == 1
    # Down and not yet back: not Ready, so it is capacity on its way, whatever the annotation.
    crashed = pod("c", serving=False, asleep_since=ASLEEP_AT, started=None, ready=False)
    assert states([crashed]) == {"c": ("starting", False, None)}


def test_startups_say_when_each_ready_pod_was_created_scheduled_and_ready():
    (counts,) = summarize([pod("a"), pod("b", spot=True), pod("c", serving=False, asleep_since=ASLEEP_AT)]).values()
    created, scheduled, ready = 1796291880.0, 1796291940.0, 1796292120.0  # 09:58, 09:59, 10:02
    assert counts.startups == [Startup(created, scheduled, ready, False), Startup(created, scheduled, ready, True)]


def test_a_pod_cut_down_to_its_essentials_says_the_same():
    whole = [pod("a"), pod("b", serving=False), pod("c", serving=False, asleep_since=ASLEEP_AT),
             pod("d", ready=False, started=None, spot=True)]
    for p in whole:  # what the API server adds and the tick never reads
        p["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
        p["spec"]["volumes"] = [{"name": "cache", "emptyDir": {}}]
        p["spec"]["containers"][0]["env"] = [{"name": "HF_HOME", "value": "/cache"}]
    assert summarize([essentials(p) for p in whole]) == summarize(whole)
