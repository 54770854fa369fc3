"""The CLI's and the SDK's errors on real clusters: no cluster, no CRD, not found, no permission,
each with its own exit code and a message that says what to do."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_client import Client, CrdNotInstalledError, Exit, NotFoundError, PermissionDeniedError
from kubetune_localenv import stack
from kubetune_localenv.cluster import LocalEnv, pick_port

from .conftest import Cli, fails_with

pytestmark = [pytest.mark.cluster]


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnv]:
    """An API server without kubetune's CRD (no controller manager or S3 needed)."""
    env = LocalEnv(tmp_path_factory.mktemp("bare"), with_controller_manager=False, with_s3=False)
    env.start()
    try:
        yield env
    finally:
        env.stop()


def _kubeconfig(source: Path, dest: Path, *, server: str | None = None, token: str | None = None) -> Path:
    """A copy of ``source`` pointing at another server, or logging in with a bearer token instead."""
    config = json.loads(source.read_text())
    if server is not None:
        config["clusters"][0]["cluster"]["server"] = server
    if token is not None:
        config["users"][0]["user"] = {"token": token}
    dest.write_text(json.dumps(config))
    return dest


def test_no_kubeconfig_and_no_answer_are_no_cluster(tmp_path: Path, client_env: LocalEnv) -> None:
    cli = Cli({"KUBECONFIG": str(tmp_path / "missing")})
    fails_with(cli("list"), Exit.NO_CLUSTER, "no kubeconfig at", "missing")
    dead = _kubeconfig(client_env.kubeconfig, tmp_path / "dead", server=f"https://127.0.0.1:{pick_port()}")
    fails_with(cli("list", "--kubeconfig", str(dead)), Exit.NO_CLUSTER, "cannot reach the API server")


def test_a_cluster_without_the_crd_says_to_install_it(bare_env: LocalEnv) -> None:
    cli = Cli({"KUBECONFIG": str(bare_env.kubeconfig)})
    fails_with(cli("list"), Exit.CRD_NOT_INSTALLED, "serves no FineTuneJob", "install kubetune's CRD")
    fails_with(cli("status", "anything"), Exit.CRD_NOT_INSTALLED, "install kubetune's CRD")
    with pytest.raises(CrdNotInstalledError):
        Client(kubeconfig=bare_env.kubeconfig).get("anything")


def test_a_missing_job_is_not_found(cli: Cli, client_env: LocalEnv) -> None:
    namespace = "nf-" + secrets.token_hex(3)
    stack.ensure_namespace(client_env, namespace)
    for command in (["status", "nope"], ["suspend", "nope"], ["checkpoints", "nope"], ["logs", "nope"]):
        fails_with(cli(*command, "-n", namespace), Exit.NOT_FOUND, "FineTuneJob nope not found", namespace)
    with pytest.raises(NotFoundError):
        Client(kubeconfig=client_env.kubeconfig, namespace=namespace).get("nope")


def test_a_service_account_without_rights_is_permission_denied(client_env: LocalEnv, tmp_path: Path) -> None:
    namespace = "rbac-" + secrets.token_hex(3)
    stack.ensure_namespace(client_env, namespace)
    client_env.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    token = client_env.kubectl("create", "token", "nobody", "-n", namespace).strip()
    kubeconfig = _kubeconfig(client_env.kubeconfig, tmp_path / "nobody", token=token)
    cli = Cli({"KUBECONFIG": str(kubeconfig)})
    user = f"system:serviceaccount:{namespace}:nobody"
    fails_with(
        cli("list", "-n", namespace), Exit.PERMISSION_DENIED, "permission denied", user, "finetunejobs"
    )
    fails_with(cli("status", "x", "-n", namespace), Exit.PERMISSION_DENIED, user)
    with pytest.raises(PermissionDeniedError):
        Client(kubeconfig=kubeconfig, namespace=namespace).list()
    bogus = _kubeconfig(client_env.kubeconfig, tmp_path / "bogus", token="not-a-token")
    fails_with(
        Cli({"KUBECONFIG": str(bogus)})("list"), Exit.PERMISSION_DENIED, "did not accept the credentials"
    )
