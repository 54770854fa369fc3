"""A FineTuneSweep as the SDK hands it out: its last read state, its trials, and waiting for it.

The status is parsed with the API's own model (:class:`kubetune_api.sweep.FineTuneSweepStatus`),
so the CLI shows exactly the fields the operator writes and fails loudly on ones it does not know.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from pydantic import ValidationError

from kubetune_api import coordinates
from kubetune_api.base import field_errors
from kubetune_api.sweep import (
    KIND,
    FineTuneSweep,
    FineTuneSweepStatus,
    InvalidParametersError,
    TrialStatus,
    check_search_space,
)
from kubetune_api.sweep_reasons import TERMINAL_SWEEP_PHASES, SweepPhase

from .errors import InvalidSpecError, KubetuneError, WaitTimeoutError
from .kube import Kube, Obj

#: Seconds between two reads while following a sweep (its status changes once per trial event).
POLL_S = 2.0


def parse_sweep(obj: Obj) -> FineTuneSweep:
    """A FineTuneSweep as the API server returns it, as the typed API model."""
    try:
        return FineTuneSweep.model_validate(obj)
    except ValidationError as exc:
        name = obj.get("metadata", {}).get("name")
        raise KubetuneError(
            f"{KIND} {name} does not parse with this client's API types: " + "; ".join(field_errors(exc))
        ) from exc


def load_sweep_manifest(path: Path) -> FineTuneSweep:
    """A FineTuneSweep manifest, validated with the API models and its search space applied to the
    template (the checks the operator makes and CEL cannot), so a bad one fails here, not later."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidSpecError(f"cannot read the manifest {path}: {exc}") from exc
    if not isinstance(loaded, dict) or loaded.get("kind") != KIND:
        raise InvalidSpecError(f"{path} holds no {KIND} (one YAML document with kind {KIND})")
    try:
        sweep = FineTuneSweep.model_validate({k: v for k, v in loaded.items() if k != "status"})
        check_search_space(sweep.spec)
    except ValidationError as exc:
        raise InvalidSpecError(f"invalid {KIND}:\n  " + "\n  ".join(field_errors(exc))) from exc
    except InvalidParametersError as exc:
        raise InvalidSpecError(f"invalid {KIND}: {exc}") from exc
    return sweep


class Sweep:
    """One FineTuneSweep: its last read state; ``refresh`` reads it again."""

    def __init__(self, kube: Kube, obj: Obj) -> None:
        self._kube = kube
        self._set(obj)

    def _set(self, obj: Obj) -> None:
        self.raw: Obj = obj
        self.resource = parse_sweep(obj)

    @property
    def name(self) -> str:
        return str(self.raw["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.raw["metadata"]["namespace"])

    @property
    def status(self) -> FineTuneSweepStatus:
        return self.resource.status or FineTuneSweepStatus()

    @property
    def trials(self) -> tuple[TrialStatus, ...]:
        return self.status.trials or ()

    @property
    def done(self) -> bool:
        return self.status.phase in TERMINAL_SWEEP_PHASES

    @property
    def failed(self) -> bool:
        return self.status.phase == SweepPhase.FAILED

    def refresh(self) -> Sweep:
        self._set(self._kube.get_sweep(self.namespace, self.name))
        return self

    def updates(self, timeout: float | None, poll_s: float = POLL_S) -> Iterator[Sweep]:
        """This sweep after each read until it ends (polled: a sweep changes about once per trial
        event, and polling needs no watch bookkeeping); raises WaitTimeoutError after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        yield self
        while not self.done:
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"{KIND} {self.name} did not end within {timeout:.0f}s (phase {self.status.phase})"
                )
            time.sleep(poll_s)
            yield self.refresh()


def submit_sweep(kube: Kube, sweep: FineTuneSweep, namespace: str | None, dry_run: bool = False) -> Sweep:
    """Create ``sweep`` (in ``namespace``, else its own, else the client's default)."""
    body: Obj = sweep.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["apiVersion"] = coordinates.API_VERSION
    target = namespace or body["metadata"].get("namespace") or kube.namespace
    body["metadata"]["namespace"] = target
    if not body["metadata"].get("name"):
        raise InvalidSpecError(f"the {KIND} needs metadata.name (or --name)")
    return Sweep(kube, kube.create_sweep(body, target, dry_run=dry_run))
