"""What every ``kubetune`` command module shares: the common options, the client, output and
the error-to-exit-code wrapper (:mod:`.cli` and :mod:`.cli_sweep` import it; it imports neither)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from .client import Client
from .errors import KubetuneError

P = ParamSpec("P")
R = TypeVar("R")


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


Kubeconfig = Annotated[
    Path | None, typer.Option("--kubeconfig", help="kubeconfig file (default $KUBECONFIG, ~/.kube/config).")
]
Context = Annotated[
    str | None, typer.Option("--context", help="kubeconfig context (default: its current one).")
]
Namespace = Annotated[
    str | None,
    typer.Option("--namespace", "-n", help="Namespace (default: the context's, else default)."),
]
S3Endpoint = Annotated[
    str | None,
    typer.Option(
        "--s3-endpoint",
        envvar="KUBETUNE_S3_ENDPOINT",
        help="Object-storage URL to use instead of spec.storage.endpoint (when this machine reaches "
        "the store at another address than the trainer pod).",
    ),
]
AwsProfile = Annotated[
    str | None, typer.Option("--aws-profile", help="AWS profile for object storage (default: boto3's chain).")
]
Output = Annotated[OutputFormat, typer.Option("--output", "-o", help="table (for people) or json.")]


def _client(
    kubeconfig: Path | None,
    context: str | None,
    namespace: str | None,
    s3_endpoint: str | None = None,
    aws_profile: str | None = None,
) -> Client:
    return Client(kubeconfig, context, namespace, s3_endpoint=s3_endpoint, aws_profile=aws_profile)


def _fail(exc: KubetuneError) -> typer.Exit:
    _console(stderr=True).print(f"kubetune: error: {exc}", markup=False)
    return typer.Exit(int(exc.exit_code))


def errors_to_exit_codes(command: Callable[P, R]) -> Callable[P, R]:
    """Print a :class:`KubetuneError` as one line on stderr and exit with its code."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except KubetuneError as exc:
            raise _fail(exc) from exc

    return run


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
