"""``Client``: submit, get and list FineTuneJobs with the API's own typed models.

A spec passes through :class:`kubetune_api.FineTuneJobSpec` before it is sent, so a notebook
user gets the CRD's validation (its CEL rules have Python twins) and defaults, with the same
messages, before anything reaches the cluster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune_api import coordinates
from kubetune_api.base import field_errors
from kubetune_api.resource import FineTuneJob, ObjectMeta
from kubetune_api.spec import FineTuneJobSpec

from .errors import InvalidSpecError
from .job import Job
from .kube import Kube
from .storage import StorageOptions

Submittable = FineTuneJobSpec | FineTuneJob | Mapping[str, Any]


def _invalid(exc: ValidationError, prefix: str) -> InvalidSpecError:
    lines = [f"{prefix}{line}" for line in field_errors(exc)]
    return InvalidSpecError("invalid FineTuneJob:\n  " + "\n  ".join(lines))


def to_resource(what: Submittable) -> FineTuneJob:
    """A spec, a FineTuneJob or a manifest dict (a whole FineTuneJob, or just its spec), validated."""
    if isinstance(what, FineTuneJob):
        return what
    if isinstance(what, FineTuneJobSpec):
        return FineTuneJob(spec=what)
    body = dict(what)
    try:
        if "spec" in body or "kind" in body or "apiVersion" in body:
            return FineTuneJob.model_validate({k: v for k, v in body.items() if k != "status"})
        return FineTuneJob(spec=FineTuneJobSpec.model_validate(body))
    except ValidationError as exc:
        raise _invalid(exc, "" if "spec" in body else "spec.") from exc


def load_manifest(path: str | os.PathLike[str]) -> FineTuneJob:
    """A FineTuneJob manifest file (YAML or JSON), validated with the API models."""
    file = Path(path)
    try:
        loaded = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidSpecError(f"cannot read the manifest {file}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise InvalidSpecError(
            f"{file} holds no FineTuneJob (one YAML document with kind {coordinates.KIND})"
        )
    if loaded.get("kind", coordinates.KIND) != coordinates.KIND:
        raise InvalidSpecError(f"{file} holds a {loaded.get('kind')}, not a {coordinates.KIND}")
    try:
        return to_resource(loaded)
    except InvalidSpecError as exc:
        raise InvalidSpecError(f"{file}: {exc}") from exc


class Client:
    """FineTuneJobs in one cluster, through a kubeconfig (or the pod's ServiceAccount).

    ``kubeconfig``: a path (default ``$KUBECONFIG``, then ``~/.kube/config``); ``context``: a
    context in it (default its current one); ``namespace``: default namespace of every call (default
    the context's namespace, else ``default``). ``s3_endpoint`` and ``aws_profile`` say how this
    machine reaches the jobs' object storage (:class:`~kubetune_client.storage.StorageOptions`).
    """

    def __init__(
        self,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        namespace: str | None = None,
        *,
        s3_endpoint: str | None = None,
        aws_profile: str | None = None,
    ) -> None:
        self.kube = Kube.connect(kubeconfig, context, namespace)
        self.storage_options = StorageOptions(endpoint=s3_endpoint, profile=aws_profile)

    @property
    def namespace(self) -> str:
        return self.kube.namespace

    def _job(self, obj: dict[str, Any]) -> Job:
        return Job(self.kube, obj, self.storage_options)

    def submit(
        self,
        spec_or_manifest: Submittable,
        name: str | None = None,
        *,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> Job:
        """Create a FineTuneJob from a :class:`FineTuneJobSpec`, a :class:`FineTuneJob` or a manifest
        dict; ``name`` (and ``namespace``) override the manifest's. ``dry_run``: the API server
        validates it (schema and CEL) and stores nothing."""
        resource = to_resource(spec_or_manifest)
        meta = resource.metadata.model_dump(exclude_none=True)
        meta.update(
            name=name or resource.metadata.name,
            namespace=namespace or resource.metadata.namespace or self.namespace,
        )
        if labels:
            meta["labels"] = {**(meta.get("labels") or {}), **labels}
        if not meta["name"]:
            raise InvalidSpecError("a FineTuneJob needs a name: pass name=... (or metadata.name)")
        try:
            resource = resource.model_copy(update={"metadata": ObjectMeta.model_validate(meta)})
            FineTuneJob.model_validate(resource.model_dump(by_alias=True))  # the name rules
        except ValidationError as exc:
            raise _invalid(exc, "") from exc
        body = resource.model_dump(by_alias=True, exclude_none=True, mode="json")
        created = self.kube.create(body, meta["namespace"], dry_run=dry_run)
        return self._job(created)

    def get(self, name: str, namespace: str | None = None) -> Job:
        """One FineTuneJob (:class:`~kubetune_client.errors.NotFoundError` if there is none)."""
        return self._job(self.kube.get(namespace or self.namespace, name))

    def list(self, namespace: str | None = None, all_namespaces: bool = False) -> list[Job]:
        """The FineTuneJobs in ``namespace`` (or in every namespace), oldest first."""
        items = self.kube.list_jobs(None if all_namespaces else namespace or self.namespace)
        items.sort(key=lambda o: (str(o["metadata"].get("creationTimestamp", "")), o["metadata"]["name"]))
        return [self._job(obj) for obj in items]
