"""The CRD and docs/api.md are what the models generate, and the CRD is a complete, documented API.

``make crds`` writes the files; these tests fail when a committed copy is stale, and check what
the generator must always produce (descriptions everywhere, a message for every rule, the
status contract, the printer columns).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import coordinates
from kubetune_api.crd import CRD_FILE, finetunejob_crd
from kubetune_api.generated import generated_files
from kubetune_api.reasons import Phase, Reason
from kubetune_api.status import OPERATOR_FIELDS, Progress

REPO_ROOT = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def schema() -> Obj:
    root: Obj = finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return root


@pytest.mark.parametrize("relative", sorted(generated_files()))
def test_committed_file_is_what_the_models_generate(relative: str) -> None:
    committed = (REPO_ROOT / relative).read_text(encoding="utf-8")
    assert committed == generated_files()[relative], f"{relative} is stale: run `make crds`"


def test_check_mode_names_a_stale_file(tmp_path: Path) -> None:
    for relative, text in generated_files().items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text, encoding="utf-8")
    (tmp_path / CRD_FILE).write_text("# edited by hand\n", encoding="utf-8")
    command = [sys.executable, "-m", "kubetune_api", "--check", "--root", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert f"{CRD_FILE} differs from what the models generate" in proc.stderr
    assert "make crds" in proc.stderr
    subprocess.run([*command[:3], "--root", str(tmp_path)], check=True, capture_output=True)
    subprocess.run(command, check=True, capture_output=True)


def test_crd_is_one_plain_document_at_the_api_coordinates() -> None:
    documents = list(yaml.safe_load_all((REPO_ROOT / CRD_FILE).read_text()))
    assert len(documents) == 1
    crd = finetunejob_crd()
    assert crd["metadata"]["name"] == f"{coordinates.PLURAL}.{coordinates.GROUP}"
    assert crd["spec"]["names"]["kind"] == coordinates.KIND
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == coordinates.VERSION
    assert version["subresources"] == {"status": {}}


def _walk(node: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_every_field_is_typed_and_described(schema: Obj) -> None:
    nodes = [(path, node) for path, node in _walk(schema, "") if path != ".metadata"]
    undocumented = [p for p, n in nodes if p and not p.endswith(("[]", "{}")) and not n.get("description")]
    assert not undocumented, f"fields without a description: {undocumented}"
    untyped = [p for p, n in nodes if "type" not in n and not n.get("x-kubernetes-int-or-string")]
    assert not untyped, f"fields without a type (not structural): {untyped}"
    leftovers = [
        p for p, n in nodes if {"$ref", "title", "anyOf"} & set(n) and not n.get("x-kubernetes-int-or-string")
    ]
    assert not leftovers, f"JSON Schema leftovers a structural schema refuses: {leftovers}"


def test_every_cel_rule_has_a_message_and_every_section_is_immutable(schema: Obj) -> None:
    rules = [(p, r) for p, node in _walk(schema, "") for r in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 20
    assert all(rule.get("message") for _, rule in rules)
    spec = schema["properties"]["spec"]["properties"]
    editable = {"suspend", "cancel", "lifecycle", "image", "imagePullPolicy", "imagePullSecrets"}
    for key, section in spec.items():
        immutable = {
            "rule": "self == oldSelf",
            "message": f"{key} is immutable once the FineTuneJob is created",
        }
        assert (immutable in section.get("x-kubernetes-validations", [])) == (key not in editable), key


def test_status_contract(schema: Obj) -> None:
    props = schema["properties"]["status"]["properties"]
    assert set(props["progress"]["properties"]) == {f.alias for f in Progress.model_fields.values()}
    assert props["phase"]["enum"] == [str(phase) for phase in Phase]
    assert set(OPERATOR_FIELDS) == set(props) - {"progress"}
    conditions = props["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_printer_columns() -> None:
    (version,) = finetunejob_crd()["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [name for name, c in columns.items() if not c.get("priority")] == [
        "Phase",
        "Progress",
        "Loss",
        "Age",
    ]
    assert columns["Output"] == {
        "name": "Output",
        "type": "string",
        "priority": 1,
        "description": "Object-storage URI the adapter is written to.",
        "jsonPath": ".status.outputURI",
    }


def test_fractional_bound_is_a_cel_rule_not_an_openapi_maximum(schema: Obj) -> None:
    """The OpenAPI validator compares a whole-number value against an integer-truncated bound."""
    split = schema["properties"]["spec"]["properties"]["dataset"]["properties"]["validationSplit"]
    assert "maximum" not in split
    assert split["x-kubernetes-validations"] == [
        {"rule": "self < 0.5", "message": "dataset.validationSplit must be below 0.5"}
    ]


def test_api_reference_has_a_row_for_every_field_and_reason(schema: Obj) -> None:
    """Each spec field is a row (``spec.<field>`` on top, ``<section>.<field>`` in its section)."""
    reference = (REPO_ROOT / "docs" / "api.md").read_text()
    spec = schema["properties"]["spec"]["properties"]
    rows = []
    for key, section in spec.items():
        if "properties" not in section:
            rows.append(f"| `spec.{key}` |")
            continue
        assert f"### spec.{key}\n" in reference, key
        rows += [f"| `{key}.{field}` |" for field in section["properties"]]
    rows += [f"| `status.{key}` |" for key in schema["properties"]["status"]["properties"]]
    rows += [f"| `{reason}` |" for reason in Reason]
    missing = [row for row in rows if row not in reference]
    assert not missing, f"docs/api.md lacks {missing}: run `make crds`"
    assert len(rows) > 100
