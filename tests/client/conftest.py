"""Fixtures for the SDK and CLI tests: a control plane of their own with the CRD, the operator
(its own process) and a node agent that runs the trainer pod, plus the S3 server; and helpers to
run the real ``kubetune`` app (typer's CliRunner) against it."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from kubetune_client.cli import app
from kubetune_localenv import stack
from kubetune_localenv.agents import start_agent
from kubetune_localenv.cluster import LocalEnv


@pytest.fixture(scope="session")
def client_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnv]:
    """Control plane + S3 + node agent (CPU only) + the CRD + the operator, for tests/client."""
    env = LocalEnv(tmp_path_factory.mktemp("client-env"))
    env.extra_start.append(lambda e: start_agent(e, gpus=0))
    env.start()
    try:
        stack.install_crd(env)  # both CRDs, before the operator
        stack.start_operator(env)
        yield env
    finally:
        env.stop()


@pytest.fixture(scope="session")
def client_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny model is built (once per session)."""
    return tmp_path_factory.mktemp("client-work")


@dataclass
class Cli:
    """``cli("status", "x")``: the real ``kubetune`` app with this environment's kubeconfig and
    this machine's S3 credentials (the AWS_* variables of the local S3 server)."""

    env: dict[str, str]

    def __call__(self, *args: str) -> Result:
        return CliRunner().invoke(app, list(args), env=self.env, catch_exceptions=False)

    def json(self, *args: str) -> Any:
        result = self(*args, "-o", "json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


@pytest.fixture(scope="session")
def cli(client_env: LocalEnv) -> Cli:
    return Cli(client_env.env())


@pytest.fixture
def aws_credentials(client_env: LocalEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK reads object storage with this machine's credentials: boto3's chain, here AWS_*."""
    for key, value in client_env.env().items():
        monkeypatch.setenv(key, value)


def new_namespace(env: LocalEnv, prefix: str = "cli") -> str:
    """A namespace with the S3 credentials Secret the tiny job names."""
    namespace = f"{prefix}-" + secrets.token_hex(3)
    stack.ensure_namespace(env, namespace)
    stack.create_credentials_secret(env, namespace)
    return namespace


def fails_with(result: Result, code: int, *words: str) -> str:
    """Assert an exit code and that stderr names each of ``words``; return stderr."""
    assert result.exit_code == code, f"exit {result.exit_code}, output:\n{result.output}"
    for word in words:
        assert word in result.stderr, f"{word!r} not in stderr:\n{result.stderr}"
    return result.stderr
