"""What every counted scenario must hold at its end (issue #17), as a list of problems (empty: passed).

* 0 failed requests, except for causes the scenario declares unavoidable, or its disruption found
  unavoidable in this run (`Run.excuse`), each explained in the notes;
* no request refused by a sleeping engine: the engines' ``requests_refused_asleep``, and the load
  generator's ``http_503_engine_asleep`` for engines already gone;
* no sleeper woken twice (an engine's ``wake_up_calls`` above its ``sleep_calls``) and no orphaned
  sleeper (an engine asleep that the operator does not hold asleep and out of the Service, or one
  it holds asleep that is awake);
* the InferenceService, its Deployments and its Service intact: the same objects (uids) as before;
* for a restart (``keeps_pods``): every pod there when the load started is still there: no
  scale-down on the empty history of a restarted operator or a reconnected watch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.testbed.waiting import wait_for

from e2e.observe import ANNOTATION_ASLEEP_SINCE, DEPLOYMENT, LABEL_SERVING, SERVICE

if TYPE_CHECKING:
    from e2e.runner import Run, Scenario

SETTLE_SECONDS = 20  # the operator finishes a move under way (annotations follow the engine's sleep)


def identities(watch) -> dict:
    """The uids of the service's objects and the names of its live pods, now."""
    isvc = watch.isvc() or {}
    objects = {"InferenceService": (isvc.get("metadata") or {}).get("uid")}
    for name in watch.deployments:
        objects[f"Deployment {name}"] = ((watch.backend.get(*DEPLOYMENT, name, watch.namespace) or {})
                                         .get("metadata") or {}).get("uid")
    objects["Service"] = ((watch.backend.get(*SERVICE, watch.name, watch.namespace) or {})
                          .get("metadata") or {}).get("uid")
    return {"objects": objects, "pods": {p["metadata"]["name"] for p in watch.live_pods()}}


def failures(run: Run, scenario: Scenario, counts: dict) -> list[str]:
    problems = [] if counts["sent"] else ["no request was sent"]
    unavoidable = scenario.unavoidable | run.excused
    for cause, count in sorted(counts["failed_by_cause"].items()):
        if cause in unavoidable:
            run.note(f"{count} failed with {cause}: {unavoidable[cause]}")
        else:
            problems.append(f"{count} of {counts['sent']} requests failed: {cause}")
    return problems


def engines(run: Run) -> dict[str, tuple[dict, dict | None]]:
    """Live pod name -> (the pod, its engine's /ebbtide/stats or None if it does not answer)."""
    return {p["metadata"]["name"]: (p, run.backend.engine_get(p, "/ebbtide/stats"))
            for p in run.watch.live_pods() if (p.get("status") or {}).get("podIP")}


def sleeper_problems(found: dict[str, tuple[dict, dict | None]]) -> list[str]:
    problems = []
    for name, (pod, stats) in sorted(found.items()):
        if stats is None:
            continue
        meta = pod["metadata"]
        held_asleep = ANNOTATION_ASLEEP_SINCE in (meta.get("annotations") or {})
        serving = (meta.get("labels") or {}).get(LABEL_SERVING) != "false"
        if stats["is_sleeping"] and (not held_asleep or serving):
            problems.append(f"orphaned sleeper {name}: its engine sleeps, the operator holds it "
                            f"{'asleep' if held_asleep else 'awake'}, {'in' if serving else 'out of'} the Service")
        elif held_asleep and not stats["is_sleeping"]:
            problems.append(f"{name} is held asleep but its engine is awake")
    return problems


def engine_problems(run: Run, counts: dict) -> list[str]:
    # A move may be under way at the end: give the operator a few ticks to finish it.
    found: dict = {}

    def settled() -> bool:
        found.clear()
        found.update(engines(run))
        return not sleeper_problems(found)

    try:
        wait_for(settled, timeout=SETTLE_SECONDS, interval=1, what="sleepers settled")
    except AssertionError:
        pass
    problems = sleeper_problems(found)
    silent = sorted(name for name, (_, stats) in found.items() if stats is None)
    if silent:
        run.note(f"no /ebbtide/stats from {', '.join(silent)} (not counted)")
    stats = {name: s for name, (_, s) in found.items() if s is not None}
    refused = {name: s["requests_refused_asleep"] for name, s in stats.items() if s["requests_refused_asleep"]}
    if refused or counts["failed_by_cause"].get("http_503_engine_asleep"):
        problems.append(f"requests routed to a sleeping replica: engines {refused or '(gone)'}, "
                        f"load generator {counts['failed_by_cause'].get('http_503_engine_asleep', 0)}")
    twice = {name: (s["sleep_calls"], s["wake_up_calls"]) for name, s in stats.items()
             if s["wake_up_calls"] > s["sleep_calls"]}
    if twice:
        problems.append(f"sleepers woken more often than put to sleep (sleeps, wakes): {twice}")
    sleeps = sum(s["sleep_calls"] for s in stats.values())
    wakes = sum(s["wake_up_calls"] for s in stats.values())
    if sleeps or wakes:
        run.note(f"engines now: {sleeps} sleep and {wakes} wake-up calls over {len(stats)} replicas")
    return problems


def intact(run: Run, scenario: Scenario, before: dict) -> list[str]:
    now = identities(run.watch)
    problems = [f"{kind} replaced or gone (uid {uid} -> {now['objects'].get(kind)})"
                for kind, uid in before["objects"].items() if now["objects"].get(kind) != uid]
    if scenario.keeps_pods and (removed := sorted(before["pods"] - now["pods"])):
        problems.append(f"pods removed after the restart (a scale-down on empty history?): {removed}")
    return problems


def check(run: Run, scenario: Scenario, counts: dict, before: dict) -> list[str]:
    return failures(run, scenario, counts) + engine_problems(run, counts) + intact(run, scenario, before)
