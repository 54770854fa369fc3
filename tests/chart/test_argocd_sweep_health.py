"""The Argo CD health check for FineTuneSweeps (hack/argocd/finetunesweep-health.lua), run by a
real Lua runtime (lupa) the way Argo CD calls it: the sweep as the global ``obj``, ``{status,
message}`` back. The statuses come from the operator's own status computation
(kubetune_operator.sweep.compute), so a new phase or reason the operator writes and the script
does not know fails here.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

from kubetune_api.sweep import KIND, FineTuneSweepSpec
from kubetune_api.sweep_reasons import SweepPhase, SweepReason
from kubetune_operator import sweep

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "hack" / "argocd" / "finetunesweep-health.lua"
CM_PATCH = REPO_ROOT / "examples" / "argocd" / "argocd-cm.yaml"
HEALTH_KEY = f"resource.customizations.health.kubetune.dev_{KIND}"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
LR = "training.learningRate"

Obj = dict[str, Any]


def run_health(obj: Obj | None, script: str | None = None) -> tuple[str, str]:
    """Evaluate the health script for ``obj``; return (status, message)."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = None if obj is None else lua.table_from(obj, recursive=True)
    result = lua.execute(script if script is not None else SCRIPT.read_text())
    return str(result["status"]), str(result["message"] or "")


def sweep_spec(max_trials: int = 2) -> FineTuneSweepSpec:
    return FineTuneSweepSpec.model_validate(
        {
            "template": {
                "model": {"source": "s3://models/tiny-llama"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://results/sweep"},
            },
            "searchSpace": [{"path": LR, "low": 1e-5, "high": 1e-1, "log": True}],
            "objective": {"metric": "loss"},
            "maxTrials": max_trials,
        }
    )


def body(status: Obj | None = None, generation: int = 1) -> Obj:
    obj: Obj = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": KIND,
        "metadata": {"name": "s", "namespace": "ml", "uid": "u-1", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


def trial(number: int, state: str, value: float | None = None) -> Obj:
    out: Obj = {
        "number": number,
        "name": f"s-{number}",
        "parameters": {LR: 1e-3 * (number + 1)},
        "state": state,
    }
    if value is not None:
        out["value"] = value
    return out


def computed(trials: list[Obj], **kwargs: Any) -> Obj:
    """The status the operator writes for these trials, on the sweep it writes it to."""
    spec = None if kwargs.pop("no_spec", False) else sweep_spec()
    return body(sweep.compute(body(), spec, trials, NOW, **kwargs))


OPERATOR_SAMPLES: list[tuple[str, Obj, str, str]] = [
    (
        "first trial created",
        computed([trial(0, "Running")]),
        "Progressing",
        "Running (0/2 trials ended, 1 running)",
    ),
    (
        "one trial ended, best so far",
        computed([trial(0, "Succeeded", 0.7), trial(1, "Running")]),
        "Progressing",
        "Running (1/2 trials ended, 1 running, best 0.7)",
    ),
    (
        "every trial ended",
        computed([trial(0, "Succeeded", 0.7), trial(1, "Pruned")]),
        "Healthy",
        "Best trial s-0: 0.7",
    ),
    (
        "a failed or pruned trial is not a failed sweep",
        computed([trial(0, "Failed"), trial(1, "Succeeded", 0.3)]),
        "Healthy",
        "Best trial s-1: 0.3",
    ),
    (
        "no trial reported the objective",
        computed([trial(0, "Failed"), trial(1, "Pruned")]),
        "Degraded",
        "AllTrialsFailed: none of the 2 trials reported the objective",
    ),
    (
        "the template refuses the search space",
        computed([], no_spec=True, invalid="searchSpace lora.r: not an integer"),
        "Degraded",
        "InvalidSearchSpace: searchSpace lora.r: not an integer",
    ),
    (
        "the API server refuses a trial",
        computed([trial(0, "Succeeded", 0.7)], refused="creating trial s-1: exceeded quota"),
        "Degraded",
        "Running: TrialRefused: creating trial s-1: exceeded quota",
    ),
]

HAND_SAMPLES: list[tuple[str, Obj, str, str]] = [
    ("no status yet", body(), "Progressing", "Waiting for the kubetune operator"),
    ("empty status", body({}), "Progressing", "Waiting for the kubetune operator"),
    (
        "maxTrials raised, not yet observed",
        body({"phase": "Succeeded", "observedGeneration": 1}, generation=2),
        "Progressing",
        "observe generation 2",
    ),
    (
        "failed with status reason only",
        body({"phase": "Failed", "observedGeneration": 1, "reason": "AllTrialsFailed"}),
        "Degraded",
        "AllTrialsFailed",
    ),
    ("failed without any detail", body({"phase": "Failed"}), "Degraded", "FineTuneSweep failed"),
    ("succeeded without a best trial", body({"phase": "Succeeded"}), "Healthy", "FineTuneSweep succeeded"),
    ("running without counts", body({"phase": "Running"}), "Progressing", "Running"),
    ("unknown phase", body({"phase": "Exploding"}), "Unknown", "Exploding"),
]


@pytest.mark.parametrize(
    ("sample", "obj", "want_status", "want_message"),
    OPERATOR_SAMPLES + HAND_SAMPLES,
    ids=[s[0] for s in OPERATOR_SAMPLES + HAND_SAMPLES],
)
def test_health_of_sample(sample: str, obj: Obj, want_status: str, want_message: str) -> None:
    status, message = run_health(obj)
    assert status == want_status, f"{sample}: got {status} ({message})"
    assert want_message in message, f"{sample}: message {message!r} lacks {want_message!r}"


def test_missing_object() -> None:
    assert run_health(None) == ("Missing", "FineTuneSweep not found")


def test_script_knows_exactly_the_phases_of_the_enum() -> None:
    named = set(re.findall(r'phase == "(\w+)"', SCRIPT.read_text()))
    assert named == {str(phase) for phase in SweepPhase}


def test_script_knows_exactly_the_warning_reasons_of_running_sweeps() -> None:
    """NEEDS_A_HUMAN is the set of warning reasons the operator writes with phase Running."""
    match = re.search(r"local NEEDS_A_HUMAN = \{(.*?)\}", SCRIPT.read_text(), re.S)
    assert match, "the script has no NEEDS_A_HUMAN table"
    listed = set(re.findall(r"(\w+) = true", match.group(1)))
    warning = {str(r): r.warning for r in SweepReason}
    written = [s[1]["status"] for s in OPERATOR_SAMPLES]
    running_warnings = {s["reason"] for s in written if s["phase"] == "Running" and warning[s["reason"]]}
    status_reasons = {s["reason"] for s in written}
    # The samples reach every reason the status carries (the rest are Events only).
    assert status_reasons == {str(r) for r in SweepReason} - {"TrialCreated", "TrialPruned", "TrialEnded"}
    assert listed == running_warnings


def test_argocd_cm_patch_embeds_the_script() -> None:
    """examples/argocd/argocd-cm.yaml carries the script verbatim (hack/argocd/render-argocd-cm.sh)."""
    patch = yaml.safe_load(CM_PATCH.read_text())
    embedded = patch["data"][HEALTH_KEY]
    assert embedded.strip() == SCRIPT.read_text().strip()
    assert run_health(OPERATOR_SAMPLES[2][1], script=embedded) == ("Healthy", "Best trial s-0: 0.7")
