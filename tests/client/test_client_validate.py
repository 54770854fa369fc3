"""``kubetune validate``: the trainer's dataset validation on local files, no cluster, no upload."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kubetune_client import Exit, InvalidDatasetError, validate_files
from kubetune_client.cli import app
from kubetune_localenv import tinymodel


def _validate(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["validate", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _chat_file(path: Path, records: int = 6) -> Path:
    path.write_bytes(tinymodel.to_jsonl(tinymodel.chat_records(records)))
    return path


def test_a_good_file_passes_with_its_detected_format_and_counts(tmp_path: Path) -> None:
    train = _chat_file(tmp_path / "train.jsonl", 6)
    held_out = _chat_file(tmp_path / "validation.jsonl", 2)
    code, out, _ = _validate(str(train), "--validation", str(held_out))
    assert code == 0, out
    assert f"{train}: valid, 6 records + 2 validation, format chat" in out
    code, out, _ = _validate(str(train), "--format", "chat", "-o", "json")
    assert json.loads(out) == {"valid": True, "format": "chat", "trainRecords": 6, "validationRecords": 0}


def test_a_bad_record_is_named_by_file_line_and_field_with_the_trainers_exit_code(tmp_path: Path) -> None:
    good = tinymodel.to_jsonl(tinymodel.chat_records(4)).decode().splitlines()
    broken = [*good[:2], '{"messages": [{"role": "user"}]}', *good[2:], '{"messages": [oops]}']
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(broken) + "\n")
    code, out, err = _validate(str(train))
    assert code == Exit.INVALID_DATA, out + err  # the trainer's exit code for invalid data
    assert "train.jsonl line 3: field 'messages[0].content' must be a string" in err
    assert "train.jsonl line 6: not valid JSON" in err
    assert "valid," not in out


def test_the_format_flag_and_whole_file_problems_are_checked_like_the_trainer(tmp_path: Path) -> None:
    train = _chat_file(tmp_path / "train.jsonl")
    code, _, err = _validate(str(train), "--format", "alpaca")
    assert code == 42
    assert "train.jsonl line 1: a chat record" in err
    assert "dataset.format is alpaca" in err

    packed = tmp_path / "packed.jsonl"
    packed.write_bytes(gzip.compress(train.read_bytes()))
    code, _, err = _validate(str(packed))
    assert code == 42
    assert f"{packed} is gzip-compressed" in err

    code, _, err = _validate(str(tmp_path / "absent.jsonl"))
    assert code == 42
    assert "absent.jsonl: no such file" in err


def test_the_sdk_raises_the_same_problems(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("prompt,completion\nhello,world\nonly-a-prompt,\n")
    with pytest.raises(InvalidDatasetError, match=r"train\.csv line 3: .*'completion'"):
        validate_files(train)
