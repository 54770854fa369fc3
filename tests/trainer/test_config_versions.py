"""A trainer reading a config another operator version wrote (the rule: ``kubetune_api.trainer``).

This trainer plays the older one: a newer operator's config carries a ``kubetuneVersion`` above
:data:`KUBETUNE_VERSION`, and fields this trainer's models do not have. A field it does not know
is refused (exit 43, not retried), named by its path, with both versions and what to do; a
newer operator's config that uses no newer field reads as it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.exitcodes import ExitCode
from kubetune_api.spec import FineTuneJobSpec
from kubetune_api.trainer import KUBETUNE_VERSION, ReportingSpec, TrainerConfig
from kubetune_trainer.__main__ import _load_config
from kubetune_trainer.errors import InvalidConfigError

NEWER = "99.0.0"
SPEC = {
    "model": {"source": "s3://models/tiny"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "training": {"maxSteps": 12},
    "output": {"uri": "s3://out/job"},
}


def _operator_config(version: str = NEWER, **extra: Any) -> dict[str, Any]:
    """The config an operator of ``version`` writes; ``extra`` adds fields (by section) this trainer lacks."""
    config = TrainerConfig.from_spec(FineTuneJobSpec.model_validate(SPEC), ReportingSpec(name="job"))
    written: dict[str, Any] = json.loads(config.to_json())
    written["kubetuneVersion"] = version
    for section, fields in extra.items():
        if isinstance(fields, dict):
            written.setdefault(section, {}).update(fields)
        else:
            written[section] = fields
    return written


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _refusal(tmp_path: Path, config: dict[str, Any]) -> str:
    with pytest.raises(InvalidConfigError) as caught:
        _load_config(str(_write(tmp_path, config)))
    return str(caught.value)


def test_an_older_trainer_refuses_a_newer_field_naming_it_both_versions_and_the_fix(tmp_path: Path) -> None:
    term = tmp_path / "termination-log"
    config = _operator_config(training={"newThing": 3}, reporting={"terminationMessagePath": str(term)})
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(_write(tmp_path, config))],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == ExitCode.INVALID_CONFIG, proc.stderr
    summary = json.loads(term.read_text())
    assert summary["phase"] == "Failed"
    assert summary["reason"] == "InvalidConfigError"
    assert summary["exitCode"] == 43
    for text in (proc.stderr, summary["error"]):
        assert "field(s) this trainer does not know: training.newThing." in text
        assert f"written by kubetune operator {NEWER} and this trainer is version {KUBETUNE_VERSION}" in text
        assert "unset spec.image" in text
        assert f"pin a trainer image of version {NEWER} or later" in text
        assert "or unset spec.training.newThing in the FineTuneJob" in text


def test_every_unknown_field_is_named_by_its_path(tmp_path: Path) -> None:
    message = _refusal(
        tmp_path,
        _operator_config(training={"newThing": 1}, lora={"rank2": 4}, nodeRank=1),
    )
    assert "does not know: lora.rank2, training.newThing, nodeRank." in message
    # Only the spec's own sections can be unset in the FineTuneJob; the operator fills the rest.
    assert "unset spec.lora.rank2, spec.training.newThing in the FineTuneJob" in message
    assert "spec.nodeRank" not in message


def test_a_newer_operators_config_without_newer_fields_reads(tmp_path: Path) -> None:
    config = _load_config(str(_write(tmp_path, _operator_config())))
    assert config.kubetune_version == NEWER
    assert config.training.max_steps == 12
    assert config.training.learning_rate == TrainerConfig.model_fields["training"].default.learning_rate


def test_an_unknown_field_from_the_same_version_is_not_a_kubetune_field(tmp_path: Path) -> None:
    message = _refusal(tmp_path, _operator_config(KUBETUNE_VERSION, training={"learningRte": 0.1}))
    assert "does not know: training.learningRte." in message
    assert "the same version as this trainer, so they are not kubetune fields: remove them" in message
    assert "spec.image" not in message


def test_a_config_without_a_version_says_so(tmp_path: Path) -> None:
    config = _operator_config(training={"newThing": 1})
    del config["kubetuneVersion"]
    message = _refusal(tmp_path, config)
    assert f"records no operator version and this trainer is version {KUBETUNE_VERSION}" in message
    assert "pin a newer trainer image" in message


def test_other_problems_are_listed_after_the_unknown_fields(tmp_path: Path) -> None:
    message = _refusal(tmp_path, _operator_config(training={"newThing": 1, "maxSteps": "many"}))
    assert "does not know: training.newThing." in message
    assert "Also invalid:\n  training.maxSteps: Input should be a valid integer" in message


def test_other_errors_keep_their_message_and_note_a_version_difference(tmp_path: Path) -> None:
    newer = _refusal(tmp_path, _operator_config(method="dora"))
    assert newer.startswith(f"invalid config {tmp_path / 'config.json'}:\n")
    assert "method" in newer
    assert f"written by kubetune operator {NEWER} and this trainer is {KUBETUNE_VERSION}" in newer
    same = _refusal(tmp_path, _operator_config(KUBETUNE_VERSION, method="dora"))
    assert same.startswith("invalid config ")
    assert "written by" not in same
