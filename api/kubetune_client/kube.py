"""The Kubernetes edge: the kubernetes client, and its failures turned into :mod:`.errors`.

Everything else in the SDK works on plain dicts of FineTuneJobs and pods; only this module knows
the kubernetes package, its configuration loading and its ApiException.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api import coordinates, wellknown
from kubetune_api import sweep as sweep_api

from .errors import (
    AlreadyExistsError,
    CrdNotInstalledError,
    InvalidSpecError,
    KubetuneError,
    LogsUnavailableError,
    NoClusterError,
    NotFoundError,
    PermissionDeniedError,
)

Obj = dict[str, Any]

#: The label the operator puts on each child of a FineTuneJob.
JOB_LABEL = coordinates.LABEL_FINETUNEJOB
TRAINER_CONTAINER = wellknown.TRAINER_CONTAINER
#: Seconds a plain (non-watch) request may take.
REQUEST_TIMEOUT = 30
_IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_FIELD_MANAGER = "kubetune-cli"


def kubeconfig_path(explicit: str | os.PathLike[str] | None) -> str | None:
    """The kubeconfig to read: ``explicit``, else ``$KUBECONFIG``, else ``~/.kube/config`` if it exists."""
    if explicit is not None:
        return os.fspath(explicit)
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"]
    default = Path("~/.kube/config").expanduser()
    return str(default) if default.exists() else None


def _context_namespace(config_file: str, context: str | None) -> str | None:
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(config_file)
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    namespace = ((chosen or {}).get("context") or {}).get("namespace")
    return str(namespace) if namespace else None


def _http_status(exc: Exception) -> tuple[int, str]:
    """An ApiException's status and the API server's own message (its Status body), if any."""
    status = int(getattr(exc, "status", 0) or 0)
    body = getattr(exc, "body", None) or ""
    try:
        message = json.loads(body).get("message") or str(body)
    except (ValueError, AttributeError):
        message = str(body).strip() or str(getattr(exc, "reason", "")) or str(exc)
    return status, str(message)


@dataclass
class Kube:
    """An API client and the namespace the user's commands default to."""

    api: Any
    namespace: str
    #: What the client talks to, for messages (the API server's URL).
    server: str

    @classmethod
    def connect(
        cls,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        namespace: str | None = None,
    ) -> Kube:
        """Log in with a kubeconfig (or the pod's ServiceAccount when running in a cluster)."""
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        path = kubeconfig_path(kubeconfig)
        try:
            if path is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                api = client.ApiClient(configuration)
                default_ns = _IN_CLUSTER_NAMESPACE.read_text().strip() or "default"
            elif path is None:
                raise NoClusterError(
                    "no kubeconfig: pass --kubeconfig, set KUBECONFIG, or create ~/.kube/config"
                )
            else:
                missing = [p for p in path.split(os.pathsep) if p and not Path(p).exists()]
                if missing and len(missing) == len([p for p in path.split(os.pathsep) if p]):
                    raise NoClusterError(f"no kubeconfig at {path}: pass --kubeconfig or set KUBECONFIG")
                api = config.new_client_from_config(config_file=path, context=context)
                default_ns = _context_namespace(path, context) or "default"
        except (ConfigException, OSError, ValueError) as exc:
            raise NoClusterError(f"cannot use the kubeconfig {path}: {exc}") from exc
        return cls(api=api, namespace=namespace or default_ns, server=str(api.configuration.host))

    # -- errors ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def errors(
        self, what: str, namespace: str | None = None, name: str | None = None, kind: str = coordinates.KIND
    ) -> Iterator[None]:
        """Turn the client's failures during ``what`` (on a ``kind``) into :mod:`.errors` classes."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            yield
        except KubetuneError:
            raise
        except ApiException as exc:
            raise self._api_error(exc, what, namespace, name, kind) from exc
        except HTTPError as exc:  # connection refused, TLS, DNS: no answer at all
            raise NoClusterError(f"cannot reach the API server at {self.server} ({what}): {exc}") from exc

    def _api_error(
        self, exc: Exception, what: str, namespace: str | None, name: str | None, kind: str = coordinates.KIND
    ) -> KubetuneError:
        status, message = _http_status(exc)
        if status == 401:
            return PermissionDeniedError(
                f"the API server at {self.server} did not accept the credentials ({what}): {message}"
            )
        if status == 403:
            return PermissionDeniedError(f"permission denied ({what}): {message}")
        if status == 404:
            plural = sweep_api.PLURAL if kind == sweep_api.KIND else coordinates.PLURAL
            if not self.crd_served(plural):
                return CrdNotInstalledError(
                    f"the cluster at {self.server} serves no {kind} resource "
                    f"({coordinates.API_VERSION}): install kubetune's CRDs (helm install kubetune "
                    "charts/kubetune, or kubectl apply -f crds/)"
                )
            where = f" in namespace {namespace}" if namespace else ""
            return NotFoundError(f"{kind} {name or ''} not found{where}".replace("  ", " "))
        if status == 409:
            return AlreadyExistsError(f"{what}: {message}")
        if status in (400, 422):
            return InvalidSpecError(f"the API server refused it ({what}): {message}")
        return KubetuneError(f"{what} failed (HTTP {status}): {message}")

    def crd_served(self, plural: str = coordinates.PLURAL) -> bool:
        """Whether the API server serves FineTuneJobs, or ``plural`` (discovery of the group/version)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            found = client.CustomObjectsApi(self.api).get_api_resources(
                coordinates.GROUP, coordinates.VERSION, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.name == plural for r in found.resources or [])

    # -- FineTuneJobs ----------------------------------------------------------------------
    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def create(self, body: Obj, namespace: str, dry_run: bool = False) -> Obj:
        name = body.get("metadata", {}).get("name")
        extra: dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        with self.errors(f"create {coordinates.KIND} {name}", namespace, name):
            created: Obj = self._custom().create_namespaced_custom_object(
                coordinates.GROUP,
                coordinates.VERSION,
                namespace,
                coordinates.PLURAL,
                body,
                field_manager=_FIELD_MANAGER,
                field_validation="Strict",
                _request_timeout=REQUEST_TIMEOUT,
                **extra,
            )
        return created

    def get(self, namespace: str, name: str) -> Obj:
        with self.errors(f"get {coordinates.KIND} {name}", namespace, name):
            found: Obj = self._custom().get_namespaced_custom_object(
                coordinates.GROUP,
                coordinates.VERSION,
                namespace,
                coordinates.PLURAL,
                name,
                _request_timeout=REQUEST_TIMEOUT,
            )
        return found

    def list_jobs(self, namespace: str | None) -> list[Obj]:
        """FineTuneJobs in ``namespace`` (None: every namespace)."""
        custom = self._custom()
        with self.errors(f"list {coordinates.PLURAL}", namespace):
            if namespace is None:
                answer = custom.list_cluster_custom_object(
                    coordinates.GROUP,
                    coordinates.VERSION,
                    coordinates.PLURAL,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            else:
                answer = custom.list_namespaced_custom_object(
                    coordinates.GROUP,
                    coordinates.VERSION,
                    namespace,
                    coordinates.PLURAL,
                    _request_timeout=REQUEST_TIMEOUT,
                )
        items: list[Obj] = answer.get("items", [])
        return items

    def merge_patch(self, namespace: str, name: str, patch: Obj) -> Obj:
        with self.errors(f"patch {coordinates.KIND} {name}", namespace, name):
            patched: Obj = self._custom().patch_namespaced_custom_object(
                coordinates.GROUP,
                coordinates.VERSION,
                namespace,
                coordinates.PLURAL,
                name,
                patch,
                field_manager=_FIELD_MANAGER,
                _content_type="application/merge-patch+json",
                _request_timeout=REQUEST_TIMEOUT,
            )
        return patched

    def watch(self, namespace: str, name: str, resource_version: str, timeout_s: int) -> Iterator[Obj]:
        """Each new version of one FineTuneJob after ``resource_version``, for up to ``timeout_s``.

        Ends when the server closes the watch (its timeout, or 410 Gone: the caller lists again).
        """
        from kubernetes import watch

        stream = watch.Watch().stream(
            self._custom().list_namespaced_custom_object,
            coordinates.GROUP,
            coordinates.VERSION,
            namespace,
            coordinates.PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=max(1, timeout_s),
            _request_timeout=timeout_s + 10,
        )
        with self.errors(f"watch {coordinates.KIND} {name}", namespace, name):
            for event in stream:
                if event.get("type") == "ERROR":  # 410 Gone and friends: list again
                    return
                obj = event.get("object")
                if event.get("type") == "DELETED":
                    raise NotFoundError(f"{coordinates.KIND} {name} was deleted in namespace {namespace}")
                if isinstance(obj, dict):
                    yield obj

    # -- FineTuneSweeps --------------------------------------------------------------------
    def create_sweep(self, body: Obj, namespace: str, dry_run: bool = False) -> Obj:
        name = body.get("metadata", {}).get("name")
        extra: dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        with self.errors(f"create {sweep_api.KIND} {name}", namespace, name, sweep_api.KIND):
            created: Obj = self._custom().create_namespaced_custom_object(
                coordinates.GROUP,
                coordinates.VERSION,
                namespace,
                sweep_api.PLURAL,
                body,
                field_manager=_FIELD_MANAGER,
                field_validation="Strict",
                _request_timeout=REQUEST_TIMEOUT,
                **extra,
            )
        return created

    def get_sweep(self, namespace: str, name: str) -> Obj:
        with self.errors(f"get {sweep_api.KIND} {name}", namespace, name, sweep_api.KIND):
            found: Obj = self._custom().get_namespaced_custom_object(
                coordinates.GROUP,
                coordinates.VERSION,
                namespace,
                sweep_api.PLURAL,
                name,
                _request_timeout=REQUEST_TIMEOUT,
            )
        return found

    def list_sweeps(self, namespace: str | None) -> list[Obj]:
        """FineTuneSweeps in ``namespace`` (None: every namespace)."""
        custom = self._custom()
        with self.errors(f"list {sweep_api.PLURAL}", namespace, kind=sweep_api.KIND):
            if namespace is None:
                answer = custom.list_cluster_custom_object(
                    coordinates.GROUP, coordinates.VERSION, sweep_api.PLURAL, _request_timeout=REQUEST_TIMEOUT
                )
            else:
                answer = custom.list_namespaced_custom_object(
                    coordinates.GROUP,
                    coordinates.VERSION,
                    namespace,
                    sweep_api.PLURAL,
                    _request_timeout=REQUEST_TIMEOUT,
                )
        items: list[Obj] = answer.get("items", [])
        return items

    # -- trainer pods ----------------------------------------------------------------------
    def trainer_pods(self, namespace: str, name: str) -> list[Obj]:
        """The FineTuneJob's trainer pods, oldest first."""
        from kubernetes import client

        with self.errors(f"list the pods of {coordinates.KIND} {name}", namespace):
            pods = client.CoreV1Api(self.api).list_namespaced_pod(
                namespace, label_selector=f"{JOB_LABEL}={name}", _request_timeout=REQUEST_TIMEOUT
            )
        items: list[Obj] = self.api.sanitize_for_serialization(pods).get("items", [])
        return sorted(items, key=lambda p: str(p["metadata"].get("creationTimestamp", "")))

    def pod_log(self, namespace: str, pod: str, follow: bool, tail_lines: int | None = None) -> Iterator[str]:
        """The trainer container's log, line by line (``follow``: until the container ends)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        extra: dict[str, Any] = {"tail_lines": tail_lines} if tail_lines is not None else {}
        try:
            with self.errors(f"read the log of pod {pod}", namespace):
                response = client.CoreV1Api(self.api).read_namespaced_pod_log(
                    pod,
                    namespace,
                    container=TRAINER_CONTAINER,
                    follow=follow,
                    _preload_content=False,
                    _request_timeout=None if follow else REQUEST_TIMEOUT,
                    **extra,
                )
        except KubetuneError as exc:
            cause = exc.__cause__
            if isinstance(cause, ApiException) and cause.status in (400, 500, 502, 503):
                _, message = _http_status(cause)
                raise LogsUnavailableError(
                    f"the API server could not fetch the log of pod {pod} from its node: {message}"
                ) from exc
            raise
        pending = b""
        try:
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace")
            if pending:
                yield pending.decode("utf-8", errors="replace")
        finally:
            response.release_conn()
