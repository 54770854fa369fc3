"""Every ``kubetune`` command's ``--help`` says what it does and shows an example."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import typer
from typer.testing import CliRunner

from kubetune_client.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
#: The commands of each group (``kubetune sweep run`` ...), as "group command".
SUBCOMMANDS = sorted(
    f"{group} {sub}"
    for group, command in typer.main.get_command(app).commands.items()  # type: ignore[attr-defined]
    for sub in getattr(command, "commands", {})
)


def test_the_commands_are_the_issues_and_the_script_is_installed() -> None:
    expected = {
        "run", "list", "status", "logs", "suspend", "resume", "cancel", "checkpoints", "download", "validate",
        "sweep",
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


def test_the_sweep_commands_are_run_status_and_list() -> None:
    assert SUBCOMMANDS == ["sweep list", "sweep run", "sweep status"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_each_subcommand_has_an_example(command: str) -> None:
    result = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout
    assert f"kubetune {command}" in result.stdout
