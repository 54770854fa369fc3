"""Reading dataset files and checking records: pure Python, no model, no S3."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path
from typing import get_args

import pytest

from kubetune_api.spec import DatasetFormat, DatasetSpec, FieldMapping, data_formats
from kubetune_trainer.datafiles import read_records
from kubetune_trainer.dataset import DataFiles, percentile, summarize_lengths, validate
from kubetune_trainer.errors import InvalidDataError
from kubetune_trainer.formats import (
    DETECTION_ORDER,
    ConcreteFormat,
    check_record,
    detect_format,
    split_last_assistant_turn,
    to_example,
)

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


SFT = data_formats("sft", "causal-lm")
KTO = data_formats("kto", "causal-lm")
KTO_RECORD = {"prompt": "p", "completion": "c", "label": True}


@pytest.mark.parametrize(
    ("record", "wanted", "expected"),
    [
        (KTO_RECORD, (), "unpaired_preference"),
        (KTO_RECORD, SFT, "unpaired_preference"),  # a boolean label: never SFT on bad completions
        (KTO_RECORD, KTO, "unpaired_preference"),
        ({**KTO_RECORD, "label": "spam"}, SFT, "prompt_completion"),  # as before KTO existed
        ({**KTO_RECORD, "label": "spam"}, (), "prompt_completion"),
        ({**KTO_RECORD, "label": "true"}, KTO, "unpaired_preference"),  # then told what to write
        ({"prompt": "p", "completion": "c"}, KTO, "prompt_completion"),
        ({"prompt": [], "completion": [], "label": False}, (), "unpaired_preference"),
    ],
)
def test_detection_prefers_what_the_run_trains_on(
    record: dict[str, object], wanted: tuple[str, ...], expected: str
) -> None:
    assert detect_format(record, FIELDS, wanted) == expected


def test_every_dataset_format_is_a_concrete_one_but_auto() -> None:
    assert set(get_args(ConcreteFormat)) == set(get_args(DatasetFormat)) - {"auto"}
    assert set(get_args(ConcreteFormat)) == set(DETECTION_ORDER)


def test_unpaired_records_become_kto_rows_as_text_or_chat() -> None:
    fields = FieldMapping(label="desirable", completion="answer")
    text = {"prompt": "after red comes", "answer": " green", "desirable": False}
    assert check_record("unpaired_preference", text, fields) == []
    assert to_example("unpaired_preference", text, fields) == {
        "prompt": "after red comes",
        "completion": " green",
        "label": False,
    }
    user = [{"role": "user", "content": "what follows red"}]
    answer = [{"role": "assistant", "content": "green"}]
    chat = {"prompt": user, "answer": json.dumps(answer), "desirable": True}  # a CSV cell holds JSON
    assert check_record("unpaired_preference", chat, fields) == []
    assert to_example("unpaired_preference", chat, fields) == {
        "prompt": user,
        "completion": answer,
        "label": True,
    }


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"prompt": "p", "completion": "c"}, "missing 'label'"),
        (
            {"prompt": "p", "completion": "c", "label": "false"},
            "must be true or false, not the string 'false'",
        ),
        ({"prompt": "p", "completion": "c", "label": None}, "field 'label' must be true or false, got null"),
        ({"prompt": "p", "completion": " ", "label": True}, "field 'completion' is empty"),
        ({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}], "label": True}, "is text"),
        (
            {
                "prompt": [{"role": "user", "content": "p"}],
                "completion": [{"role": "user", "content": "c"}],
                "label": 1,
            },
            "field 'completion' has no assistant message to learn from",
        ),
    ],
)
def test_unpaired_record_problems_name_the_field(record: dict[str, object], problem: str) -> None:
    problems = check_record("unpaired_preference", record, FIELDS)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("fmt", "record", "problem"),
    [
        ("alpaca", {"instruction": "a"}, "missing 'output'"),
        ("alpaca", {"instruction": "a", "output": 3}, "field 'output' must be a string, got a number"),
        ("alpaca", {"instruction": " ", "output": "b"}, "field 'instruction' is empty"),
        ("prompt_completion", {"prompt": "a", "completion": ""}, "field 'completion' is empty"),
        ("text", {"text": None}, "field 'text' must be a string, got null"),
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
        "train.jsonl line 4: not valid JSON "
        "(a field name must be in double quotes (or a comma is left before }), at column 2)",
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


@pytest.mark.parametrize(
    ("line", "plain"),
    [
        ('{"text": "a" "b"}', "a comma or a closing } or ] is missing after a value, at column 14"),
        ('{"text": "abc', "a string is not closed (it opens at column 10)"),
        ('{"text" 1}', "a colon is missing after a field name, at column 9"),
        ('{"text": tru}', "a value is missing or not JSON (strings need double quotes), at column 10"),
        ('{"text": "a\tb"}', "a raw tab or line break inside a string (write \\t or \\n), at column 12"),
        ('{"text": "\\q"}', "a backslash starts an unknown escape (write \\\\ for one), at column 11"),
        ('{"text": "\\u12"}', "a \\u escape needs 4 hex digits, at column 12"),
        (
            '{"text": "a"} {"text": "b"}',
            "more than one JSON value (one record per line), the next at column 15",
        ),
    ],
)
def test_json_errors_are_said_in_plain_words(tmp_path: Path, line: str, plain: str) -> None:
    """Not the parser's own words ("Expecting ',' delimiter"), and the column kept."""
    path = _write(tmp_path, "train.jsonl", '{"text": "ok"}\n' + line + "\n")
    assert read_records(path).problems == [f"train.jsonl line 2: not valid JSON ({plain})"]


def test_a_messages_cell_that_is_not_json_is_said_in_plain_words() -> None:
    problems = check_record("chat", {"messages": '[{"role": "user"'}, FIELDS)
    assert problems == [
        "field 'messages' is not a JSON list of messages "
        "(a comma or a closing } or ] is missing after a value, at column 17)"
    ]


def _zip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("train.jsonl", data)
    return buf.getvalue()


def _parquet(records: list[dict[str, object]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf)
    return buf.getvalue()


JSONL = to_jsonl(alpaca_records(50))


@pytest.mark.parametrize(
    ("name", "data", "said"),
    [
        (
            "train.jsonl",
            gzip.compress(JSONL),
            "is gzip-compressed: decompress it (gunzip) and upload the plain file",
        ),
        ("train.csv", gzip.compress(b"text\nhello\n"), "is gzip-compressed: decompress it"),
        (
            "train.jsonl",
            b"\x28\xb5\x2f\xfd" + bytes(range(256)),
            "is zstd-compressed: decompress it (zstd -d)",
        ),
        ("train.json", _zip(JSONL), "is a zip archive: extract the file from it and upload that"),
        ("train.jsonl", _parquet(alpaca_records(3)), "is a Parquet file: name it .parquet"),
    ],
    ids=["gzip", "gzip-csv", "zstd", "zip", "parquet-as-jsonl"],
)
def test_binary_files_are_named_once(tmp_path: Path, name: str, data: bytes, said: str) -> None:
    """Not one "invalid" line per line of compressed bytes: one message, naming the object."""
    path = _write(tmp_path, name, data)
    spec = DatasetSpec(train=f"s3://bucket/data/{name}")
    with pytest.raises(InvalidDataError) as info:
        validate(spec, DataFiles(train=path, validation=None))
    assert info.value.total == 1
    assert info.value.problems[0].startswith(f"s3://bucket/data/{name} {said}")


def test_compressed_file_types_say_to_decompress(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.jsonl.gz", gzip.compress(JSONL))
    with pytest.raises(
        InvalidDataError, match=r"unsupported file type '\.gz' \(compressed files are not read"
    ):
        read_records(path)


def test_a_csv_header_starting_with_par1_is_still_csv(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.csv", "PAR1,text\nx,hello\n")
    assert [r.data for r in read_records(path).records] == [{"PAR1": "x", "text": "hello"}]


ALPACA_FIELDS = "fields 'instruction' and 'output'"
BY_LINE_1 = f"line 1 made this file alpaca ({ALPACA_FIELDS})"


def test_mixed_formats_name_the_line_that_decided(tmp_path: Path) -> None:
    records: list[dict[str, object]] = [*alpaca_records(3), *chat_records(1), {"text": "t"}]
    path = _write(tmp_path, "train.jsonl", to_jsonl(records))
    with pytest.raises(InvalidDataError) as info:
        validate(DatasetSpec(train="s3://bucket/train.jsonl"), DataFiles(train=path, validation=None))
    assert info.value.problems == [
        f"train.jsonl line 4: a chat record (field 'messages'), but {BY_LINE_1}",
        f"train.jsonl line 5: a text record (field 'text'), but {BY_LINE_1}",
    ]


def test_mixed_formats_across_files_and_with_an_explicit_format(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    train = _write(tmp_path, "train.jsonl", to_jsonl(alpaca_records(2)))
    val = _write(tmp_path / "v", "train.jsonl", to_jsonl(chat_records(1)))  # the same name, in another folder
    spec = DatasetSpec(train="s3://bucket/train.jsonl", validation="s3://bucket/v/train.jsonl")
    with pytest.raises(InvalidDataError) as info:
        validate(spec, DataFiles(train=train, validation=val))
    assert info.value.problems == [
        "train.jsonl line 1: a chat record (field 'messages'), "
        f"but train.jsonl line 1 made this dataset alpaca ({ALPACA_FIELDS})"
    ]
    explicit = DatasetSpec(train="s3://bucket/v/train.jsonl", format="alpaca")
    with pytest.raises(InvalidDataError) as info:
        validate(explicit, DataFiles(train=val, validation=None))
    assert info.value.problems == [
        "train.jsonl line 1: a chat record (field 'messages'), "
        f"but dataset.format is alpaca ({ALPACA_FIELDS})"
    ]


def test_a_failing_record_of_no_known_format_keeps_its_field_problems(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.jsonl", to_jsonl([*alpaca_records(1), {"instruction": "x"}]))
    with pytest.raises(InvalidDataError) as info:
        validate(DatasetSpec(train="s3://bucket/train.jsonl"), DataFiles(train=path, validation=None))
    assert info.value.problems == ["train.jsonl line 2: missing 'output'"]
