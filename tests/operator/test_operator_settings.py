"""Operator configuration from the environment, and the kopf settings it produces."""

from __future__ import annotations

from typing import cast

import kopf
import pytest

from kubetune_operator import names
from kubetune_operator.settings import (
    DEFAULT_TRAINER_IMAGE,
    ConfigError,
    OperatorConfig,
    SweepDiffBaseStorage,
    configure,
    from_env,
    kopf_run_kwargs,
)


def test_defaults_serve_all_namespaces_standalone() -> None:
    config = from_env({})
    assert config == OperatorConfig()
    assert config.clusterwide
    assert config.trainer_image == DEFAULT_TRAINER_IMAGE
    assert (config.metrics_port, config.health_port) == (8080, 8081)
    assert kopf_run_kwargs(config) == {
        "clusterwide": True,
        "namespaces": [],
        "liveness_endpoint": "http://0.0.0.0:8081/healthz",
        "standalone": True,
        "peering_name": None,
        "priority": None,
    }


def test_environment_is_read() -> None:
    config = from_env(
        {
            "KUBETUNE_NAMESPACES": " ml, research ,,",
            "KUBETUNE_TRAINER_IMAGE": "registry.example/trainer:2",
            "KUBETUNE_METRICS_PORT": "9090",
            "KUBETUNE_HEALTH_PORT": "0",
            "KUBETUNE_PEERING": "kubetune",
            "KUBETUNE_PEERING_PRIORITY": "100",
        }
    )
    assert config.namespaces == ("ml", "research")
    assert not config.clusterwide
    assert config.trainer_image == "registry.example/trainer:2"
    assert config.metrics_port == 9090
    assert config.liveness_endpoint is None
    kwargs = kopf_run_kwargs(config)
    assert (kwargs["standalone"], kwargs["peering_name"], kwargs["priority"]) == (False, "kubetune", 100)
    assert kwargs["namespaces"] == ["ml", "research"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KUBETUNE_METRICS_PORT": "http"}, "KUBETUNE_METRICS_PORT"),
        ({"KUBETUNE_HEALTH_PORT": "70000"}, "KUBETUNE_HEALTH_PORT"),
        ({"KUBETUNE_PEERING_PRIORITY": "high"}, "KUBETUNE_PEERING_PRIORITY"),
        ({"KUBETUNE_TRAINER_IMAGE": "ghcr.io/kubetune/trainer:0.1 0"}, "KUBETUNE_TRAINER_IMAGE"),
        ({"KUBETUNE_TRAINER_IMAGE": "https://ghcr.io/kubetune/trainer:0.1.0"}, "KUBETUNE_TRAINER_IMAGE"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        from_env(env)


def test_hardened_kopf_settings() -> None:
    settings = kopf.OperatorSettings()
    configure(settings, OperatorConfig(peering="kubetune", priority=7))

    # Hardened: kopf's watches default to no server/client timeout (a silently dead watch).
    watching = settings.watching
    assert (watching.server_timeout, watching.client_timeout, watching.connect_timeout) == (300, 330, 10)
    assert (settings.networking.request_timeout, settings.networking.connect_timeout) == (30, 10)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, SweepDiffBaseStorage)
    assert set(settings.watching.label_selectors.values()) == {names.CHILD_SELECTOR}
    assert (settings.peering.name, settings.peering.priority) == ("kubetune", 7)
    assert settings.peering.mandatory
    assert not settings.peering.standalone


def test_replicas_draw_distinct_priorities() -> None:
    """kopf pauses every replica when priorities tie, so unset priorities are drawn at random."""
    priorities = set()
    for _ in range(20):
        settings = kopf.OperatorSettings()
        configure(settings, OperatorConfig(peering="kubetune"))
        priorities.add(settings.peering.priority)
    assert len(priorities) > 1


def test_kopf_copies_only_sweeps_for_their_change_handlers() -> None:
    """kopf builds an essence of every event's body for create/update handlers: FineTuneSweeps only."""
    storage = SweepDiffBaseStorage(prefix="kubetune.dev", key="last-handled-configuration")
    stored = '{"spec": {"maxTrials": 2}}'
    meta = {"name": "x", "annotations": {"kubetune.dev/last-handled-configuration": stored}}
    for kind in ("FineTuneJob", "Job", "Pod"):
        body = kopf.Body(cast(kopf.RawBody, {"kind": kind, "metadata": meta, "spec": {"a": 1}}))
        assert storage.build(body=body) == {}
        assert storage.fetch(body=body) is None
    sweep = kopf.Body(
        cast(kopf.RawBody, {"kind": "FineTuneSweep", "metadata": meta, "spec": {"maxTrials": 3}})
    )
    assert storage.build(body=sweep)["spec"] == {"maxTrials": 3}
    assert storage.fetch(body=sweep) == {"spec": {"maxTrials": 2}}
