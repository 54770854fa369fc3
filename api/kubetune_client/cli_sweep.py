"""``kubetune sweep``: start a FineTuneSweep, follow it, show its trials and best trial.

:data:`sweep_app` is added to the ``kubetune`` app by :mod:`.cli`; kept apart so the FineTuneJob
commands' module does not grow a second resource's commands. Shared options: :mod:`.cli_common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kubetune_api.sweep import KIND

from . import render_sweep
from .cli_common import (
    Context,
    Kubeconfig,
    Namespace,
    Output,
    OutputFormat,
    _client,
    _console,
    _print_json,
    errors_to_exit_codes,
)
from .errors import SweepFailedError
from .render import key_value_table
from .sweep import Sweep, load_sweep_manifest, submit_sweep

#: ``kubetune sweep ...`` (:mod:`.cli` adds it to the ``kubetune`` app).
sweep_app = typer.Typer(
    help=(
        "Hyperparameter sweeps (FineTuneSweep): each trial an ordinary FineTuneJob, chosen by Optuna.\n\n"
        "Example: kubetune sweep run -f examples/finetunesweep.yaml --watch"
    ),
    no_args_is_help=True,
)

SweepName = Annotated[str, typer.Argument(help="Name of the FineTuneSweep.")]
Timeout = Annotated[float | None, typer.Option(help="With --watch: give up after this many seconds.")]


def _show(sweep: Sweep) -> None:
    console = _console()
    console.print(key_value_table(render_sweep.summary_rows(sweep)))
    if sweep.trials:
        console.print()
        console.print(render_sweep.trials_table(sweep.trials, sweep.status.best_trial))


def _watch(sweep: Sweep, timeout: float | None) -> None:
    """One line per change of the sweep's phase or counts, then its trials; exit 9 if it failed."""
    seen = None
    for current in sweep.updates(timeout):
        line = render_sweep.sweep_line(current)
        if line != seen:
            seen = line
            _console().print(line, markup=False)
    _show(sweep)
    if sweep.failed:
        raise SweepFailedError(sweep.name, sweep.status.reason, sweep.status.message)


@sweep_app.command("run")
@errors_to_exit_codes
def run_sweep(
    *,
    file: Annotated[Path, typer.Option("--file", "-f", help="A FineTuneSweep manifest (YAML or JSON).")],
    name: Annotated[str | None, typer.Option("--name", help="Name (overrides the manifest's).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Let the API server validate it; create nothing.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Then follow it like sweep status --watch.")
    ] = False,
    timeout: Timeout = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Create a FineTuneSweep from a manifest; the operator then runs its trials as FineTuneJobs.

    The manifest is validated with the API's own models first, and each value of its search space
    is applied to the template (the checks the operator makes), so a bad sweep fails here (exit 7).

    Example: kubetune sweep run -f examples/finetunesweep.yaml --watch
    """
    resource = load_sweep_manifest(file)
    if name is not None:
        resource = resource.model_copy(
            update={"metadata": resource.metadata.model_copy(update={"name": name})}
        )
    client = _client(kubeconfig, context, namespace)
    sweep = submit_sweep(client.kube, resource, namespace, dry_run=dry_run)
    verb = "validated by the API server (dry run, nothing created)" if dry_run else "created"
    _console().print(
        f"finetunesweep.kubetune.dev/{sweep.name} {verb} in namespace {sweep.namespace}", markup=False
    )
    if watch and not dry_run:
        _watch(sweep, timeout)


@sweep_app.command("status")
@errors_to_exit_codes
def sweep_status(
    name: SweepName,
    *,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Follow it to the end, a line per change, then the trials.")
    ] = False,
    timeout: Timeout = None,
    output_format: Output = OutputFormat.table,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Show a FineTuneSweep: phase, counts, the best trial with its value and parameters, and every
    trial (name, parameters, state, value; the best marked *).

    With --watch, one line per change until it succeeds (exit 0) or fails (exit 9, with the reason).

    Example: kubetune sweep status lr-rank --watch
    """
    client = _client(kubeconfig, context, namespace)
    sweep = Sweep(client.kube, client.kube.get_sweep(client.namespace, name))
    if watch:
        _watch(sweep, timeout)
    elif output_format is OutputFormat.json:
        _print_json(render_sweep.sweep_json(sweep))
    else:
        _show(sweep)


@sweep_app.command("list")
@errors_to_exit_codes
def list_sweeps(
    *,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Every namespace.")] = False,
    output_format: Output = OutputFormat.table,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """List FineTuneSweeps with their phase, trials ended, running, and best value and trial.

    Example: kubetune sweep list -n team-a -o json
    """
    client = _client(kubeconfig, context, namespace)
    raw = client.kube.list_sweeps(None if all_namespaces else client.namespace)
    sweeps = [Sweep(client.kube, obj) for obj in raw]
    if output_format is OutputFormat.json:
        _print_json({"items": [render_sweep.sweep_json(s) for s in sweeps]})
    elif not sweeps:
        _console(stderr=True).print(f"No {KIND}s found.")
    else:
        _console().print(render_sweep.sweeps_table(sweeps, namespace=all_namespaces))
