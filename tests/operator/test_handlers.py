"""What kubetune_operator.handlers registers with kopf: event handlers only for FineTuneJobs, their
Jobs and Pods (so kopf keeps no state on a FineTuneJob), kopf's full set for FineTuneSweeps."""

from __future__ import annotations

import kopf

from kubetune_operator import handlers


def _ids(kind: str) -> set[str]:
    registry = kopf.get_default_registry()
    found: set[str] = set()
    for sub in (registry._watching, registry._changing, registry._spawning):
        found |= {
            str(h.id)
            for h in sub.get_all_handlers()
            if h.selector is not None and h.selector.any_name == kind
        }
    return found


def test_activities_and_handlers() -> None:
    activities = {str(h.id) for h in kopf.get_default_registry()._activities.get_all_handlers()}
    assert {"operator_login", "operator_startup", "operator_cleanup"} <= activities
    assert _ids("finetunejobs") == {"finetunejob_event", "sweep_trial_event"}
    assert _ids("jobs") == {"job_event"}
    assert _ids("pods") == {"pod_event"}
    assert _ids("finetunesweeps") == {
        "finetunesweep_create", "finetunesweep_resume", "finetunesweep_update/spec", "finetunesweep_event",
    }  # fmt: skip
    assert handlers.FTJ[2] == "finetunejobs"
