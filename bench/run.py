"""`make bench`: rerun the comparison on the bundled traces and rewrite bench/RESULTS.md.

Every number in RESULTS.md comes from a JSON file this script writes under bench/results/ (the
`ebbtide simulate --json` output plus how long it took and on what machine); bench/render.py
turns them into the page, and tests/test_bench.py checks the page matches them.

It runs this checkout's code (operator/ first on PYTHONPATH), whatever is installed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "operator"))

from render import render  # noqa: E402

# The peers (issue #16): each at its documented default and tuned with hindsight on the run's own
# replay (`<peer>-tuned`: the sweep of sim/peers/tuning.py, recorded in the JSON).
PEERS = ["hpa-kv", "hpa-tokens", "hpa-inflight", "keda-queue", "aibrix-apa", "wva", "dynamo-planner"]
POLICIES = ["ebbtide", "ebbtide-warm", "static", *PEERS, *(f"{p}-tuned" for p in PEERS), "oracle"]
# (key, simulate arguments). The one-hour logs are overlaid K times (`--scale K`, each copy
# shifted circularly by a random offset) so that each hour runs at the mean load of its week
# replay, which the CLI scales to peak at 12 replicas: K = 76.6 / 5.53 = 13.9 -> 14 for
# conversation, 30.3 / 2.57 = 11.8 -> 12 for code. One copy is 5.5 and 2.6 requests/s: one
# replica carries it, and there would be nothing to scale.
# The week also runs Ebbtide on spot (the spec's spot placement switched on, the default spot
# market of docs/simulator.md, and one hour with no spot capacity at all, 32 h into the week),
# so the table shows what spot saves and what reclaims and an outage cost in SLO, with and
# without the on-demand fallback (spot-only).
RUNS = [
    ("conv-week", ["--trace", "conv-week", "--spot-outage", "1h@32h"], ["ebbtide-spot", "spot-only"]),
    ("code-week", ["--trace", "code-week"], []),
    ("conv-1h", ["--trace", "conv-1h", "--scale", "14"], []),
    ("code-1h", ["--trace", "code-1h", "--scale", "12"], []),
]
# The traces added for issue #16, item 3: fewer policies (each peer tuned with hindsight, the
# strongest form of each; no default-setting rows), so that each row stays within about ten
# minutes on the bench machine: a sweep of a request-level hour of long prompts costs several
# minutes per peer, and two weeks of ServeGen twice a week's. (key, arguments, policies.)
# mooncake-1h runs the long-context example (the chat example's --max-model-len 8192 refuses
# 846 of its requests) overlaid 3 times (10 requests/s: 8-16 replicas).
NEW_TRACE_POLICIES = ["ebbtide", "static", "hpa-tokens-tuned", "hpa-inflight-tuned", "wva-tuned",
                      "dynamo-planner-tuned", "oracle"]
NEW_TRACE_RUNS = [
    ("servegen-14d", ["--trace", "servegen-14d"], NEW_TRACE_POLICIES),
    ("mooncake-1h", ["examples/long-context-chat.yaml", "--trace", "mooncake-1h", "--scale", "3"],
     NEW_TRACE_POLICIES),
]
# The speed requirement, timed exactly as stated (the default six policies).
SPEED = ("speed", ["--trace", "conv-week"], [])
# Pre-warming and the sleep pool (issue #5), on each week with the spec's 180 s cold start:
# Ebbtide reactive only, + pre-warming, + the sleep pool, and both, each starting as an operator
# that served the same week's traffic the week before (--train-profile: the demand profile and
# the per-replica limit). The rotated runs train on the week shifted by a day instead, so each
# day is predicted from its neighbour (not in the default set: (key, arguments, policies)).
# static-max (the spec's maximum all week) is the floor the ramp latency target is read against.
LIFECYCLE_POLICIES = ["ebbtide-reactive", "ebbtide-prewarm", "ebbtide-sleep", "ebbtide-lifecycle", "static-max"]
LIFECYCLE_RUNS = [
    (f"{week}-lifecycle{suffix}", ["--trace", week, "--cold-start", "180", "--train-profile", *rotate], policies)
    for week in ("code-week", "conv-week")
    for suffix, rotate, policies in (
        ("", [], LIFECYCLE_POLICIES),
        ("-rotated", ["--train-rotate", "1d"], ["ebbtide-reactive", "ebbtide-prewarm", "ebbtide-lifecycle",
                                                 "static-max"]))
]

# Accelerator variants (issue 19): the mix against each variant alone, on a trace with a wide
# size mix (Azure's conversation hour with Mooncake's long-context hour), plus the mix under a
# 9 USD/h budget: the reserved H100s' 4.40 USD/h, which no cap can cut, plus about two thirds of
# the 6.96 USD the mix spends on the rest uncapped over the hour (it was 12 USD/h when the mix
# spent 16.50, before the size routing and the warm start). The policies are the spec's own
# (ebbtide-variants and one ebbtide-<variant> each); the spec is bench/variants.yaml.
VARIANTS = ("variants", ["bench/variants.yaml", "--trace", "conv-1h+mooncake-1h", "--budget", "9"])


def main() -> int:
    RESULTS.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "operator"),
                                                                      os.environ.get("PYTHONPATH")])))
    runs = [(key, [*args, "--policies", *POLICIES, *extra, "--plot", f"bench/{key}.png"]) for key, args, extra in RUNS]
    runs += [(key, [*args, "--policies", *policies, "--plot", f"bench/{key}.png"])
             for key, args, policies in NEW_TRACE_RUNS]
    runs += [SPEED[:2], *((key, [*args, "--policies", *policies]) for key, args, policies in LIFECYCLE_RUNS)]
    runs += [VARIANTS]
    only = set(sys.argv[1:])  # `python bench/run.py KEY...`: rerun those runs only, then render
    unknown = only - {key for key, _ in runs}
    if unknown:
        raise SystemExit(f"unknown runs {', '.join(sorted(unknown))}; known: {', '.join(key for key, _ in runs)}")
    for key, args in runs:
        if only and key not in only:
            continue
        out = RESULTS / f"{key}.json"
        command = ["ebbtide", "simulate", *args, "--json", f"bench/results/{key}.json"]
        print("$", shlex.join(command), flush=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ebbtide.cli", *command[1:]], cwd=ROOT, env=env, check=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        document = json.loads(out.read_text())
        document["bench"] = {
            "command": shlex.join(command),
            "wall_s": round(wall, 1),
            "user_s": round(after.ru_utime - before.ru_utime, 1),
            "sys_s": round(after.ru_stime - before.ru_stime, 1),
        }
        out.write_text(json.dumps(document, indent=2) + "\n")
    if not only:
        print("$ python bench/tuned.py", flush=True)  # the one-hour runs again, over more seeds
        subprocess.run([sys.executable, str(BENCH / "tuned.py")], cwd=ROOT, env=env, check=True)
        print("$ python bench/fluid_check.py", flush=True)  # the fluid model against request-level replay
        subprocess.run([sys.executable, str(BENCH / "fluid_check.py")], cwd=ROOT, env=env, check=True)
    (RESULTS / "machine.json").write_text(json.dumps(machine(), indent=2) + "\n")
    (BENCH / "RESULTS.md").write_text(render(RESULTS))
    print("wrote bench/RESULTS.md")
    return 0


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    # What the runs themselves rewrite is not a change to the code that produced them.
    written = [":!bench/results", ":!bench/RESULTS.md", ":!bench/*.png"]
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *written],
                                cwd=ROOT, capture_output=True, text=True).stdout.strip())
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_after": load,
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


if __name__ == "__main__":
    sys.exit(main())
