"""The Argo CD health check (hack/argocd/finetunejob-health.lua) run by a real Lua runtime.

lupa embeds the Lua interpreter; the script gets the FineTuneJob as the global ``obj`` and
returns ``{status, message}``, exactly how Argo CD calls resource health scripts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

from kubetune_api.coordinates import API_VERSION, KIND
from kubetune_api.reasons import TERMINAL_PHASES, Phase, Reason

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "hack" / "argocd" / "finetunejob-health.lua"
CM_PATCH = REPO_ROOT / "examples" / "argocd" / "argocd-cm.yaml"
HEALTH_KEY = "resource.customizations.health.kubetune.dev_FineTuneJob"


def run_health(obj: dict[str, Any] | None, script: str | None = None) -> tuple[str, str]:
    """Evaluate the health script for ``obj``; return (status, message)."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    # Plain Lua tables (lists become 1-based sequences), as Argo CD builds from the object's JSON.
    lua.globals().obj = None if obj is None else lua.table_from(obj, recursive=True)
    result = lua.execute(script if script is not None else SCRIPT.read_text())
    return str(result["status"]), str(result["message"] or "")


def ftj(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "demo", "namespace": "ml", "generation": generation},
        "spec": {"model": {"source": "org/model"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def cond(ctype: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 1,
    }


SAMPLES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no status yet", ftj(), "Progressing", "Waiting for the kubetune operator"),
    ("empty status", ftj({}), "Progressing", "Waiting for the kubetune operator"),
    (
        "spec changed, not yet observed",
        ftj({"phase": "Succeeded", "observedGeneration": 1}, generation=2),
        "Progressing",
        "observe generation 2",
    ),
    (
        "pending",
        ftj(
            {
                "phase": "Pending",
                "observedGeneration": 1,
                "conditions": [cond("Created", "True", "JobCreated")],
            }
        ),
        "Progressing",
        "Pending",
    ),
    (
        "queued by Kueue",
        ftj({"phase": "Queued", "observedGeneration": 1}),
        "Progressing",
        "Queued",
    ),
    (
        "running with progress summary",
        ftj(
            {
                "phase": "Running",
                "observedGeneration": 1,
                "progressSummary": "120/500",
                "progress": {"step": 120, "totalSteps": 500, "loss": 1.25},
                "conditions": [cond("Running", "True", "Training")],
            }
        ),
        "Progressing",
        "Running (120/500)",
    ),
    (
        "running with raw progress only",
        ftj({"phase": "Running", "observedGeneration": 1, "progress": {"step": 7, "totalSteps": 10}}),
        "Progressing",
        "Running (step 7/10)",
    ),
    (
        "succeeded",
        ftj(
            {
                "phase": "Succeeded",
                "observedGeneration": 1,
                "outputURI": "s3://adapters/demo",
                "conditions": [cond("Succeeded", "True", "Completed")],
            }
        ),
        "Healthy",
        "Adapter written to s3://adapters/demo",
    ),
    (
        "succeeded condition without phase update",
        ftj(
            {
                "phase": "Running",
                "observedGeneration": 1,
                "conditions": [cond("Succeeded", "True", "Completed", "ok")],
            }
        ),
        "Healthy",
        "Completed: ok",
    ),
    (
        "failed with condition",
        ftj(
            {
                "phase": "Failed",
                "observedGeneration": 1,
                "reason": "OOMKilled",
                "conditions": [cond("Failed", "True", "OOMKilled", "trainer container ran out of memory")],
            }
        ),
        "Degraded",
        "OOMKilled: trainer container ran out of memory",
    ),
    (
        "failed with status reason only",
        ftj({"phase": "Failed", "observedGeneration": 1, "reason": "InvalidDataset", "message": "no rows"}),
        "Degraded",
        "InvalidDataset: no rows",
    ),
    (
        "failed condition while phase lags",
        ftj(
            {
                "phase": "Running",
                "observedGeneration": 1,
                "conditions": [cond("Failed", "True", "DeadlineExceeded")],
            }
        ),
        "Degraded",
        "DeadlineExceeded",
    ),
    (
        "failed without any detail",
        ftj({"phase": "Failed", "observedGeneration": 1}),
        "Degraded",
        "FineTuneJob failed",
    ),
    (
        "suspended",
        ftj(
            {
                "phase": "Suspended",
                "observedGeneration": 1,
                "conditions": [cond("Suspended", "True", "Suspended", "spec.suspend is true")],
            }
        ),
        "Suspended",
        "Suspended: spec.suspend is true",
    ),
    (
        "false conditions do not count",
        ftj(
            {
                "phase": "Running",
                "observedGeneration": 1,
                "conditions": [
                    cond("Failed", "False"),
                    cond("Succeeded", "False"),
                    cond("Suspended", "False"),
                ],
            }
        ),
        "Progressing",
        "Running",
    ),
    (
        "cancelled",
        ftj(
            {
                "phase": "Cancelled",
                "observedGeneration": 1,
                "reason": "Cancelled",
                "conditions": [
                    cond("Cancelled", "True", "Cancelled", "cancelled by spec.cancel"),
                    cond("Suspended", "False", "NotSuspended"),
                    cond("Failed", "False", "NotFailed"),
                ],
            }
        ),
        "Suspended",
        "Cancelled: Cancelled: cancelled by spec.cancel",
    ),
    (
        "cancelling, status reason only",
        ftj({"phase": "Cancelled", "observedGeneration": 1, "reason": "Cancelling", "message": "stopping"}),
        "Suspended",
        "Cancelled: stopping",
    ),
    (
        "cancel after success keeps Healthy",
        ftj(
            {
                "phase": "Succeeded",
                "observedGeneration": 2,
                "outputURI": "s3://adapters/demo",
                "conditions": [
                    cond("Succeeded", "True", "Completed"),
                    cond("Cancelled", "False", "NotCancelled"),
                ],
            },
            generation=2,
        ),
        "Healthy",
        "Adapter written to",
    ),
    ("unknown phase", ftj({"phase": "Exploding", "observedGeneration": 1}), "Unknown", "Exploding"),
]


@pytest.mark.parametrize(
    ("sample", "obj", "want_status", "want_message"), SAMPLES, ids=[s[0] for s in SAMPLES]
)
def test_health_of_sample(sample: str, obj: dict[str, Any], want_status: str, want_message: str) -> None:
    status, message = run_health(obj)
    assert status == want_status, f"{sample}: got {status} ({message})"
    assert want_message in message, f"{sample}: message {message!r} lacks {want_message!r}"


@pytest.mark.parametrize(
    ("job_suspended", "spec_extra", "want"),
    [
        (True, {"scheduling": {"queueName": "gpu-queue"}}, ("Progressing", "Queued")),
        (True, {"suspend": True}, ("Suspended", "")),
        (False, {}, ("Progressing", "Pending")),
        (False, {"cancel": True}, ("Suspended", "Cancelled: Cancelling: spec.cancel")),
    ],
)
def test_health_of_status_the_operator_computes(
    job_suspended: bool, spec_extra: dict[str, Any], want: tuple[str, str]
) -> None:
    """Samples made by the operator's own status computation, conditions included."""
    import datetime

    from kubetune_operator import builders, status

    body: dict[str, Any] = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "ft", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"source": "s3://models/base"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/ft"},
            **spec_extra,
        },
    }
    job = builders.job(body, "ghcr.io/kubetune/trainer:0.1.0")
    job["spec"]["suspend"] = job_suspended
    job["status"] = {}
    computed = status.compute(body, job, [], datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    got_status, got_message = run_health({**body, "status": computed})
    assert got_status == want[0], computed
    assert got_message.startswith(want[1])


def test_missing_object() -> None:
    assert run_health(None) == ("Missing", "FineTuneJob not found")


#: The Argo CD status each phase maps to when nothing needs a human.
PHASE_HEALTH = {
    Phase.PENDING: "Progressing",
    Phase.QUEUED: "Progressing",
    Phase.RUNNING: "Progressing",
    Phase.SUSPENDED: "Suspended",
    Phase.SUCCEEDED: "Healthy",
    Phase.FAILED: "Degraded",
    Phase.CANCELLED: "Suspended",
}


def test_script_knows_exactly_the_phases_of_the_enum() -> None:
    """The phases the script compares against are the API's phases, no more and no fewer."""
    named = set(re.findall(r'phase == "(\w+)"', SCRIPT.read_text()))
    assert named == {str(phase) for phase in Phase}
    assert set(PHASE_HEALTH) == set(Phase)


def test_script_knows_exactly_the_warning_reasons_of_unfinished_jobs() -> None:
    match = re.search(r"local NEEDS_A_HUMAN = \{(.*?)\}", SCRIPT.read_text(), re.S)
    assert match, "the script has no NEEDS_A_HUMAN table"
    listed = set(re.findall(r"(\w+) = true", match.group(1)))
    expected = {str(r) for r in Reason if r.warning and not set(r.phases) & TERMINAL_PHASES}
    assert listed == expected, f"add to the script: {expected - listed}; remove: {listed - expected}"


REASONS_IN_PHASES = [(reason, phase) for reason in Reason for phase in reason.phases]


@pytest.mark.parametrize(
    ("reason", "phase"), REASONS_IN_PHASES, ids=[f"{p}-{r}" for r, p in REASONS_IN_PHASES]
)
def test_every_reason_maps_to_a_known_health(reason: Reason, phase: Phase) -> None:
    obj = ftj(
        {"phase": str(phase), "reason": str(reason), "message": reason.meaning, "observedGeneration": 1}
    )
    health, message = run_health(obj)
    needs_a_human = reason.warning and phase not in TERMINAL_PHASES
    assert health == ("Degraded" if needs_a_human else PHASE_HEALTH[phase]), f"{phase}/{reason}: {message}"
    if health == "Degraded":
        assert str(reason) in message


def test_argocd_cm_patch_embeds_the_script() -> None:
    """examples/argocd/argocd-cm.yaml carries the script verbatim (hack/argocd/render-argocd-cm.sh)."""
    patch = yaml.safe_load(CM_PATCH.read_text())
    embedded = patch["data"][HEALTH_KEY]
    assert embedded.strip() == SCRIPT.read_text().strip()
    # And the embedded copy is a working script on its own.
    assert run_health(ftj({"phase": "Succeeded", "observedGeneration": 1}), script=embedded)[0] == "Healthy"
