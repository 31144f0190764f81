"""Every panel of the chart's Grafana dashboard shows data after a real run: the operator on the
control plane scales a service under load, a real Prometheus scrapes it and the engines, and
Prometheus evaluates each panel's queries (Grafana's variables set to All and their defaults)."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_closed_loop import start_service
from tests.testbed.helm import CHART
from tests.testbed.loadgen import steady_load
from tests.testbed.operator import replicas
from tests.testbed.waiting import wait_for

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]
DASHBOARD = CHART / "dashboards" / "ebbtide-overview.json"


def panel_queries() -> dict[str, list[str]]:
    """Panel title -> its PromQL, with the dashboard's variables as Grafana sends them by default."""
    dashboard = json.loads(DASHBOARD.read_text())
    defaults = {v["name"]: (v.get("allValue") if v.get("includeAll") else v["current"]["value"])
                for v in dashboard["templating"]["list"] if v["type"] != "datasource"}
    queries = {}
    for panel in dashboard["panels"]:
        exprs = []
        for target in panel["targets"]:
            expr = re.sub(r"\$(\w+)", lambda m: defaults[m.group(1)], target["expr"])
            assert "$" not in expr, expr
            exprs.append(expr)
        queries[panel["title"]] = exprs
    return queries


def test_every_dashboard_panel_has_data_after_a_real_run(cluster):
    queries = panel_queries()
    assert len(queries) >= 9
    # The operator's /metrics as a target beside the engines' pods: here it runs in the test process,
    # not in a pod, so the chart's prometheus.io annotations cannot lead Prometheus to it.
    cluster.prometheus.set_targets([{"targets": [f"127.0.0.1:{cluster.metrics_port}"], "labels": {}}])
    with cluster.operator():
        balancer = start_service(cluster)
        generator = steady_load(balancer.url, rate=40, duration=60)
        wait_for(lambda: (replicas(cluster.server) or 0) > 1, timeout=60, interval=0.5, what="a scale-up")

        def empty_panels() -> list[str]:
            return [f"{title}: {expr}" for title, exprs in queries.items() for expr in exprs
                    if not cluster.prometheus.query(expr)]
        empty = []

        def all_have_data() -> bool:
            empty[:] = empty_panels()
            return not empty
        try:
            wait_for(all_have_data, timeout=60, interval=1, what="data in every panel")
        except AssertionError:
            pytest.fail("panels without data:\n" + "\n".join(empty), pytrace=False)
        finally:
            generator.stop()
