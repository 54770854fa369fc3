"""Turning a pod spec into what a local process needs: volume contents and env.

Volumes are written under the pod's directory and later bind-mounted at their
mountPaths by :mod:`.exec_helper`.  Supported volume types: configMap, secret,
projected (serviceAccountToken, configMap, secret, downwardAPI), downwardAPI,
emptyDir and hostPath.  Env: value (with ``$(VAR)`` expansion), valueFrom
(configMapKeyRef, secretKeyRef, fieldRef, resourceFieldRef) and envFrom.
"""

from __future__ import annotations

import base64
import math
import os
import re
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from kubetune_operator.kube import Kube, KubeError

from .scheduling import parse_quantity

JSON = dict[str, Any]
DEFAULT_MODE = 0o644
MAX_TOKEN_AGE = 24 * 3600.0
TOKEN_RETRY_SECONDS = 10.0


class NotReadyError(Exception):
    """The container cannot start yet (a referenced object is missing); retried later."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class TokenFile:
    """A projected service-account token that must be refreshed before it expires."""

    path: Path
    service_account: str
    audience: str | None
    expiration_seconds: int
    refresh_at: float = 0.0


_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, ``$$`` is ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, value)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


class PodSpecResolver:
    """Reads the objects a pod refers to and renders its volumes and env."""

    def __init__(self, kube: Kube, pod: JSON, node: JSON, apiserver_port: int) -> None:
        self.kube = kube
        self.pod = pod
        self.node = node
        self.apiserver_port = apiserver_port
        self.namespace = str(pod["metadata"]["namespace"])
        self.tokens: list[TokenFile] = []

    # -- referenced objects ------------------------------------------------------
    def _object_data(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        path = f"/api/v1/namespaces/{self.namespace}/{kind}s/{name}"
        try:
            obj = self.kube.request("GET", path)
        except KubeError as exc:
            if exc.status != 404:
                raise
            if optional:
                return None
            what = "configmap" if kind == "configmap" else "secret"
            raise NotReadyError("NotFound", f'{what} "{name}" not found') from exc
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    # -- downward API ------------------------------------------------------------
    def field_value(self, field_path: str) -> str:
        meta, spec, status = self.pod["metadata"], self.pod["spec"], self.pod.get("status", {})
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", field_path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        if field_path in ("metadata.labels", "metadata.annotations"):
            items = sorted((meta.get(field_path.split(".")[1]) or {}).items())
            return "\n".join(f'{k}="{v}"' for k, v in items)
        values = {
            "metadata.name": meta.get("name"),
            "metadata.namespace": meta.get("namespace"),
            "metadata.uid": meta.get("uid"),
            "spec.nodeName": spec.get("nodeName"),
            "spec.serviceAccountName": spec.get("serviceAccountName"),
            "status.podIP": status.get("podIP") or "127.0.0.1",
            "status.podIPs": status.get("podIP") or "127.0.0.1",
            "status.hostIP": status.get("hostIP") or "127.0.0.1",
            "status.hostIPs": status.get("hostIP") or "127.0.0.1",
        }
        if field_path not in values:
            raise NotReadyError("CreateContainerConfigError", f"unsupported fieldRef {field_path!r}")
        return str(values[field_path] or "")

    def resource_value(self, ref: JSON, default_container: str | None) -> str:
        name = ref.get("containerName") or default_container
        container = next((c for c in self._all_containers() if c.get("name") == name), None)
        if container is None:
            raise NotReadyError("CreateContainerConfigError", f"resourceFieldRef: no container {name!r}")
        kind, _, resource = str(ref.get("resource", "")).partition(".")
        value = (container.get("resources", {}).get(kind) or {}).get(resource)
        if value is None and kind == "requests":
            value = (container.get("resources", {}).get("limits") or {}).get(resource)
        if value is None:  # no limit: the node's allocatable, as the kubelet reports
            value = self.node.get("status", {}).get("allocatable", {}).get(resource, "0")
        divisor = parse_quantity(ref.get("divisor") or "1") or Fraction(1)
        return str(math.ceil(parse_quantity(value) / divisor))

    def _all_containers(self) -> list[JSON]:
        spec = self.pod["spec"]
        return [*spec.get("initContainers", []), *spec.get("containers", [])]

    # -- volumes -----------------------------------------------------------------
    def _write_items(
        self,
        target: Path,
        data: dict[str, bytes],
        items: list[JSON] | None,
        mode: int,
        source: str,
        *,
        optional: bool = False,
    ) -> None:
        if not items:
            for key, value in data.items():
                _write_file(target / key, value, mode)
            return
        for item in items:
            key = str(item["key"])
            if key not in data and optional:  # as the kubelet: an optional source's missing key is skipped
                continue
            if key not in data:
                raise NotReadyError("FailedMount", f"{source}: key {key!r} not found")
            _write_file(target / str(item["path"]), data[key], int(item.get("mode") or mode))

    def _write_source(self, target: Path, source: JSON, mode: int, kind: str) -> None:
        """One configmap/secret source (a volume or a projection) into ``target``."""
        name = str(source.get("name") or source.get("secretName") or "")
        optional = bool(source.get("optional"))
        data = self._object_data(kind, name, optional)
        if data is not None:
            self._write_items(target, data, source.get("items"), mode, f'{kind} "{name}"', optional=optional)

    def _write_downward(self, target: Path, items: list[JSON], mode: int) -> None:
        for item in items:
            if item.get("fieldRef"):
                value = self.field_value(str(item["fieldRef"]["fieldPath"]))
            else:
                value = self.resource_value(item["resourceFieldRef"], None)
            _write_file(target / str(item["path"]), value.encode(), int(item.get("mode") or mode))

    def _request_token(self, token: TokenFile) -> None:
        meta = self.pod["metadata"]
        spec: JSON = {
            "expirationSeconds": token.expiration_seconds,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]},
        }
        if token.audience:
            spec["audiences"] = [token.audience]
        path = f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{token.service_account}/token"
        answer = self.kube.request("POST", path, {"apiVersion": "authentication.k8s.io/v1", "spec": spec})
        _write_file(token.path, str(answer["status"]["token"]).encode(), DEFAULT_MODE)
        # Refresh at 80% of the lifetime (capped at 24h), as the kubelet does.
        lifetime = min(float(token.expiration_seconds), MAX_TOKEN_AGE)
        token.refresh_at = time.time() + 0.8 * lifetime

    def refresh_tokens(self) -> None:
        for token in self.tokens:
            if time.time() >= token.refresh_at:
                token.refresh_at = time.time() + TOKEN_RETRY_SECONDS  # if this attempt fails
                self._request_token(token)

    def _write_projected(self, target: Path, volume: JSON) -> None:
        mode = int(volume.get("defaultMode") or DEFAULT_MODE)
        for source in volume.get("sources") or []:
            if "serviceAccountToken" in source:
                sat = source["serviceAccountToken"]
                token = TokenFile(
                    path=target / str(sat["path"]),
                    service_account=str(self.pod["spec"].get("serviceAccountName") or "default"),
                    audience=sat.get("audience") or None,
                    expiration_seconds=int(sat.get("expirationSeconds") or 3600),
                )
                self._request_token(token)
                self.tokens.append(token)
            elif "configMap" in source:
                self._write_source(target, source["configMap"], mode, "configmap")
            elif "secret" in source:
                self._write_source(target, source["secret"], mode, "secret")
            elif "downwardAPI" in source:
                self._write_downward(target, source["downwardAPI"].get("items") or [], mode)
            else:
                raise NotReadyError("FailedMount", f"unsupported projected source {sorted(source)}")

    def write_volumes(self, root: Path) -> dict[str, tuple[Path, bool]]:
        """Write every volume under ``root``: name → (host path, always read-only)."""
        self.tokens = []
        volumes: dict[str, tuple[Path, bool]] = {}
        for volume in self.pod["spec"].get("volumes") or []:
            name = str(volume["name"])
            target = root / name
            target.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in volume:
                volumes[name] = (target, False)
                continue
            if "hostPath" in volume:
                host = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    host.mkdir(parents=True, exist_ok=True)
                if not host.exists():
                    raise NotReadyError("FailedMount", f"hostPath {host} does not exist")
                volumes[name] = (host, False)
                continue
            if "configMap" in volume:
                mode = int(volume["configMap"].get("defaultMode") or DEFAULT_MODE)
                self._write_source(target, volume["configMap"], mode, "configmap")
            elif "secret" in volume:
                mode = int(volume["secret"].get("defaultMode") or DEFAULT_MODE)
                self._write_source(target, volume["secret"], mode, "secret")
            elif "projected" in volume:
                self._write_projected(target, volume["projected"])
            elif "downwardAPI" in volume:
                mode = int(volume["downwardAPI"].get("defaultMode") or DEFAULT_MODE)
                self._write_downward(target, volume["downwardAPI"].get("items") or [], mode)
            else:
                kinds = sorted(k for k in volume if k != "name")
                raise NotReadyError("FailedMount", f"volume {name!r}: unsupported volume type {kinds}")
            volumes[name] = (target, True)
        return volumes

    # -- env -----------------------------------------------------------------------
    def _value_from(self, source: JSON, container: JSON) -> str | None:
        for kind, ref_key in (("configMapKeyRef", "configmap"), ("secretKeyRef", "secret")):
            if kind in source:
                ref = source[kind]
                optional = bool(ref.get("optional"))
                data = self._object_data(ref_key, str(ref.get("name", "")), optional)
                key = str(ref["key"])
                if data is None or key not in data:
                    if optional:
                        return None
                    raise NotReadyError(
                        "CreateContainerConfigError",
                        f"couldn't find key {key} in {ref_key.replace('map', 'Map')} "
                        f"{self.namespace}/{ref.get('name')}",
                    )
                return data[key].decode(errors="replace")
        if "fieldRef" in source:
            return self.field_value(str(source["fieldRef"]["fieldPath"]))
        if "resourceFieldRef" in source:
            return self.resource_value(source["resourceFieldRef"], str(container["name"]))
        raise NotReadyError("CreateContainerConfigError", f"unsupported valueFrom {sorted(source)}")

    def container_env(self, container: JSON, base: dict[str, str]) -> dict[str, str]:
        """The process environment: ``base`` (image env etc.), then envFrom, then env."""
        env = dict(base)
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(self.apiserver_port)
        env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(self.apiserver_port)
        env["KUBERNETES_PORT"] = f"tcp://127.0.0.1:{self.apiserver_port}"
        for source in container.get("envFrom") or []:
            prefix = str(source.get("prefix") or "")
            for kind, ref_key in (("configMapRef", "configmap"), ("secretRef", "secret")):
                if kind in source:
                    ref = source[kind]
                    data = self._object_data(ref_key, str(ref.get("name", "")), bool(ref.get("optional")))
                    for key, raw in (data or {}).items():
                        env[prefix + key] = raw.decode(errors="replace")
        for var in container.get("env") or []:
            name = str(var["name"])
            if "valueFrom" in var:
                value = self._value_from(var["valueFrom"], container)
                if value is not None:
                    env[name] = value
            else:
                env[name] = expand(str(var.get("value") or ""), env)
        return env
