"""The edge: a small dict-in, dict-out Kubernetes REST client on top of ``kubernetes.client.ApiClient``.

The builders produce plain dicts; this client sends them as they are (no typed models in
between that could drop fields) and returns the API server's JSON as dicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from kubetune_api import coordinates

Obj = dict[str, Any]
MERGE_PATCH: Final = "application/merge-patch+json"


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST API (namespaced kinds only)."""

    api_version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        prefix = "/api" if "/" not in self.api_version else "/apis"
        path = f"{prefix}/{self.api_version}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


FINETUNEJOBS: Final = Resource(coordinates.API_VERSION, coordinates.PLURAL)
JOBS: Final = Resource("batch/v1", "jobs")
PODS: Final = Resource("v1", "pods")
CONFIGMAPS: Final = Resource("v1", "configmaps")
SERVICEACCOUNTS: Final = Resource("v1", "serviceaccounts")
ROLES: Final = Resource("rbac.authorization.k8s.io/v1", "roles")
ROLEBINDINGS: Final = Resource("rbac.authorization.k8s.io/v1", "rolebindings")

_BY_KIND: Final = {
    ("v1", "ConfigMap"): CONFIGMAPS,
    ("v1", "ServiceAccount"): SERVICEACCOUNTS,
    ("v1", "Pod"): PODS,
    ("batch/v1", "Job"): JOBS,
    ("rbac.authorization.k8s.io/v1", "Role"): ROLES,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ROLEBINDINGS,
    (coordinates.API_VERSION, coordinates.KIND): FINETUNEJOBS,
}


def resource_of(obj: Mapping[str, Any]) -> Resource:
    """The REST resource of a built object (by apiVersion and kind)."""
    return _BY_KIND[(obj["apiVersion"], obj["kind"])]


class KubeError(RuntimeError):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        self.body = body
        try:
            detail = json.loads(body)
            self.reason = str(detail.get("reason", ""))
            message = str(detail.get("message", body))
        except ValueError:
            self.reason = ""
            message = body
        self.message = message
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


def new_api_client(kubeconfig: str | None = None) -> k8s_client.ApiClient:
    """``kubeconfig`` or $KUBECONFIG if set; otherwise in-cluster credentials (or ~/.kube/config)."""
    # Read $KUBECONFIG now: the kubernetes package reads it only once, when it is imported.
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
    if kubeconfig is None:
        configuration = k8s_client.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException:
            pass
        else:
            return k8s_client.ApiClient(configuration)
    api_client = k8s_config.new_client_from_config(config_file=kubeconfig)
    assert isinstance(api_client, k8s_client.ApiClient)
    return api_client


class Kube:
    """GET/POST/PATCH/LIST/DELETE of plain dicts."""

    def __init__(self, api_client: k8s_client.ApiClient, timeout: float = 30.0) -> None:
        self.api_client = api_client
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        serialized = self.api_client.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*serialized, _request_timeout=self.timeout)
        data = response.read()
        text = data.decode("utf-8") if isinstance(data, bytes) else str(data or "")
        if not 200 <= response.status <= 299:
            raise KubeError(response.status, method, path, text)
        result: Obj = json.loads(text) if text else {}
        return result

    def get(self, resource: Resource, namespace: str, name: str) -> Obj | None:
        """The object, or None if it does not exist."""
        try:
            return self.request("GET", resource.path(namespace, name))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def list(self, resource: Resource, namespace: str, label_selector: str | None = None) -> list[Obj]:
        query = [("labelSelector", label_selector)] if label_selector else None
        items: list[Obj] = self.request("GET", resource.path(namespace), query=query).get("items", [])
        return items

    def create(self, obj: Mapping[str, Any]) -> Obj:
        meta = obj["metadata"]
        return self.request("POST", resource_of(obj).path(meta["namespace"]), body=dict(obj))

    def ensure(self, obj: Mapping[str, Any]) -> tuple[Obj, bool]:
        """Create ``obj`` unless an object of that name exists; (the object, whether it was created).

        Idempotent across restarts and replicas: names are deterministic, so a second
        attempt meets HTTP 409 and adopts what is there.
        """
        meta = obj["metadata"]
        try:
            return self.create(obj), True
        except KubeError as err:
            if err.status != 409:
                raise
        existing = self.get(resource_of(obj), meta["namespace"], meta["name"])
        if existing is None:  # deleted in between: try once more
            return self.create(obj), True
        return existing, False

    def patch(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        subresource: str | None = None,
    ) -> Obj:
        """A JSON merge patch (RFC 7386): nulls delete keys, maps merge, lists are replaced."""
        path = resource.path(namespace, name, subresource)
        return self.request("PATCH", path, body=dict(patch), content_type=MERGE_PATCH)

    def delete(self, resource: Resource, namespace: str, name: str, propagation: str = "Background") -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self.request("DELETE", resource.path(namespace, name), body=body)
        except KubeError as err:
            if err.status != 404:
                raise
