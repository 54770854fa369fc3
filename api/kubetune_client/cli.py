"""``kubetune``: the command line for FineTuneJobs, built on the SDK (:class:`~kubetune_client.Client`).

Every command talks to the cluster of the kubeconfig (``--kubeconfig``, ``$KUBECONFIG``,
``~/.kube/config``) and, for results, to object storage with this machine's AWS credentials.
Errors go to stderr as one ``kubetune: error: ...`` line and exit with a code per kind of error
(:class:`~kubetune_client.errors.Exit`).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from kubetune_api.reasons import Phase
from kubetune_api.resource import FineTuneJob
from kubetune_api.spec import FineTuneJobSpec

from . import cli_sweep, render
from .cli_common import (
    AwsProfile,
    Context,
    Kubeconfig,
    Namespace,
    Output,
    OutputFormat,
    S3Endpoint,
    _client,
    _console,
    _print_json,
    errors_to_exit_codes,
)
from .client import load_manifest, to_resource
from .errors import InvalidSpecError, JobCancelledError, JobFailedError, KubetuneError
from .job import Job
from .validate import validate_files

P = ParamSpec("P")
R = TypeVar("R")

STORAGE_HELP = (
    "Results are read from the job's spec.storage endpoint with this machine's AWS credentials "
    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws; never the job's Secret)."
)
app = typer.Typer(
    name="kubetune",
    help=(
        "Run and follow kubetune FineTuneJobs (QLoRA/LoRA fine-tuning on Kubernetes).\n\n"
        "Talks to the cluster of --kubeconfig, $KUBECONFIG or ~/.kube/config. " + STORAGE_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(cli_sweep.sweep_app, name="sweep")


class Format(StrEnum):
    """spec.dataset.format's values."""

    auto = "auto"
    alpaca = "alpaca"
    chat = "chat"
    prompt_completion = "prompt_completion"
    text = "text"


class MethodChoice(StrEnum):
    qlora = "qlora"
    lora = "lora"


Name = Annotated[str, typer.Argument(help="Name of the FineTuneJob.")]


# -- run --------------------------------------------------------------------------------------
def _spec_from_flags(flags: dict[str, Any], fmt: Format, method: MethodChoice) -> FineTuneJobSpec:
    """``kubetune run``'s spec flags (unset ones are None) as a validated spec."""
    missing = [f"--{key}" for key in ("model", "dataset", "output") if not flags[key]]
    if missing:
        raise InvalidSpecError(f"kubetune run needs -f MANIFEST, or {', '.join(missing)}")
    training = {
        "maxSteps": flags["max_steps"],
        "numTrainEpochs": flags["epochs"],
        "learningRate": flags["learning_rate"],
        "perDeviceTrainBatchSize": flags["batch_size"],
    }
    storage: dict[str, Any] = {"endpoint": flags["storage_endpoint"]}
    if flags["credentials_secret"]:
        storage["credentialsSecretRef"] = {"name": flags["credentials_secret"]}
    spec: dict[str, Any] = {
        "model": {"source": flags["model"]},
        "dataset": {"train": flags["dataset"], "validation": flags["validation"], "format": fmt.value},
        "method": method.value,
        "output": {"uri": flags["output"]},
        "training": {k: v for k, v in training.items() if v is not None},
        "storage": {k: v for k, v in storage.items() if v is not None},
        "lora": {"r": flags["lora_r"]} if flags["lora_r"] is not None else {},
        "resources": {"gpus": flags["gpus"]} if flags["gpus"] is not None else {},
    }
    if method is MethodChoice.lora:
        spec["quantization"] = {"bits": 16}
    return to_resource({k: v for k, v in spec.items() if v != {}}).spec


def _resource(file: Path | None, flags: dict[str, Any], fmt: Format, method: MethodChoice) -> FineTuneJob:
    """The FineTuneJob ``kubetune run`` creates: from the manifest, or from the flags."""
    if file is None:
        return to_resource(_spec_from_flags(flags, fmt, method))
    if any(value is not None for value in flags.values()):
        raise InvalidSpecError(
            "give either -f MANIFEST or the spec flags (--model, --dataset, ...), not both"
        )
    return load_manifest(file)


@app.command()
@errors_to_exit_codes
def run(
    *,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="A FineTuneJob manifest (YAML or JSON).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name (overrides the manifest's).")] = None,
    model: Annotated[
        str | None, typer.Option(help="Base model: hub id (org/name) or s3://bucket/prefix.")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="s3://bucket/key of the training file.")] = None,
    validation: Annotated[str | None, typer.Option(help="s3://bucket/key of a validation file.")] = None,
    output: Annotated[str | None, typer.Option("--output", help="s3://bucket/prefix for the result.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Dataset format.")] = Format.auto,
    method: Annotated[MethodChoice, typer.Option(help="qlora (4-bit base) or lora.")] = MethodChoice.qlora,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (instead of epochs).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per-device training batch size.")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs (0 trains on CPU).")] = None,
    storage_endpoint: Annotated[
        str | None, typer.Option(help="spec.storage.endpoint: an S3-compatible server's URL.")
    ] = None,
    credentials_secret: Annotated[
        str | None, typer.Option(help="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for the trainer.")
    ] = None,
    suspend: Annotated[
        bool, typer.Option(help="Create it suspended (start it with kubetune resume).")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Let the API server validate it; create nothing.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Then follow it like status --watch.")] = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Create a FineTuneJob from a manifest, or from flags for the common case.

    The spec is validated with the API's own models first (same rules and defaults as the CRD).

    Examples:

      kubetune run -f examples/finetunejob.yaml

      kubetune run --name chat --model Qwen/Qwen2.5-0.5B --dataset s3://d/chat.jsonl --output s3://o/chat -w
    """
    flags = {
        "model": model, "dataset": dataset, "validation": validation, "output": output,
        "max_steps": max_steps, "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size,
        "lora_r": lora_r, "gpus": gpus, "storage_endpoint": storage_endpoint,
        "credentials_secret": credentials_secret,
    }  # fmt: skip
    resource = _resource(file, flags, fmt, method)
    if suspend:
        resource = resource.model_copy(update={"spec": resource.spec.model_copy(update={"suspend": True})})
    client = _client(kubeconfig, context, namespace)
    job = client.submit(resource, name=name, dry_run=dry_run)
    verb = "validated by the API server (dry run, nothing created)" if dry_run else "created"
    _console().print(f"finetunejob.kubetune.dev/{job.name} {verb} in namespace {job.namespace}", markup=False)
    if watch and not dry_run:
        _watch(job, None)


# -- list / status ----------------------------------------------------------------------------
@app.command("list")
@errors_to_exit_codes
def list_jobs(
    *,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Every namespace.")] = False,
    output_format: Output = OutputFormat.table,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """List FineTuneJobs with their phase, progress and loss.

    Example: kubetune list -n team-a -o json
    """
    jobs = _client(kubeconfig, context, namespace).list(all_namespaces=all_namespaces)
    if output_format is OutputFormat.json:
        _print_json({"items": [render.job_json(j) for j in jobs]})
    elif not jobs:
        _console(stderr=True).print("No FineTuneJobs found.")
    else:
        _console().print(render.jobs_table(jobs, namespace=all_namespaces))


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
    )


def _watch(job: Job, timeout: float | None, fail_on_cancel: bool = False) -> None:
    """Follow ``job`` until it ends: a live bar, and one printed line per phase or reason change."""
    console = _console()
    seen: tuple[object, object] | None = None
    with _progress_bar(console) as bar:
        task = bar.add_task(job.name, total=None, stats=render.progress_text(job.progress))
        for current in job.updates(timeout):
            status, progress = current.status, current.progress
            if (status.phase, status.reason) != seen:
                seen = (status.phase, status.reason)
                bar.console.print(render.phase_line(current.name, status), markup=False)
            bar.update(
                task,
                description=f"{current.name} {status.phase or ''}",
                completed=progress.step or 0,
                total=progress.total_steps,
                stats=render.progress_text(progress),
            )
    if job.phase == Phase.FAILED:
        raise JobFailedError(job.name, job.status.reason, job.status.message)
    if job.phase == Phase.CANCELLED and fail_on_cancel:
        raise JobCancelledError(job.name, job.status.message)
    if not job.done:
        raise KubetuneError(f"stopped watching {job.name} after {timeout:.0f}s (phase {job.phase})")


@app.command()
@errors_to_exit_codes
def status(
    name: Name,
    *,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Follow it to the end with a live progress bar.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --watch: give up after this many seconds.")
    ] = None,
    fail_on_cancel: Annotated[
        bool, typer.Option(help="With --watch: exit 15 if it is cancelled (default: exit 0).")
    ] = False,
    plot: Annotated[
        bool,
        typer.Option(
            "--plot",
            help="Also draw the loss curve (train and eval loss by step), read from the output in"
            " object storage: metrics.json once published, else the newest checkpoint.",
        ),
    ] = False,
    output_format: Output = OutputFormat.table,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
    s3_endpoint: S3Endpoint = None,
) -> None:
    """Show a FineTuneJob's phase and training progress (step, loss, eval loss, tokens/s, ETA).

    With --watch, a live progress bar until it succeeds (exit 0), fails (exit 9, with the reason)
    or is cancelled (exit 0; 15 with --fail-on-cancel). With --plot, the loss curve under it.

    Example: kubetune status support-chat --watch
    Example: kubetune status support-chat --plot
    """
    job = _client(kubeconfig, context, namespace, s3_endpoint).get(name)
    if watch:
        _watch(job, timeout, fail_on_cancel)
    elif output_format is OutputFormat.json:
        _print_json(render.job_json(job))
    else:
        _console().print(render.key_value_table(render.status_rows(job)))
    if plot:
        _console().print(render.loss_chart(job.loss_history()), markup=False, highlight=False)


# -- logs / suspend / resume ------------------------------------------------------------------
@app.command()
@errors_to_exit_codes
def logs(
    name: Name,
    *,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing as the log grows.")] = False,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Print the trainer pod's log (the newest attempt's), through the API server.

    Example: kubetune logs support-chat -f
    """
    job = _client(kubeconfig, context, namespace).get(name)
    for line in job.logs(follow=follow, tail_lines=tail):
        typer.echo(line)


@app.command()
@errors_to_exit_codes
def suspend(
    name: Name, kubeconfig: Kubeconfig = None, context: Context = None, namespace: Namespace = None
) -> None:
    """Stop a FineTuneJob's trainer (spec.suspend: true); it saves a checkpoint first and keeps them.

    Example: kubetune suspend support-chat
    """
    job = _client(kubeconfig, context, namespace).get(name).suspend()
    _console().print(f"{job.name}: suspend requested (phase {job.phase})", markup=False)


@app.command()
@errors_to_exit_codes
def resume(
    name: Name, kubeconfig: Kubeconfig = None, context: Context = None, namespace: Namespace = None
) -> None:
    """Start a suspended FineTuneJob again (spec.suspend: false); it resumes from its newest checkpoint.

    Example: kubetune resume support-chat
    """
    job = _client(kubeconfig, context, namespace).get(name).resume()
    _console().print(f"{job.name}: resume requested (phase {job.phase})", markup=False)


@app.command()
@errors_to_exit_codes
def cancel(
    name: Name,
    *,
    wait: Annotated[
        bool, typer.Option("--wait", help="Then wait until the trainer has stopped and its Job is gone.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
    ] = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
) -> None:
    """Cancel a FineTuneJob for good (spec.cancel: true): its trainer saves a checkpoint and stops.

    Unlike delete, the FineTuneJob, its status and its checkpoints stay (phase Cancelled); unlike
    suspend, it is never resumed and cannot be undone: to train again, create a new FineTuneJob.
    A run that already Succeeded or Failed keeps its outcome.

    Example: kubetune cancel support-chat --wait
    """
    job = _client(kubeconfig, context, namespace).get(name).cancel()
    _console().print(f"{job.name}: cancel requested (phase {job.phase})", markup=False)
    if wait:
        job.wait(timeout)  # returns once the trainer has stopped (or the run had ended anyway)
        _console().print(render.phase_line(job.name, job.status), markup=False)


# -- results ----------------------------------------------------------------------------------
@app.command()
@errors_to_exit_codes
def checkpoints(
    name: Name,
    *,
    output_format: Output = OutputFormat.table,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
    s3_endpoint: S3Endpoint = None,
    aws_profile: AwsProfile = None,
) -> None:
    """List a FineTuneJob's complete checkpoints in object storage, with the step and metrics of each.

    Only checkpoints whose _COMPLETE marker exists are listed (what a resume would use).

    Example: kubetune checkpoints support-chat -o json
    """
    job = _client(kubeconfig, context, namespace, s3_endpoint, aws_profile).get(name)
    found = job.checkpoints()
    if output_format is OutputFormat.json:
        _print_json([c.as_dict() for c in found])
    elif not found:
        _console(stderr=True).print(f"No complete checkpoints under {job.output_uri}.", markup=False)
    else:
        _console().print(render.checkpoints_table(found))


@app.command()
@errors_to_exit_codes
def download(
    name: Name,
    directory: Annotated[Path, typer.Argument(help="Folder to write the result into (created).")],
    *,
    merged: Annotated[
        bool, typer.Option(help="Include the merged model (merged/), if the job wrote one.")
    ] = True,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
    s3_endpoint: S3Endpoint = None,
    aws_profile: AwsProfile = None,
) -> None:
    """Download a FineTuneJob's published result (adapter, tokenizer, metrics, model card).

    Only once its manifest.json exists (the trainer writes it last); every file's size and sha256
    are checked against it, and a file that does not match is deleted (exit 13).

    Example: kubetune download support-chat ./support-chat-adapter
    """
    job = _client(kubeconfig, context, namespace, s3_endpoint, aws_profile).get(name)
    result = job.download(directory, merged=merged)
    for path in result.files:
        _console().print(f"  {path}", markup=False)
    _console().print(
        f"{len(result.files)} files from {job.output_uri} verified (size, sha256) and written to {directory}",
        markup=False,
    )


@app.command()
@errors_to_exit_codes
def validate(
    file: Annotated[Path, typer.Argument(help="The training file (.jsonl, .json, .csv, .parquet).")],
    *,
    validation: Annotated[Path | None, typer.Option(help="A validation file, checked the same way.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Record format (auto: detected).")] = Format.auto,
    max_errors: Annotated[int, typer.Option(help="How many problems to list.")] = 20,
    output_format: Output = OutputFormat.table,
) -> None:
    """Check a dataset locally with the trainer's own validation, before any upload.

    Every record is read and checked against its format; problems are listed as
    '<file> line <n>: <what>' and the exit code is 42, as the trainer's.

    Example: kubetune validate data/train.jsonl --format chat
    """
    report = validate_files(file, validation, fmt.value, max_reported_errors=max_errors)
    if output_format is OutputFormat.json:
        _print_json(report.as_dict())
    else:
        extra = f" + {report.validation_records} validation" if validation else ""
        _console().print(
            f"{file}: valid, {report.train_records} records{extra}, format {report.format}", markup=False
        )
