"""Fixtures for the operator tests: the CRD, FineTuneJob bodies, and (for API-server tests) the
CRD installed in the session's control plane and the operator running in-process with kopf."""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import coordinates
from kubetune_api.crd import CRD_FILE
from kubetune_localenv.stack import wait_for as _wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / CRD_FILE
EXAMPLE_PATH = REPO_ROOT / "examples" / "finetunejob.yaml"
TRAINER_IMAGE = "registry.example/kubetune/trainer:test"

Obj = dict[str, Any]
MakeFtj = Callable[..., Obj]


def load_crd() -> Obj:
    crd: Obj = yaml.safe_load(CRD_PATH.read_text())
    return crd


def openapi_schema(crd: Mapping[str, Any]) -> Obj:
    schema: Obj = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Structural-schema defaulting as the API server does it (defaults inside defaults too)."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in (schema.get("properties") or {}):
                    value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def minimal_spec() -> Obj:
    return {
        "model": {"source": "s3://models/tiny-llama"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://results/run-1"},
        "resources": {"gpus": 0},
    }


@pytest.fixture(scope="session")
def crd() -> Obj:
    return load_crd()


@pytest.fixture
def make_ftj(crd: Obj) -> MakeFtj:
    """``make_ftj(name=..., **spec_overrides)``: a FineTuneJob body as the API server returns it."""

    def make(name: str = "demo", namespace: str = "team-a", **spec: Any) -> Obj:
        body: Obj = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": "0b1c2d3e-0000-4000-8000-" + secrets.token_hex(6),
                "generation": 1,
            },
            "spec": {**minimal_spec(), **spec},
        }
        result: Obj = apply_defaults(openapi_schema(crd), body)
        return result

    return make


# --- API-server fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def crd_installed(local_env: Any) -> Obj:
    """The CRD applied to the session's API server and Established."""
    local_env.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_PATH))
    local_env.wait_established(coordinates.CRD_NAME)
    return load_crd()


@pytest.fixture(scope="session")
def kube(local_env: Any) -> Any:
    from kubetune_operator.kube import Kube

    return Kube.connect(local_env.kubeconfig)


@pytest.fixture
def operator_env(local_env: Any, namespace: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment the in-process operator reads (scoped to the test's namespace)."""
    env = {
        "KUBECONFIG": str(local_env.kubeconfig),
        "KUBETUNE_NAMESPACES": namespace,
        "KUBETUNE_TRAINER_IMAGE": TRAINER_IMAGE,
        "KUBETUNE_METRICS_PORT": "0",
        "KUBETUNE_HEALTH_PORT": "0",
        "KUBETUNE_PEERING": "",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def run_operator(operator_env: dict[str, str], namespace: str, crd_installed: Obj) -> Callable[[], Any]:
    """``with run_operator(): ...`` runs the operator (kopf, in this process) for the block."""
    from kopf.testing import KopfRunner

    def start() -> Any:
        args = ["run", "--standalone", "--namespace", namespace, "-m", "kubetune_operator.handlers"]
        return KopfRunner(args, timeout=30)

    return start


@pytest.fixture
def operator(run_operator: Callable[[], Any]) -> Iterator[Any]:
    """The operator, running for the whole test."""
    with run_operator() as runner:
        yield runner


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """``wait_for(what, probe, timeout=30)``: poll until ``probe()`` is truthy, else fail naming ``what``."""
    return _wait_for


class FakeKubelet:
    """Plays the kubelet (and the scheduler) for trainer pods: there is no node in these tests.

    Pod status is written through the API exactly as a kubelet would write it.
    """

    def __init__(self, kube: Any, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace

    def pods(self, ftj_name: str) -> list[Obj]:
        from kubetune_operator.kube import PODS

        items: list[Obj] = self.kube.list(PODS, self.namespace, f"kubetune.dev/finetunejob={ftj_name}")
        return sorted(items, key=lambda p: p["metadata"]["creationTimestamp"])

    def wait_pod(self, ftj_name: str, timeout: float = 30.0) -> Obj:
        """The newest trainer pod that has not finished yet (the Job controller creates it)."""

        def live() -> Obj | None:
            pods = [
                p
                for p in self.pods(ftj_name)
                if p.get("status", {}).get("phase") in (None, "Pending", "Running")
                and not p["metadata"].get("deletionTimestamp")
            ]
            return pods[-1] if pods else None

        pod: Obj = _wait_for(f"a trainer pod of {ftj_name}", live, timeout)
        return pod

    def _set(self, pod: Mapping[str, Any], phase: str, state: Obj, ready: bool = False) -> Obj:
        from kubetune_operator.kube import PODS

        container = {
            "name": "trainer",
            "image": pod["spec"]["containers"][0]["image"],
            "imageID": "",
            "ready": ready,
            "restartCount": 0,
            "started": "running" in state,
            "state": state,
        }
        patch = {"status": {"phase": phase, "containerStatuses": [container]}}
        result: Obj = self.kube.patch(PODS, self.namespace, pod["metadata"]["name"], patch, "status")
        return result

    @staticmethod
    def now() -> str:
        import datetime

        return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def waiting(self, pod: Mapping[str, Any], reason: str, message: str) -> Obj:
        return self._set(pod, "Pending", {"waiting": {"reason": reason, "message": message}})

    def run(self, pod: Mapping[str, Any]) -> Obj:
        return self._set(pod, "Running", {"running": {"startedAt": self.now()}}, ready=True)

    def terminate(
        self, pod: Mapping[str, Any], exit_code: int, reason: str = "Error", message: str = ""
    ) -> Obj:
        now = self.now()
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": now, "finishedAt": now}
        if message:
            terminated["message"] = message
        phase = "Succeeded" if exit_code == 0 else "Failed"
        return self._set(pod, phase, {"terminated": terminated})


@pytest.fixture
def kubelet(kube: Any, namespace: str) -> FakeKubelet:
    return FakeKubelet(kube, namespace)


@pytest.fixture
def create_ftj(kube: Any, namespace: str, crd_installed: Obj) -> Callable[..., Obj]:
    """``create_ftj(name, **spec_overrides)``: create a FineTuneJob through the API; returns it."""

    def create(name: str = "demo", **spec: Any) -> Obj:
        body = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {**minimal_spec(), **spec},
        }
        created: Obj = kube.create(body)
        return created

    return create


class Harness:
    """What an operator test needs, in one fixture: client, namespace, fake kubelet, helpers."""

    def __init__(
        self, local_env: Any, kube: Any, namespace: str, kubelet: FakeKubelet, create: Callable[..., Obj]
    ) -> None:
        self.local_env = local_env
        self.kube = kube
        self.namespace = namespace
        self.kubelet = kubelet
        self.create = create
        self.wait_for = _wait_for

    def get(self, resource: Any, name: str) -> Obj | None:
        result: Obj | None = self.kube.get(resource, self.namespace, name)
        return result

    def status(self, name: str) -> Obj:
        from kubetune_operator.kube import FINETUNEJOBS

        ftj = self.get(FINETUNEJOBS, name)
        assert ftj is not None, f"FineTuneJob {name} is gone"
        status: Obj = ftj.get("status") or {}
        return status

    def patch_ftj(self, name: str, patch: Obj, subresource: str | None = None) -> None:
        from kubetune_operator.kube import FINETUNEJOBS

        self.kube.patch(FINETUNEJOBS, self.namespace, name, patch, subresource)

    def wait_phase(self, name: str, phase: str, reason: str | None = None, timeout: float = 30.0) -> Obj:
        def probe() -> Obj | None:
            status = self.status(name)
            if status.get("phase") == phase and reason in (None, status.get("reason")):
                return status
            return None

        what = f"{name} to reach {phase}" + (f"/{reason}" if reason else "")
        result: Obj = _wait_for(what, probe, timeout)
        return result

    def events(self, name: str) -> list[Obj]:
        from kubetune_operator.kube import Resource

        events: list[Obj] = self.kube.list(Resource("v1", "events"), self.namespace)
        return [
            e
            for e in events
            if e["involvedObject"].get("kind") == "FineTuneJob" and e["involvedObject"]["name"] == name
        ]


@pytest.fixture
def harness(
    local_env: Any, kube: Any, namespace: str, kubelet: FakeKubelet, create_ftj: Callable[..., Obj]
) -> Harness:
    return Harness(local_env, kube, namespace, kubelet, create_ftj)
