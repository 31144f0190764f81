"""End-to-end scenarios, written once against `e2e.backend.Backend`, run on an emulated cluster
(default) or on kind (``E2E_CLUSTER=kind``). Run with ``make e2e`` (``python -m pytest e2e -q``)."""
