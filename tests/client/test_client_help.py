"""Every ``kubetune`` command's ``--help`` says what it does and shows an example."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import typer
from typer.testing import CliRunner

from kubetune_client.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_the_commands_are_the_issues_and_the_script_is_installed() -> None:
    expected = {
        "run", "list", "status", "logs", "suspend", "resume", "cancel", "checkpoints", "download", "validate",
    }  # fmt: skip
    assert set(COMMANDS) == expected
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "kubetune"]
    assert script.value == "kubetune_client.cli:app"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_what_the_command_does_with_an_example(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout
    assert f"kubetune {command}" in result.stdout  # the example runs this very command
