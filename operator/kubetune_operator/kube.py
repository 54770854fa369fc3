"""The edge: one small JSON client for the Kubernetes API, for the operator and for hack/'s node agent.

Plain dicts in and out, exactly as ``kubectl get -o json`` shows objects: the builders produce
dicts, and no typed model in between can drop a field. ``kubernetes.config`` reads the
credentials (every kubeconfig form, in-cluster ServiceAccount tokens and their rotation);
requests go through one thread-safe urllib3 pool with a timeout each.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import certifi
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from kubetune_api import coordinates

Obj = dict[str, Any]
JSON_CONTENT: Final = "application/json"
#: Connection failures (an API server restarting) are retried; a request that reached it never is.
_RETRIES: Final = urllib3.Retry(total=3, connect=3, read=0, redirect=0, status=0, other=0, backoff_factor=0.2)
MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"
#: The User-Agent of a client that names none. The API server takes the part before the first "/"
#: as the field manager of what a request writes (managedFields) and logs the whole in its audit log.
DEFAULT_USER_AGENT: Final = "kubetune"


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
NETWORKPOLICIES: Final = Resource("networking.k8s.io/v1", "networkpolicies")
#: Kueue's Workload (one per queued Job, labelled with the Job's uid); v1beta2 is its storage version.
WORKLOADS: Final = Resource("kueue.x-k8s.io/v1beta2", "workloads")

_BY_KIND: Final = {
    ("v1", "ConfigMap"): CONFIGMAPS,
    ("v1", "ServiceAccount"): SERVICEACCOUNTS,
    ("v1", "Pod"): PODS,
    ("batch/v1", "Job"): JOBS,
    ("rbac.authorization.k8s.io/v1", "Role"): ROLES,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ROLEBINDINGS,
    ("networking.k8s.io/v1", "NetworkPolicy"): NETWORKPOLICIES,
    (coordinates.API_VERSION, coordinates.KIND): FINETUNEJOBS,
}


def resource_of(obj: Mapping[str, Any]) -> Resource:
    """The REST resource of a built object (by apiVersion and kind)."""
    return _BY_KIND[(obj["apiVersion"], obj["kind"])]


class KubeError(RuntimeError):
    """A non-2xx answer from the API server; ``reason`` is the Status object's (e.g. AlreadyExists)."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        self.method = method
        self.path = path
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


def load_configuration(kubeconfig: str | Path | None = None) -> k8s_client.Configuration:
    """``kubeconfig`` or $KUBECONFIG if set; otherwise in-cluster credentials (or ~/.kube/config)."""
    configuration = k8s_client.Configuration()
    # Read $KUBECONFIG now: the kubernetes package reads it only once, when it is imported.
    path = kubeconfig or os.environ.get("KUBECONFIG") or None
    if path is None:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException:
            path = None
        else:
            return configuration
    loader: Any = k8s_config.load_kube_config  # untyped
    loader(config_file=str(path) if path else None, client_configuration=configuration)
    return configuration


#: Kept connections to the API server.
POOL_CONNECTIONS = 32


class Kube:
    """GET/POST/PATCH/DELETE/WATCH of plain dicts against one API server."""

    def __init__(
        self,
        configuration: k8s_client.Configuration,
        timeout: float = 30.0,
        user_agent: str = DEFAULT_USER_AGENT,
    ) -> None:
        self.configuration = configuration
        self.server = str(configuration.host).rstrip("/")
        self.timeout = timeout
        self.user_agent = user_agent
        tls: dict[str, Any] = {
            "cert_reqs": "CERT_REQUIRED" if configuration.verify_ssl else "CERT_NONE",
            # As the kubernetes client does: without a cluster CA, the public CAs (a managed API server).
            "ca_certs": configuration.ssl_ca_cert or certifi.where(),
            "cert_file": configuration.cert_file,
            "key_file": configuration.key_file,
        }
        if getattr(configuration, "tls_server_name", None):
            tls["server_hostname"] = configuration.tls_server_name
        # As many kept connections as the operator has threads making requests (settings.SYNC_WORKERS
        # and reconcile.PREREQUISITE_WORKERS): a request beyond them would open, and then drop, a
        # TLS connection of its own.
        self._pool: urllib3.PoolManager = (
            urllib3.ProxyManager(configuration.proxy, num_pools=4, maxsize=POOL_CONNECTIONS, **tls)
            if configuration.proxy
            else urllib3.PoolManager(num_pools=4, maxsize=POOL_CONNECTIONS, **tls)
        )

    @classmethod
    def connect(
        cls, kubeconfig: str | Path | None = None, timeout: float = 30.0, user_agent: str = DEFAULT_USER_AGENT
    ) -> Kube:
        """A client for ``kubeconfig`` (see :func:`load_configuration` for the fallbacks)."""
        return cls(load_configuration(kubeconfig), timeout, user_agent)

    @property
    def port(self) -> int:
        parsed = urllib.parse.urlsplit(self.server)
        return parsed.port or (443 if parsed.scheme == "https" else 80)

    def close(self) -> None:
        self._pool.clear()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": JSON_CONTENT, "User-Agent": self.user_agent}
        # Calls the refresh hook, so a rotated ServiceAccount token is read again when due.
        token = self.configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        if token:
            headers["Authorization"] = str(token)
        return headers

    def _url(self, path: str, params: Mapping[str, str] | None) -> str:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"{self.server}{path}{query}"

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = JSON_CONTENT,
        timeout: float | None = None,
    ) -> Obj:
        """One request; the answer's JSON, or :class:`KubeError` for a non-2xx status."""
        headers = self._headers()
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        response = self._pool.request(
            method,
            self._url(path, params),
            body=data,
            headers=headers,
            timeout=timeout or self.timeout,
            retries=_RETRIES,
        )
        text = response.data.decode(errors="replace")
        if not 200 <= response.status <= 299:
            raise KubeError(response.status, method, path, text)
        result: Obj = json.loads(text) if text else {}
        return result

    def watch(self, path: str, params: Mapping[str, str], timeout_seconds: int) -> Iterator[Obj]:
        """Yield watch events until the server closes the stream (after ``timeout_seconds``)."""
        query = {**params, "watch": "true", "timeoutSeconds": str(timeout_seconds)}
        response = self._pool.request(
            "GET",
            self._url(path, query),
            headers=self._headers(),
            timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 15),
            preload_content=False,
            retries=False,
        )
        try:
            if response.status >= 300:
                raise KubeError(response.status, "WATCH", path, response.data.decode(errors="replace"))
            for line in response:
                if line.strip():
                    event: Obj = json.loads(line)
                    yield event
        finally:
            response.release_conn()

    # -- objects by resource -----------------------------------------------------------------------
    def get(self, resource: Resource, namespace: str, name: str) -> Obj | None:
        """The object, or None if it does not exist."""
        try:
            return self.request("GET", resource.path(namespace, name))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def list(self, resource: Resource, namespace: str, label_selector: str | None = None) -> list[Obj]:
        params = {"labelSelector": label_selector} if label_selector else None
        items: list[Obj] = self.request("GET", resource.path(namespace), params=params).get("items", [])
        return items

    def create(self, obj: Mapping[str, Any]) -> Obj:
        meta = obj["metadata"]
        # Strict: a field the API server does not know (a typo inside a passed-through affinity)
        # is refused, not silently dropped.
        params = {"fieldValidation": "Strict"}
        return self.request("POST", resource_of(obj).path(meta["namespace"]), dict(obj), params=params)

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
        return self.request("PATCH", path, dict(patch), content_type=MERGE_PATCH)

    def delete(self, resource: Resource, namespace: str, name: str, propagation: str = "Background") -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self.request("DELETE", resource.path(namespace, name), body)
        except KubeError as err:
            if err.status != 404:
                raise
