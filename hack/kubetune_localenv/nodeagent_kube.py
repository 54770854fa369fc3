"""A minimal JSON client for the Kubernetes API, used by the node agent.

The agent works on plain JSON objects (camelCase, exactly as ``kubectl get -o json``
shows them) rather than on the generated client's models: it reads and writes
small parts of many object kinds, and plain dicts keep that code short and close
to the API reference.  The kubeconfig is read by ``kubernetes.config`` (so every
kubeconfig form works); requests go through one thread-safe urllib3 pool.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.status = status
        try:
            details: JSON = json.loads(body)
            self.reason = str(details.get("reason", ""))
            message = str(details.get("message", body))
        except ValueError:
            self.reason = ""
            message = body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


class Kube:
    """Authenticated JSON requests against the API server named in a kubeconfig."""

    def __init__(self, kubeconfig: Path, timeout: float = 30.0) -> None:
        cfg = k8s_client.Configuration()
        # (the loader is untyped; the alias keeps mypy --strict quiet whether or not it follows it)
        load_kube_config: Callable[..., None] = k8s_config.load_kube_config
        load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        self.server = str(cfg.host).rstrip("/")
        self.timeout = timeout
        self._headers: dict[str, str] = {}
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if token:
            self._headers["Authorization"] = str(token)
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=8,
            cert_reqs="CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE",
            ca_certs=cfg.ssl_ca_cert,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
        )

    @property
    def port(self) -> int:
        parsed = urllib.parse.urlsplit(self.server)
        return parsed.port or (443 if parsed.scheme == "https" else 80)

    def _url(self, path: str, params: dict[str, str] | None) -> str:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"{self.server}{path}{query}"

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> JSON:
        headers = {**self._headers, "Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        resp = self._pool.request(
            method,
            self._url(path, params),
            body=data,
            headers=headers,
            timeout=timeout or self.timeout,
            retries=False,
        )
        text = resp.data.decode(errors="replace")
        if resp.status >= 300:
            raise ApiError(method, path, resp.status, text)
        result: JSON = json.loads(text) if text else {}
        return result

    def get(self, path: str, params: dict[str, str] | None = None) -> JSON:
        return self.request("GET", path, params=params)

    def watch(self, path: str, params: dict[str, str], timeout_seconds: int) -> Iterator[JSON]:
        """Yield watch events until the server closes the stream (after ``timeout_seconds``)."""
        query = {**params, "watch": "true", "timeoutSeconds": str(timeout_seconds)}
        resp = self._pool.request(
            "GET",
            self._url(path, query),
            headers={**self._headers, "Accept": "application/json"},
            timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 15),
            preload_content=False,
            retries=False,
        )
        try:
            if resp.status >= 300:
                raise ApiError("WATCH", path, resp.status, resp.data.decode(errors="replace"))
            for line in resp:
                if line.strip():
                    event: JSON = json.loads(line)
                    yield event
        finally:
            resp.release_conn()
