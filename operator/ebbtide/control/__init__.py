"""The kopf shell: handlers, the reconciler, the scaling loop (observe -> decide -> act ->
explain), state kept in status, the operator's metrics and config, `ebbtide run`."""
