"""
The real helm (tools/bin/helm, from `tools/install-helm.sh`) and the chart in the test bed's cluster.

    with installed_release(apiserver) as release:            # helm install ... --create-namespace
        kubeconfig = service_account_kubeconfig(apiserver, release, path)   # its ServiceAccount's token
        with running_operator(AsServiceAccount(apiserver.plane, kubeconfig)): ...

No kubelet is started for the release's namespace: the operator's own Deployment stays Pending
(its pods are force-deleted at uninstall, as nothing would finish a graceful deletion).
"""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import subprocess
from collections.abc import Iterator

import pytest

from tests.testbed.controlplane import ControlPlane, kubeconfig_text
from tests.testbed.fixtures import Cluster
from tests.testbed.kubeapi import KubeApi, path_of
from tests.testbed.waiting import wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ebbtide"
HELM = ROOT / "tools" / "bin" / "helm"
MISSING_HELM = "tools/bin/helm is missing: run tools/install-helm.sh (or `make tools`)"


def helm(*args: str, kubeconfig: pathlib.Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """helm's outcome; with ``check`` a failure fails the test with helm's own words."""
    command = [str(HELM), *args] + (["--kubeconfig", str(kubeconfig)] if kubeconfig else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    namespace: str

    @property
    def fullname(self) -> str:
        """The chart's name for its objects (ClusterRole, ServiceAccount, Deployment) with default values."""
        return self.name if "ebbtide" in self.name else f"{self.name}-ebbtide"


@contextlib.contextmanager
def installed_release(cluster: Cluster, *values: str, name: str = "rel",
                      namespace: str = "ebbtide-system") -> Iterator[Release]:
    """``helm install`` of charts/ebbtide; ``helm uninstall`` and the namespace deleted after."""
    helm("install", name, str(CHART), "--namespace", namespace, "--create-namespace", *values,
         kubeconfig=cluster.kubeconfig_path)
    try:
        yield Release(name, namespace)
    finally:
        helm("uninstall", name, "--namespace", namespace, "--wait", kubeconfig=cluster.kubeconfig_path,
             check=False)
        api = cluster.server
        api.request("DELETE", path_of("v1/pods", namespace), query={"gracePeriodSeconds": 0})
        api.delete_object("v1/namespaces", None, namespace)
        wait_for(lambda: api.get_object("v1/namespaces", None, namespace) is None, timeout=60,
                 what=f"namespace {namespace} deleted")


def service_account_kubeconfig(cluster: Cluster, release: Release, path: pathlib.Path,
                               seconds: int = 3600) -> pathlib.Path:
    """A kubeconfig with a token for the release's ServiceAccount, minted by the TokenRequest API."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": seconds}}
    minted = cluster.server.request(
        "POST", path_of("v1/serviceaccounts", release.namespace, release.fullname, "token"), request)
    user = f"system:serviceaccount:{release.namespace}:{release.fullname}"
    path.write_text(kubeconfig_text(cluster.url, cluster.plane.pki / "ca.crt", minted["status"]["token"], user))
    return path


class AsServiceAccount(Cluster):
    """
    The cluster as a ServiceAccount sees it: the operator (kopf's login and the official client
    read the default kubeconfig), kubectl and ``api_client()`` use its token. ``server`` and
    ``register_crd`` stay the admin's, for the test's own reads and writes.
    """

    def __init__(self, plane: ControlPlane, kubeconfig: pathlib.Path) -> None:
        super().__init__(plane)  # builds .server from the admin kubeconfig
        self.kubeconfig_path = kubeconfig
        self.own = KubeApi(self.api_client())  # with the ServiceAccount's token

    def can(self, verb: str, group: str, resource: str, namespace: str | None = None) -> bool:
        """The API server's RBAC verdict on a request with the ServiceAccount's own token (a
        SelfSubjectAccessReview, what `kubectl auth can-i` asks); no namespace: all namespaces."""
        resource, _, subresource = resource.partition("/")
        attributes = {"verb": verb, "group": group, "resource": resource, "subresource": subresource,
                      "namespace": namespace or ""}
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attributes}}
        return self.own.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                                review)["status"]["allowed"]
