"""Reading dataset files and checking records: pure Python, no model, no S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_api.spec import DatasetSpec, FieldMapping
from kubetune_trainer.datafiles import read_records
from kubetune_trainer.dataset import DataFiles, percentile, summarize_lengths, validate
from kubetune_trainer.errors import InvalidDataError
from kubetune_trainer.formats import check_record, detect_format, split_last_assistant_turn, to_example

from .conftest import alpaca_records, chat_records, to_jsonl

FIELDS = FieldMapping()


def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_jsonl_records_keep_their_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.jsonl", '{"text": "a"}\n\n{"text": "b"}\n')
    result = read_records(path)
    assert [r.where for r in result.records] == ["train.jsonl line 1", "train.jsonl line 3"]
    assert result.problems == []


def test_jsonl_with_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    """json.dumps(ensure_ascii=False) leaves U+2028, U+0085 and friends raw: JSONL lines end at \\n only."""
    texts = ["a\u2028b", "c\x85d", "e\x1cf\x0cg"]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    path = _write(tmp_path, "train.jsonl", "\r\n".join(lines) + "\n")
    result = read_records(path)
    assert result.problems == []
    assert [(r.where, r.data["text"]) for r in result.records] == [
        (f"train.jsonl line {n}", text) for n, text in enumerate(texts, start=1)
    ]


def test_json_array_elements_keep_their_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.json", '[\n  {"text": "a"},\n\n  {"text": "b"}\n]\n')
    result = read_records(path)
    assert [(r.where, r.data["text"]) for r in result.records] == [
        ("train.json line 2", "a"),
        ("train.json line 4", "b"),
    ]


def test_csv_rows_are_numbered_by_their_first_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.csv", 'prompt,completion\n"multi\nline",x\nhello,world\n')
    result = read_records(path)
    assert [r.where for r in result.records] == ["train.csv line 2", "train.csv line 4"]
    assert result.records[0].data == {"prompt": "multi\nline", "completion": "x"}


def test_parquet_rows_are_read(tmp_path: Path) -> None:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(alpaca_records(3)), path)
    result = read_records(path)
    assert [r.where for r in result.records] == [
        "train.parquet row 1",
        "train.parquet row 2",
        "train.parquet row 3",
    ]
    assert result.records[0].data["instruction"] == "name the color after"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": [], "text": "x"}, "chat"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"text": "a"}, "text"),
        ({"question": "a"}, None),
    ],
)
def test_detect_format(record: dict[str, object], expected: str | None) -> None:
    assert detect_format(record, FIELDS) == expected


def test_field_mapping_renames_columns() -> None:
    fields = FieldMapping(instruction="q", output="a")
    record = {"q": "what", "a": "that"}
    assert detect_format(record, fields) == "alpaca"
    assert check_record("alpaca", record, fields) == []
    assert to_example("alpaca", record, fields)["completion"] == [{"role": "assistant", "content": "that"}]


@pytest.mark.parametrize(
    ("fmt", "record", "problem"),
    [
        ("alpaca", {"instruction": "a"}, "missing 'output'"),
        ("alpaca", {"instruction": "a", "output": 3}, "field 'output' must be a string, got int"),
        ("alpaca", {"instruction": " ", "output": "b"}, "field 'instruction' is empty"),
        ("prompt_completion", {"prompt": "a", "completion": ""}, "field 'completion' is empty"),
        ("text", {"text": None}, "field 'text' must be a string, got NoneType"),
        ("chat", {"messages": "nope"}, "field 'messages' is not a JSON list of messages"),
        ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "field 'messages[0].role' must be one of"),
        ("chat", {"messages": [{"role": "user", "content": "x"}]}, "has no assistant message"),
        (
            "chat",
            {"messages": [{"role": "assistant", "content": 1}]},
            "field 'messages[0].content' must be a string",
        ),
    ],
)
def test_check_record_names_the_field(fmt: str, record: dict[str, object], problem: str) -> None:
    problems = check_record(fmt, record, FIELDS)  # type: ignore[arg-type]
    assert any(problem in p for p in problems), problems


def test_alpaca_becomes_a_conversational_prompt_completion() -> None:
    example = to_example("alpaca", {"instruction": "add", "input": "1 2", "output": "3"}, FIELDS)
    assert example == {
        "prompt": [{"role": "user", "content": "add\n\n1 2"}],
        "completion": [{"role": "assistant", "content": "3"}],
    }


def test_chat_split_keeps_the_last_assistant_turn_as_completion() -> None:
    messages = chat_records(1)[0]["messages"] + [
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "last"},
    ]
    split = split_last_assistant_turn(messages)
    assert split["completion"] == [{"role": "assistant", "content": "last"}]
    assert len(split["prompt"]) == 3


def test_validate_lists_first_problems_and_counts_all(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in alpaca_records(5)]
    lines[1] = json.dumps({"instruction": "x"})
    lines[3] = "{not json"
    lines.append(json.dumps({"instruction": "x", "output": 5}))
    path = _write(tmp_path, "train.jsonl", "\n".join(lines) + "\n")
    spec = DatasetSpec(train="s3://bucket/train.jsonl", max_reported_errors=2)
    with pytest.raises(InvalidDataError) as info:
        validate(spec, DataFiles(train=path, validation=None))
    err = info.value
    assert err.total == 3
    assert err.problems == [
        "train.jsonl line 4: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        "train.jsonl line 2: missing 'output'",
    ]
    assert "and 1 more problem" in str(err)


def test_validate_detects_the_format_and_converts(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.jsonl", to_jsonl(chat_records(4)))
    data = validate(DatasetSpec(train="s3://bucket/train.jsonl"), DataFiles(train=path, validation=None))
    assert data.format == "chat"
    assert len(data.train) == 4
    assert data.train[0]["messages"][1]["role"] == "assistant"


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.jsonl", to_jsonl([{"text": "hello", "prompt": "p", "completion": "c"}]))
    data = validate(DatasetSpec(train="s3://bucket/train.jsonl", format="text"), DataFiles(path, None))
    assert data.format == "text"
    assert data.train == [{"text": "hello"}]


def test_token_length_summary() -> None:
    stats = summarize_lengths([5, 1, 9, 3, 7, 20], max_length=8)
    assert (stats.p50, stats.p95, stats.max, stats.truncated, stats.records) == (5, 20, 20, 2, 6)
    assert percentile([], 50) == 0
