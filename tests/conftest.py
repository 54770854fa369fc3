"""Shared fixtures: one real local control plane + S3 server per test session.

The control plane is the one ``make cluster-up`` runs (see hack/kubetune_localenv):
etcd, kube-apiserver, kube-controller-manager and versitygw on 127.0.0.1.
Each test that asks for ``namespace`` gets a fresh namespace, and ``bucket`` a
fresh bucket, so tests do not see each other's objects.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_localenv.cluster import LocalEnv

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def local_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnv]:
    """The session's control plane and S3 server (started once, stopped at the end)."""
    env = LocalEnv(tmp_path_factory.mktemp("kubetune-env"))
    env.start()
    try:
        yield env
    finally:
        env.stop()


@pytest.fixture(scope="session")
def kube_api(local_env: LocalEnv) -> Any:
    """A ``kubernetes.client.ApiClient`` logged in as the cluster admin."""
    from kubernetes import client, config

    api_client = config.new_client_from_config(str(local_env.kubeconfig))
    assert isinstance(api_client, client.ApiClient)
    return api_client


@pytest.fixture
def namespace(local_env: LocalEnv, kube_api: Any) -> Iterator[str]:
    """A fresh namespace, deleted after the test."""
    from kubernetes import client

    name = "t-" + secrets.token_hex(4)
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        if not os.environ.get("KUBETUNE_KEEP_NAMESPACES"):
            core.delete_namespace(name)


@pytest.fixture(scope="session")
def s3_env(local_env: LocalEnv) -> dict[str, str]:
    """AWS_* variables for the local S3 server (what ``.kubetune/s3.env`` holds)."""
    assert local_env.s3 is not None
    return local_env.s3.env()


@pytest.fixture(scope="session")
def s3_client(local_env: LocalEnv) -> Any:
    from kubetune_localenv import stack

    return stack.s3_client(local_env)


@pytest.fixture
def bucket(s3_client: Any) -> str:
    """A fresh, empty bucket."""
    name = "b-" + secrets.token_hex(6)
    s3_client.create_bucket(Bucket=name)
    return name
