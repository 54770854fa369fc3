"""The operator, laid out as the operator image lays it out, runs with the chart's RBAC.

Outside `make test-images` (tests/images runs the built image), this test reproduces its two
layers from the Dockerfile itself: the virtualenv from the Dockerfile's own ``uv export`` and
``uv pip sync`` lines (only the locked ``operator`` extra, from uv's cache), and the COPY'd
packages with the ENV's PYTHONPATH. It then installs the chart (namespace-scoped mode), logs in
with a token of the chart's ServiceAccount, and starts the ENTRYPOINT (``python -m
kubetune_operator``) with exactly the environment the chart's Deployment carries. The operator
must pass both probes the chart declares and reconcile a FineTuneJob (ConfigMap, ServiceAccount,
Role, RoleBinding, Job) with no permission error: the chart's RBAC is enough for the real
operator, and its probes point at real endpoints.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_localenv.cluster import pick_port

from .conftest import CHART_DIR, REPO_ROOT, Helm, Kubectl, dockerfile_instructions

pytestmark = pytest.mark.cluster

DOCKERFILE = REPO_ROOT / "Dockerfile"
EXAMPLE_FTJ = REPO_ROOT / "examples" / "argocd" / "finetunejobs" / "alpaca-qlora.yaml"


def env_pairs(arguments: str) -> dict[str, str]:
    """KEY=VALUE pairs of one ENV instruction."""
    return dict(pair.split("=", 1) for pair in arguments.split())


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], list[str]]:
    """A directory laid out like the operator image; returns (root, its ENV, its ENTRYPOINT)."""
    uv = shutil.which("uv")
    assert uv, "uv not found on PATH: `make setup` installs it"
    root = tmp_path_factory.mktemp("operator-image")
    steps = dockerfile_instructions(DOCKERFILE)
    # The RUN's own flags (--mount=type=cache,... for uv's cache) come before the command.
    runs = [re.sub(r"^(--\S+\s+)+", "", args) for word, args in steps if word == "RUN"]
    export = next(args for args in runs if args.startswith("uv export"))  # the lock stage
    install = next(args for args in runs if args.startswith("uv venv"))  # the build stage
    build_env = {}
    for word, args in steps:
        if word == "ENV" and "VIRTUAL_ENV" in args:
            build_env = env_pairs(args)
    venv = root / build_env["VIRTUAL_ENV"].lstrip("/")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy2(REPO_ROOT / name, src / name)
    env = {**os.environ, **build_env, "VIRTUAL_ENV": str(venv), "UV_LINK_MODE": "hardlink"}
    commands = [export, *install.replace(build_env["VIRTUAL_ENV"], str(venv)).split(" && ")]
    for command in commands:
        proc = subprocess.run(command.split(), cwd=src, env=env, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    # The last stage: COPY --from=build of the venv is the venv above; the packages are copied here.
    runtime_env: dict[str, str] = {}
    entrypoint: list[str] = []
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            *sources, dest = args.split()
            if dest.startswith("/"):  # the build stage's relative COPY of the lock is done above
                for source in sources:
                    shutil.copytree(REPO_ROOT / source, root / dest.lstrip("/"))
        elif word == "ENV" and "PYTHONPATH" in args:
            runtime_env = env_pairs(args)
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(args)
    assert runtime_env
    assert entrypoint
    mapped = {
        key: re.sub(r"(^|:)/", lambda m: f"{m.group(1)}{root}/", value) for key, value in runtime_env.items()
    }
    mapped["PATH"] = mapped["PATH"].replace("$PATH", "/usr/bin:/bin")
    return root, mapped, entrypoint


def service_account_kubeconfig(kubectl: Kubectl, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig for the local API server that logs in as ``sa`` with a bound token."""
    token = kubectl.ok("-n", namespace, "create", "token", sa, "--duration=3600s").strip()
    config = json.loads(kubectl.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a fixed http://127.0.0.1 URL
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def operator_release(
    cluster_helm: Helm, kubectl: Kubectl, namespace: str, watched_namespaces: list[str]
) -> Iterator[dict[str, Any]]:
    release = "kt" + secrets.token_hex(3)
    metrics_port = pick_port()
    health_port = pick_port(avoid={metrics_port})
    cluster_helm.run(
        "install",
        release,
        str(CHART_DIR),
        "--namespace",
        namespace,
        "--set",
        f"watchNamespaces={{{','.join(watched_namespaces)}}}",
        "--set",
        f"peering.name={release}",
        "--set",
        f"metrics.port={metrics_port}",
        "--set",
        f"health.port={health_port}",
    )
    try:
        deploy = kubectl.json("-n", namespace, "get", "deployment", f"{release}-kubetune")
        yield {"release": release, "namespace": namespace, "deployment": deploy}
    finally:
        cluster_helm.run("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")


def test_operator_runs_with_the_charts_env_rbac_and_probes(
    image_root: tuple[Path, dict[str, str], list[str]],
    operator_release: dict[str, Any],
    kubectl: Kubectl,
    watched_namespaces: list[str],
    tmp_path: Path,
) -> None:
    root, image_env, entrypoint = image_root
    deploy = operator_release["deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    kubeconfig = service_account_kubeconfig(
        kubectl, operator_release["namespace"], pod["serviceAccountName"], tmp_path / "kubeconfig"
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    log_path = tmp_path / "operator.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            entrypoint,
            env={**image_env, **env, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)},
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # Both probes, as the chart declares them (path and named port).
        probes = {
            kind: "http://127.0.0.1:{}{}".format(
                ports[container[kind]["httpGet"]["port"]], container[kind]["httpGet"]["path"]
            )
            for kind in ("livenessProbe", "readinessProbe")
        }
        deadline = time.monotonic() + 60
        while not all(http_ok(url) for url in probes.values()):
            assert proc.poll() is None, f"operator exited {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"probes {probes} never answered:\n{log_path.read_text()}"
            time.sleep(0.5)

        # A FineTuneJob in a watched namespace is reconciled with the chart's RBAC alone.
        manifest = yaml.safe_load(EXAMPLE_FTJ.read_text())
        namespace = watched_namespaces[0]
        manifest["metadata"]["namespace"] = namespace
        kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
        name = manifest["metadata"]["name"]
        deadline = time.monotonic() + 90
        while True:
            ftj = kubectl.json("-n", namespace, "get", "finetunejobs.kubetune.dev", name)
            job_name = ftj.get("status", {}).get("jobName")
            if job_name and kubectl.run("-n", namespace, "get", "job", job_name).returncode == 0:
                break
            assert proc.poll() is None, f"operator exited {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, (
                f"no Job for {name}: {ftj.get('status')}\n{log_path.read_text()}"
            )
            time.sleep(1)
        for kind in ("configmap", "serviceaccount", "role", "rolebinding"):
            listed = kubectl.json("-n", namespace, "get", kind, "-l", f"kubetune.dev/finetunejob={name}")
            assert listed["items"], f"no {kind} for {name}"
        # GitOps: after the operator has reconciled it, the FineTuneJob in git still matches the
        # live object (defaults come from the schema; the operator writes only status/annotations).
        diff = kubectl.run("diff", "-f", "-", stdin=yaml.safe_dump(manifest))
        assert diff.returncode == 0, f"kubectl diff shows drift:\n{diff.stdout}{diff.stderr}"
        peering = kubectl.json("-n", namespace, "get", "kopfpeering", operator_release["release"])
        assert peering.get("status"), "the operator never announced itself in its KopfPeering"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    for sign in ("Forbidden", "403", "Not enough permissions"):
        assert sign not in output, f"permission problem in the operator log:\n{output}"
