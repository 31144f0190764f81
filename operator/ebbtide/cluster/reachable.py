"""Whether the operator can talk to the Kubernetes API server, said in one line, before anything
that needs it starts."""

from __future__ import annotations

import itertools
import logging
import time

import kubernetes
import urllib3
import yaml

log = logging.getLogger(__name__)
MAX_API_BACKOFF_S = 60.0


def api_server_problem() -> str | None:
    """Why the operator cannot talk to the API server now, or None. Credentials are found as
    Kube.from_environment and kopf's login find them: in the cluster, else from the kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException as in_cluster:
        try:
            kubernetes.config.load_kube_config()
        except (kubernetes.config.ConfigException, OSError, yaml.YAMLError) as e:
            path = kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION
            return (f"no Kubernetes credentials: not in a cluster ({in_cluster}), and no usable kubeconfig "
                    f"at {path} ({' '.join(str(e).split())})")
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.retries = 0  # one attempt, one line: urllib3 would log a warning per retry
    with kubernetes.client.ApiClient(configuration) as client:
        try:
            kubernetes.client.VersionApi(client).get_code(_request_timeout=10)
        except kubernetes.client.ApiException:
            return None  # it answered: a refusal is the handlers' to report, resource by resource
        except (urllib3.exceptions.HTTPError, OSError) as e:
            return f"cannot reach the Kubernetes API server at {configuration.host}: {_root_cause(e)}"
    return None


def wait_for_api_server(log: logging.Logger = log) -> None:
    """Return once there are credentials and the API server answers; until then say why in one
    line per attempt, with backoff. Started without them, kopf's startup handler and the scaling
    loop (or the activator's watch) would log a traceback at every retry and every tick."""
    for attempt in itertools.count():
        problem = api_server_problem()
        if problem is None:
            return
        delay = min(2.0 ** attempt, MAX_API_BACKOFF_S)
        log.error("%s; retrying in %g s", problem, delay)
        time.sleep(delay)


def _root_cause(error: BaseException) -> str:
    """The innermost error of a chain: "Connection refused", not urllib3's wrappers around it."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return getattr(error, "strerror", None) or str(error)
