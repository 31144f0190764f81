"""A fleet at rest costs the API server nothing per tick: the operator writes a service's status
when something in it changed, and otherwise only a refresh once per 20 of its intervals; its
owned objects' status events are not read back, and pods and Deployments are watched, not listed
at every tick (issue #18, bench/operator_scale.py)."""

from __future__ import annotations

import collections

from ebbtide.control.explain import REFRESH_INTERVALS, substance
from ebbtide.control.state import held_until
from ebbtide.policy.decision import Memory
from ebbtide.policy.headroom import Variability, observe_rate
from ebbtide.policy.performance import Mix, Model, observe_limit, observe_mix
from tests.testbed.controlplane import kubeconfig_text
from tests.testbed.countingproxy import CountingProxy
from tests.testbed.operator import DEPLOYMENTS, ISVC, Operator, isvc, replicas, status
from tests.testbed.waiting import wait_for

INTERVAL = 1  # seconds: the refresh comes every REFRESH_INTERVALS of them
LEARNED = observe_limit(Model(), Mix(0.3, 800.0), 1500.0)  # one limit reading


def ticks(operator: Operator) -> float:
    line = next(line for line in operator.metrics().splitlines() if line.startswith("ebbtide_ticks_total "))
    return float(line.split()[1])


def test_at_rest_the_status_is_written_only_when_it_changes_and_at_its_refresh(apiserver, tmp_path):
    server, plane = apiserver.server, apiserver.plane
    with CountingProxy(plane.url, str(plane.pki / "ca.crt")) as proxy:
        kubeconfig = tmp_path / "counted.kubeconfig"
        kubeconfig.write_text(kubeconfig_text(proxy.url, plane.pki / "ca.crt", plane.tokens["admin"], "kubernetes-admin"))
        operator = Operator(apiserver, "quiet", tmp_path, kubeconfig=kubeconfig)
        try:
            server.create_object(isvc("chat", replicas={"min": 2, "max": 4},
                                      scaling={"behavior": {"intervalSeconds": INTERVAL}}))
            first = wait_for(lambda: status(server).get("lastDecision"), timeout=60, what="a first decision")
            # No Prometheus: the size is held, tick after tick, with nothing new to say (once the
            # spec's handler and the first evaluations are done).
            settled = ticks(operator)
            wait_for(lambda: ticks(operator) >= settled + 4, what="4 more ticks")
            before, counted = ticks(operator), proxy.snapshot()
            wait_for(lambda: ticks(operator) >= before + 8, what="8 more ticks")
            written = collections.Counter(proxy.since(counted))
            assert written["patch inferenceservices/status"] <= 1, written  # at most its refresh
            assert written["get deployments"] == written["get inferenceservices"] == 0, written
            # Pods and Deployments come from their watches (cluster/mirror.py), not a list a tick.
            assert written["list pods"] == written["list deployments"] == 0, written

            # Someone else's write (a label) moves the resourceVersion; the operator takes it from
            # the event, so that its next status write is not refused (409) and read again.
            handled = operator.output().count("Handler 'service_changed' succeeded")
            server.patch_object(ISVC, "default", "chat", {"metadata": {"labels": {"team": "search"}}})
            wait_for(lambda: operator.output().count("Handler 'service_changed' succeeded") > handled,
                     what="the label's event handled")
            counted = proxy.snapshot()

            # A hand scale below min is news: written at once, with the decision.
            server.patch_object(DEPLOYMENTS, "default", "chat", {"spec": {"replicas": 1}})
            wait_for(lambda: replicas(server) == 2, what="the Deployment back at 2")
            wait_for(lambda: status(server)["lastDecision"]["fromReplicas"] == 1, what="the decision in status")
            assert collections.Counter(proxy.since(counted))["get inferenceservices"] == 0, proxy.since(counted)

            # And the numbers that move every tick are refreshed all the same.
            stamp = status(server)["lastDecision"]["time"]
            wait_for(lambda: status(server)["lastDecision"]["time"] > stamp, timeout=REFRESH_INTERVALS * INTERVAL * 3,
                     what="a refresh of an unchanged status")
            assert status(server)["lastDecision"]["time"] > first["time"]
        finally:
            operator.stop()


def test_the_substance_of_a_status_leaves_out_what_moves_every_tick():
    def at(t: float, usd: float, newest: float, waiting: float, message: str) -> dict:
        return {"phase": "Ready", "replicas": {"desired": 3, "ready": 3},
                "lastDecision": {"time": f"t{t}", "fromReplicas": 3, "toReplicas": 3, "reason": "WithinTarget",
                                 "source": "prometheus", "applied": True, "signals": {"waiting": waiting},
                                 "message": message},
                "cost": {"usdTotal": usd, "usdPerHour": 3.0, "gpuHours": {"onDemand": usd / 3}},
                "conditions": [{"type": "MetricsAvailable", "status": "True", "reason": "Fresh", "message": message,
                                "lastTransitionTime": "t0"}],
                "scaler": {"since": 1.0, "downRecommendations": [[5.0, 4], [newest, 3]],
                           "cost": {"held": [3, 0, 0, 0], "lastAt": t, "usd": usd},
                           # A reading of the token rate and of the mix at every tick.
                           "variability": observe_rate(observe_rate(Variability(), 1.0, 0.0, 60), t, waiting, 60)
                           .to_json(),
                           "performance": observe_mix(LEARNED, t, Mix(0.5 + waiting / 10, 900.0)).to_json()}}

    assert substance(at(10, 1.0, 9.0, 0.0, "a")) == substance(at(20, 1.5, 19.0, 2.0, "b"))
    changed = at(20, 1.5, 19.0, 2.0, "b")
    changed["scaler"]["downRecommendations"] = [[5.0, 4], [6.0, 3.5], [19.0, 3]]
    assert substance(at(10, 1.0, 9.0, 0.0, "a")) != substance(changed)
    learning = at(20, 1.5, 19.0, 2.0, "b")  # a bin learned: refreshed with the rest
    learning["demandProfile"] = {"binsLearned": 2, "predicting": False}
    assert substance({**at(10, 1.0, 9.0, 0.0, "a"), "demandProfile": {"binsLearned": 1, "predicting": False}}) \
        == substance(learning)
    learning["demandProfile"]["predicting"] = True
    assert substance({**at(10, 1.0, 9.0, 0.0, "a"), "demandProfile": {"binsLearned": 1, "predicting": False}}) \
        != substance(learning)
    changed = at(20, 1.5, 19.0, 2.0, "b")
    changed["lastDecision"]["toReplicas"] = 4
    assert substance(at(10, 1.0, 9.0, 0.0, "a")) != substance(changed)
    changed = at(20, 1.5, 19.0, 2.0, "b")  # a limit reading is learning: kept by a restart
    changed["scaler"]["performance"] = observe_limit(LEARNED, Mix(0.5, 900.0), 2000.0).to_json()
    assert substance(at(10, 1.0, 9.0, 0.0, "a")) != substance(changed)


def test_a_restart_holds_each_windows_newest_recommendation_until_then():
    stored = Memory(since=0.0, down_recommendations=((5.0, 4), (9.0, 3)), up_recommendations=((9.0, 3),))
    held = held_until(stored, 100.0)
    assert held.down_recommendations == ((5.0, 4), (100.0, 3))  # the older one's time is exact: kept
    assert held.up_recommendations == ((100.0, 3),)
    assert held_until(Memory(since=0.0), 100.0) == Memory(since=0.0)
