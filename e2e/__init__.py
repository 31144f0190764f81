"""End-to-end scenarios, written once against `e2e.backend.Backend`, run on a real control plane on
this machine with the chart installed by helm (default, ``E2E_CLUSTER=local``) or on kind
(``E2E_CLUSTER=kind``). Run with ``make e2e`` (``python -m pytest e2e -q``)."""
