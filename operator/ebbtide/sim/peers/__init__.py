"""The autoscalers users would otherwise pick, each written from its public documentation
(behaviour, not code; ../shared/reference/anchors.md has the facts): the Kubernetes HPA on
three signals and KEDA (hpa.py), AIBrix's APA (aibrix.py), llm-d's workload-variant-autoscaler
(wva.py) and NVIDIA Dynamo's planner (dynamo.py). They see the same delayed signals as Ebbtide
and act on the same simulated fleet; base.py gives them the spec's schedule floors, tuning.py
sweeps each one's main threshold with hindsight."""
