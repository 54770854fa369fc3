"""The Argo CD resource actions (hack/argocd/actions/) run by a real Lua runtime.

Argo CD runs ``discovery.lua`` with the live FineTuneJob as the global ``obj`` to build the
Actions menu ({name = {disabled = ...}}), then the chosen ``<name>/action.lua``, which returns the
object to patch the live one with. lupa runs them the same way; the object Argo CD would patch
with is then applied to the real kube-apiserver, so the changed field is one the CRD accepts (and
an un-cancel is one it refuses).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

from kubetune_api.reasons import TERMINAL_PHASES, Phase

from .test_argocd_health import CM_PATCH, ftj

REPO_ROOT = Path(__file__).resolve().parents[2]
ACTIONS_DIR = REPO_ROOT / "hack" / "argocd" / "actions"
ACTIONS_KEY = "resource.customizations.actions.kubetune.dev_FineTuneJob"
ACTIONS = ("suspend", "resume", "cancel")


def _to_python(value: Any) -> Any:
    """A Lua table back as JSON-like Python (sequences as lists), as Argo CD turns it into JSON."""
    if type(value).__name__ != "_LuaTable":
        return value
    items = dict(value.items())
    if items and all(isinstance(k, int) for k in items) and sorted(items) == list(range(1, len(items) + 1)):
        return [_to_python(items[i]) for i in sorted(items)]
    return {str(k): _to_python(v) for k, v in items.items()}


def run_lua(script: str, obj: dict[str, Any]) -> Any:
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(copy.deepcopy(obj), recursive=True)
    return _to_python(lua.execute(script))


def discovery_script() -> str:
    return (ACTIONS_DIR / "discovery.lua").read_text()


def action_script(name: str) -> str:
    return (ACTIONS_DIR / name / "action.lua").read_text()


def offered(obj: dict[str, Any], script: str | None = None) -> set[str]:
    """The actions the menu offers enabled."""
    found = run_lua(script or discovery_script(), obj)
    if found == []:  # an empty Lua table
        return set()
    assert isinstance(found, dict), found
    assert set(found) <= set(ACTIONS), found
    return {name for name, meta in found.items() if not meta.get("disabled")}


def with_spec(obj: dict[str, Any], **spec: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["spec"].update(spec)
    return out


@pytest.mark.parametrize(
    ("phase", "spec", "want"),
    [
        (None, {}, {"suspend", "cancel"}),
        (None, {"suspend": True}, {"resume", "cancel"}),
        ("Pending", {"suspend": False}, {"suspend", "cancel"}),
        ("Queued", {}, {"suspend", "cancel"}),
        ("Running", {"suspend": False}, {"suspend", "cancel"}),
        ("Suspended", {"suspend": True}, {"resume", "cancel"}),
        # spec.suspend edited, status not caught up: the spec decides (what the action would change).
        ("Running", {"suspend": True}, {"resume", "cancel"}),
        ("Succeeded", {}, set()),
        ("Failed", {"suspend": True}, set()),
        ("Cancelled", {"cancel": True}, set()),
        # Cancel requested, the operator not there yet: nothing more to do, least of all resume.
        ("Running", {"cancel": True, "suspend": True}, set()),
    ],
)
def test_discovery_offers_the_actions_of_the_phase(
    phase: str | None, spec: dict[str, Any], want: set[str]
) -> None:
    obj = with_spec(ftj(None if phase is None else {"phase": phase, "observedGeneration": 1}), **spec)
    assert offered(obj) == want


def test_every_ended_phase_offers_nothing() -> None:
    for phase in TERMINAL_PHASES:
        assert offered(ftj({"phase": str(phase)})) == set(), phase
    assert {str(p) for p in TERMINAL_PHASES} == {"Succeeded", "Failed", "Cancelled"}


def test_discovery_lists_every_action_for_a_live_job_with_a_name_and_icon() -> None:
    found = run_lua(discovery_script(), ftj({"phase": str(Phase.RUNNING)}))
    assert set(found) == set(ACTIONS)
    for meta in found.values():
        assert meta["iconClass"].startswith("fa ")
        assert meta["displayName"]


@pytest.mark.parametrize(
    ("action", "start", "changed"),
    [
        ("suspend", {"suspend": False}, {"suspend": True}),
        ("resume", {"suspend": True}, {"suspend": False}),
        ("cancel", {"suspend": False}, {"cancel": True}),
        ("cancel", {"suspend": True}, {"cancel": True}),
    ],
)
def test_each_action_changes_only_its_field(
    action: str, start: dict[str, Any], changed: dict[str, Any]
) -> None:
    before = with_spec(ftj({"phase": "Running", "observedGeneration": 1}), **start)
    after = run_lua(action_script(action), before)
    expected = with_spec(before, **changed)
    assert after == expected


def test_an_action_on_an_object_without_spec_sets_the_field() -> None:
    bare = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}}
    assert run_lua(action_script("cancel"), bare)["spec"] == {"cancel": True}


def test_argocd_cm_patch_embeds_the_actions_verbatim() -> None:
    """examples/argocd/argocd-cm.yaml carries discovery.lua and every action.lua, in Argo CD's format."""
    data = yaml.safe_load(CM_PATCH.read_text())["data"]
    actions = yaml.safe_load(data[ACTIONS_KEY])
    assert set(actions) == {"discovery.lua", "definitions"}
    assert actions["discovery.lua"].strip() == discovery_script().strip()
    assert [d["name"] for d in actions["definitions"]] == list(ACTIONS)
    for definition in actions["definitions"]:
        assert set(definition) == {"name", "action.lua"}
        assert definition["action.lua"].strip() == action_script(definition["name"]).strip()
    # The embedded copies work on their own.
    assert offered(ftj({"phase": "Suspended"}) | {"spec": {"suspend": True}}, actions["discovery.lua"]) == {
        "resume",
        "cancel",
    }


@pytest.mark.cluster
def test_the_action_results_are_what_the_api_server_takes(local_env: Any, namespace: str) -> None:
    """Each action's object, applied as Argo CD patches the live one: suspend, resume and cancel are
    accepted, and a resume after the cancel does not undo it (un-cancelling is refused)."""
    from kubetune_api import coordinates
    from kubetune_api.crd import CRD_FILE
    from kubetune_operator.kube import FINETUNEJOBS, Kube, KubeError

    local_env.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / CRD_FILE))
    local_env.wait_established(coordinates.CRD_NAME)
    kube = Kube.connect(local_env.kubeconfig)
    spec = {
        "model": {"source": "s3://models/tiny-llama"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://results/run-1"},
        "resources": {"gpus": 0},
    }
    body = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "acts", "namespace": namespace},
        "spec": spec,
    }
    live = kube.create(body)
    for action, field, value in (
        ("suspend", "suspend", True),
        ("resume", "suspend", False),
        ("cancel", "cancel", True),
    ):
        wanted = run_lua(action_script(action), live)
        live = kube.patch(FINETUNEJOBS, namespace, "acts", {"spec": {field: wanted["spec"][field]}})
        assert live["spec"][field] is value, action
    assert offered(live) == set()
    uncancel = with_spec(live, cancel=False)
    with pytest.raises(KubeError) as refused:
        kube.patch(FINETUNEJOBS, namespace, "acts", {"spec": {"cancel": uncancel["spec"]["cancel"]}})
    assert "create a new FineTuneJob" in refused.value.message
