"""
Plain-dict access to the real API server for tests: get, list, create, patch, delete any resource
by its path (``'apps/v1/deployments'``, ``'v1/events'``, ``'ebbtide.dev/v1alpha1/inferenceservices'``).

The official client's typed models drop fields they do not know and rename the rest; tests read
what the server sent, as the operator does.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubernetes.client.rest import ApiException

from tests.testbed.waiting import wait_for

MERGE_PATCH = "application/merge-patch+json"
# Kinds whose plural is not the lower-cased kind plus "s".
PLURALS = {"Endpoints": "endpoints", "PodDisruptionBudget": "poddisruptionbudgets",
           "CustomResourceDefinition": "customresourcedefinitions", "InferenceService": "inferenceservices"}
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"


def without_owner(obj: dict) -> dict:
    """A rendered object for a test with no InferenceService: the garbage collector deletes what an absent owner holds."""
    metadata = {k: v for k, v in obj["metadata"].items() if k != "ownerReferences"}
    return {**obj, "metadata": metadata}


def resource_of(body: Mapping[str, Any]) -> str:
    kind = body["kind"]
    return f"{body['apiVersion']}/{PLURALS.get(kind, kind.lower() + 's')}"


def path_of(resource: str, namespace: str | None = None, name: str | None = None,
            subresource: str | None = None) -> str:
    *group_version, plural = resource.split("/")
    base = "/api/" if len(group_version) == 1 else "/apis/"
    path = base + "/".join(group_version)
    if namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeApi:
    """What the tests read and write, through one official ``ApiClient``."""

    def __init__(self, api_client: Any) -> None:
        self.client = api_client
        # The Warning header of the last answer: how a server says it dropped unknown fields.
        self.last_warning: str | None = None

    def request(self, method: str, path: str, body: Any = None, *, query: Mapping[str, Any] | None = None,
                content_type: str = "application/json", accept: str = "application/json") -> Any:
        method, url, headers, body, _ = self.client.param_serialize(
            method, path, query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params={"Accept": accept, "Content-Type": content_type}, body=body,
            auth_settings=["BearerToken"])
        response = self.client.call_api(method, url, header_params=headers, body=body)
        data = response.read()
        self.last_warning = response.getheader("Warning")
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return json.loads(data) if data else None

    def get_object(self, resource: str, namespace: str | None, name: str) -> dict | None:
        try:
            return self.request("GET", path_of(resource, namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_objects(self, resource: str, namespace: str | None = None, *, label_selector: str | None = None,
                     field_selector: str | None = None) -> list[dict]:
        listed = self.request("GET", path_of(resource, namespace),
                              query={"labelSelector": label_selector, "fieldSelector": field_selector})
        return listed.get("items") or []

    def create_object(self, body: Mapping[str, Any], *, resource: str | None = None,
                      namespace: str | None = None) -> dict:
        namespace = namespace or (body.get("metadata") or {}).get("namespace")
        return self.request("POST", path_of(resource or resource_of(body), namespace), dict(body))

    def patch_object(self, resource: str, namespace: str | None, name: str, patch: Any, *,
                     subresource: str | None = None, content_type: str = MERGE_PATCH) -> dict:
        return self.request("PATCH", path_of(resource, namespace, name, subresource), patch,
                            content_type=content_type)

    def delete_object(self, resource: str, namespace: str | None, name: str, *,
                      propagation_policy: str | None = None, grace_period_seconds: int | None = None) -> dict | None:
        options = {"propagationPolicy": propagation_policy, "gracePeriodSeconds": grace_period_seconds}
        try:
            return self.request("DELETE", path_of(resource, namespace, name),
                                {k: v for k, v in options.items() if v is not None})
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def register_crd(self, crd: Mapping[str, Any], timeout: float = 30.0) -> dict:
        """Create or update a CustomResourceDefinition and wait until it is Established."""
        crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", **crd}
        name = crd["metadata"]["name"]
        existing = self.get_object(CRDS, None, name)
        if existing is None:
            self.create_object(crd)
        elif existing["spec"] != crd["spec"]:
            crd["metadata"] = {**crd["metadata"], "resourceVersion": existing["metadata"]["resourceVersion"]}
            self.request("PUT", path_of(CRDS, None, name), crd)
        return self.wait_established(name, timeout)

    def wait_established(self, name: str, timeout: float = 30.0) -> dict:
        """The CRD once it is Established (its API is served), as the server holds it."""
        def established() -> dict | None:
            current = self.get_object(CRDS, None, name) or {}
            conditions = {c["type"]: c["status"] for c in (current.get("status") or {}).get("conditions") or []}
            return current if conditions.get("Established") == "True" else None
        return wait_for(established, timeout=timeout, what=f"CRD {name} Established")

    def delete_crd(self, name: str, timeout: float = 30.0) -> None:
        """Delete a CRD and wait until it is gone (its objects go with it)."""
        self.delete_object(CRDS, None, name)
        wait_for(lambda: self.get_object(CRDS, None, name) is None, timeout=timeout, what=f"CRD {name} deleted")
