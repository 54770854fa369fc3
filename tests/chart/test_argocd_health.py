"""The Argo CD health check (hack/argocd/finetunejob-health.lua) run by a real Lua runtime.

lupa embeds the Lua interpreter; the script gets the FineTuneJob as the global ``obj`` and
returns ``{status, message}``, exactly how Argo CD calls resource health scripts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "hack" / "argocd" / "finetunejob-health.lua"
CM_PATCH = REPO_ROOT / "examples" / "argocd" / "argocd-cm-health.yaml"
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
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
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
                "conditions": [cond("Running", "True", "PodRunning")],
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
                "conditions": [cond("Succeeded", "True", "TrainingComplete")],
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
                "conditions": [cond("Succeeded", "True", "Done", "ok")],
            }
        ),
        "Healthy",
        "Done: ok",
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
                "conditions": [cond("Suspended", "True", "SuspendedByUser", "spec.suspend is true")],
            }
        ),
        "Suspended",
        "SuspendedByUser: spec.suspend is true",
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


def test_phases_cover_the_crd_enum() -> None:
    """Every phase the CRD allows maps to a known Argo CD status (never Unknown)."""
    crd = yaml.safe_load((REPO_ROOT / "crds" / "kubetune.dev_finetunejobs.yaml").read_text())
    status_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    phases = status_schema["properties"]["phase"]["enum"]
    assert phases, "the CRD lists no phases"
    for phase in phases:
        status, message = run_health(ftj({"phase": phase, "observedGeneration": 1}))
        assert status in {"Healthy", "Progressing", "Degraded", "Suspended"}, (
            f"{phase} -> {status} ({message})"
        )


def test_argocd_cm_patch_embeds_the_script() -> None:
    """examples/argocd/argocd-cm-health.yaml carries the script verbatim (hack/argocd/render-argocd-cm.sh)."""
    patch = yaml.safe_load(CM_PATCH.read_text())
    embedded = patch["data"][HEALTH_KEY]
    assert embedded.strip() == SCRIPT.read_text().strip()
    # And the embedded copy is a working script on its own.
    assert run_health(ftj({"phase": "Succeeded", "observedGeneration": 1}), script=embedded)[0] == "Healthy"
