"""Operator configuration: environment variables -> :class:`OperatorConfig` -> hardened kopf settings."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf

from kubetune_api import sweep as sweep_api
from kubetune_api.coordinates import GROUP
from kubetune_api.spec import IMAGE_PATTERN

from . import names

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
#: kopf's persistence keys live under this prefix (annotations only: no status.kopf field).
ANNOTATIONS_PREFIX = GROUP
#: Peering priorities are drawn at random from this range, so that two replicas never tie
#: (kopf pauses every operator when priorities tie).
PRIORITY_RANGE = (1, 2**31 - 1)
#: Threads that run syncs (each one request at a time): kopf's pool for the sweep handlers, the
#: operator's own for the FineTuneJob handlers, and the API client's connection pool size.
SYNC_WORKERS = 16


class ConfigError(ValueError):
    """An environment variable holds an unusable value; the message names it."""


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator reads from its environment."""

    namespaces: tuple[str, ...] = ()
    """KUBETUNE_NAMESPACES: comma-separated namespaces to serve; empty means all namespaces."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """KUBETUNE_TRAINER_IMAGE: image for FineTuneJobs that set no spec.image."""

    metrics_port: int = 8080
    """KUBETUNE_METRICS_PORT: Prometheus /metrics port; 0 disables the endpoint."""

    health_port: int = 8081
    """KUBETUNE_HEALTH_PORT: kopf's liveness endpoint (/healthz); 0 disables it."""

    peering: str = ""
    """KUBETUNE_PEERING: kopf peering object name; empty runs standalone (a single replica)."""

    priority: int | None = None
    """KUBETUNE_PEERING_PRIORITY: this replica's peering priority; unset draws a random one."""

    trainer_egress: Mapping[str, tuple[dict[str, Any], ...]] | None = None
    """KUBETUNE_TRAINER_EGRESS: JSON object of NetworkPolicy egress rules by group (dns, apiServer,
    objectStore, hub); set, every trainer pod gets a NetworkPolicy allowing only those."""

    bind_address: str = "0.0.0.0"  # noqa: S104 - the endpoints must be reachable by the kubelet and Prometheus
    """KUBETUNE_BIND_ADDRESS: address the metrics and health endpoints listen on."""

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def liveness_endpoint(self) -> str | None:
        if not self.health_port:
            return None
        return f"http://{self.bind_address}:{self.health_port}/healthz"


def _port(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a port number, not {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ConfigError(f"{key} must be between 0 and 65535, not {value}")
    return value


def _egress(env: Mapping[str, str]) -> Mapping[str, tuple[dict[str, Any], ...]] | None:
    raw = env.get("KUBETUNE_TRAINER_EGRESS", "").strip()
    if not raw:
        return None
    key = "KUBETUNE_TRAINER_EGRESS"
    groups = (*names.EGRESS_ALWAYS, names.EGRESS_HUB)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key} must be a JSON object: {err.msg} at column {err.colno}") from None
    if not isinstance(value, dict) or set(value) - set(groups):
        raise ConfigError(f"{key} must be a JSON object with the keys {', '.join(groups)} (each optional)")
    out: dict[str, tuple[dict[str, Any], ...]] = {}
    for group, rules in value.items():
        if not isinstance(rules, list) or not all(isinstance(rule, dict) for rule in rules):
            raise ConfigError(f"{key}.{group} must be a list of NetworkPolicy egress rules ({{to, ports}})")
        out[group] = tuple(rules)
    return out


def from_env(env: Mapping[str, str] | None = None) -> OperatorConfig:
    """Read the KUBETUNE_* variables (``os.environ`` by default)."""
    env = os.environ if env is None else env
    namespaces = tuple(ns.strip() for ns in env.get("KUBETUNE_NAMESPACES", "").split(",") if ns.strip())
    priority_raw = env.get("KUBETUNE_PEERING_PRIORITY", "").strip()
    try:
        priority = int(priority_raw) if priority_raw else None
    except ValueError:
        raise ConfigError(f"KUBETUNE_PEERING_PRIORITY must be an integer, not {priority_raw!r}") from None
    trainer_image = env.get("KUBETUNE_TRAINER_IMAGE", "").strip() or DEFAULT_TRAINER_IMAGE
    if not re.fullmatch(IMAGE_PATTERN, trainer_image):
        raise ConfigError(
            f"KUBETUNE_TRAINER_IMAGE must be an image reference (repository:tag or repository@sha256:...), "
            f"not {trainer_image!r}"
        )
    return OperatorConfig(
        namespaces=namespaces,
        trainer_image=trainer_image,
        metrics_port=_port(env, "KUBETUNE_METRICS_PORT", 8080),
        health_port=_port(env, "KUBETUNE_HEALTH_PORT", 8081),
        peering=env.get("KUBETUNE_PEERING", "").strip(),
        priority=priority,
        bind_address=env.get("KUBETUNE_BIND_ADDRESS", "").strip() or "0.0.0.0",  # noqa: S104
        trainer_egress=_egress(env),
    )


class SweepDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's last-handled-configuration, for FineTuneSweeps only.

    kopf builds every watched object's essence (a deep copy of its whole body) on every event, to
    diff it for the create and update handlers; only FineTuneSweeps have those. FineTuneJob, Job
    and Pod events are most of the events, and a Pod's body is the largest: for them the copy was
    work done for nothing, the largest per-event cost in the scale benchmark's profile.
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None
    ) -> kopf.BodyEssence:
        if body.get("kind") != sweep_api.KIND:
            return cast(kopf.BodyEssence, {})
        return super().build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        if body.get("kind") != sweep_api.KIND:
            return None
        return super().fetch(body=body)


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Harden kopf for a long-running in-cluster operator."""
    # Watches: ask the API server to end each stream after 5 minutes and give up on a silent
    # connection shortly after, so a half-dead TCP connection never leaves the operator blind.
    # Every re-list re-delivers every object: a periodic, level-based resync for free.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    # Only the operator's own Jobs and Pods, filtered by the API server (not in the operator).
    settings.watching.label_selectors["batch", "jobs"] = names.CHILD_SELECTOR
    settings.watching.label_selectors["v1", "pods"] = names.CHILD_SELECTOR
    # Handler state in annotations only: no "status.kopf" stanza in the FineTuneJob,
    # and no finalizers (no deletion handlers): deletion never waits for the operator.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATIONS_PREFIX)
    settings.persistence.diffbase_storage = SweepDiffBaseStorage(
        prefix=ANNOTATIONS_PREFIX, key="last-handled-configuration"
    )
    # Only kopf's warnings and errors (e.g. a failing handler) become Events; its INFO chatter
    # ("Handler ... succeeded") stays in the log. Phase transitions are posted by the handlers.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "kubetune-operator"
    # Events are posted by as many workers as there are sync threads, not one per object at once:
    # a burst of new FineTuneJobs would otherwise open a TLS connection per Event (kopf's client
    # has no connection limit), each with its own 256 KiB buffer kept while it idles.
    settings.posting.worker_limit = SYNC_WORKERS
    settings.execution.max_workers = SYNC_WORKERS
    settings.queueing.error_delays = (1, 2, 5, 10, 20, 30, 60)
    # Two replicas: peering pauses all but the highest-priority live one.
    # A configured peering is mandatory: without its object the operator fails instead of
    # silently running beside another replica.
    settings.peering.standalone = not config.peering
    settings.peering.mandatory = bool(config.peering)
    if config.peering:
        settings.peering.name = config.peering
    priority = config.priority
    if priority is None:
        priority = random.randint(*PRIORITY_RANGE)  # noqa: S311 - a tie-breaker, not a secret
    settings.peering.priority = priority
    settings.peering.stealth = True  # no log line per keep-alive


def kopf_run_kwargs(config: OperatorConfig) -> dict[str, Any]:
    """Keyword arguments for :func:`kopf.run` that follow the config."""
    return {
        "clusterwide": config.clusterwide,
        "namespaces": list(config.namespaces),
        "liveness_endpoint": config.liveness_endpoint,
        "standalone": not config.peering,
        "peering_name": config.peering or None,
        "priority": config.priority,
    }
