"""Fuzzing the trainer's dataset validator (no S3, no model: the files are written locally).

Whatever the bytes, the validator either accepts them or raises InvalidDataError, never another
exception; every problem is one line naming the file and the line (or row), in plain words and
short enough that the first problems fit in a termination message; records written the way tools
write them are accepted and read back equal; and what it accepts, the trainer's next step
(``datasets.Dataset.from_list`` and the validation split) accepts too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import pytest
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st

from kubetune_api.spec import DatasetSpec, ModelSpec, OutputSpec
from kubetune_api.trainer import TrainerConfig
from kubetune_trainer.datafiles import read_records
from kubetune_trainer.dataset import DataFiles, ValidatedData, validate
from kubetune_trainer.errors import InvalidDataError
from kubetune_trainer.formats import ConcreteFormat, to_example
from kubetune_trainer.train import build_datasets

from .budget import examples
from .datasets import (
    BROKEN_LINES,
    FIELDS,
    FILE_BYTES,
    FORMATS,
    Record,
    csv_bytes,
    json_array,
    jsonl,
    records,
)

BUCKET = "s3://data/"
#: Words of Python or of its parsers, which a user should never have to read.
UNPLAIN = re.compile(
    r"got (NoneType|dict|str|int|float|bool|list)\b|Expecting|delimiter|utf-8-sig|\(char \d|Traceback"
    r"|Error\b|newline=''|Exceeds the limit|recursion|surrogates not allowed|codec"
)
#: Long enough for every message the validator writes (the longest lists the formats' fields).
MAX_PROBLEM = 400


@contextmanager
def dataset_file(name: str, data: bytes) -> Iterator[Path]:
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        yield path


def check_problems(problems: list[str], name: str, lines: int) -> None:
    """Each problem one short line in plain words, naming the file and a line that exists."""
    assert problems
    for problem in problems:
        assert len(problem.splitlines()) == 1, f"not one line: {problem!r}"
        assert "\r" not in problem, f"not one line: {problem!r}"
        assert len(problem) <= MAX_PROBLEM + len(name), f"{len(problem)} characters: {problem[:300]!r}..."
        assert not UNPLAIN.search(problem), f"not plain words: {problem!r}"
        located = re.match(rf"^{re.escape(name)} (line|row) (\d+): \S", problem)
        whole_file = problem.startswith((f"{BUCKET}{name} ", f"{name}: "))
        assert located or whole_file, f"names no file and line: {problem!r}"
        if located and located.group(1) == "line":
            assert 1 <= int(located.group(2)) <= lines, f"no line {located.group(2)} in {lines}: {problem!r}"


def trainer_takes(spec: DatasetSpec, data: ValidatedData) -> None:
    """The trainer's next step after validation accepts the examples (datasets and its split)."""
    config = TrainerConfig(
        model=ModelSpec(source="org/base"), dataset=spec, output=OutputSpec(uri="s3://out/run")
    )
    train, evaluation = build_datasets(config, data.train, data.validation)
    assert len(train) + (len(evaluation) if evaluation is not None else 0) == len(data.train)


def run_validator(name: str, data: bytes, spec: DatasetSpec) -> ValidatedData | None:
    """validate() on ``data``; None when refused (after checking how), the data when accepted."""
    with dataset_file(name, data) as path:
        try:
            return validate(spec, DataFiles(train=path, validation=None))
        except InvalidDataError as err:
            refused = err
    check_problems(refused.problems, name, data.count(b"\n") + 1)
    assert len(refused.problems) <= spec.max_reported_errors
    return None


@settings(max_examples=examples(250))
@given(
    fmt=st.sampled_from(FORMATS),
    data=st.data(),
    explicit=st.booleans(),
    split=st.sampled_from([0.0, 0.0, 0.1, 0.49]),
)
def test_valid_jsonl_is_read_back_as_written(
    fmt: ConcreteFormat, data: st.DataObject, explicit: bool, split: float
) -> None:
    rows: list[Record] = data.draw(st.lists(records(fmt), min_size=1, max_size=6), label="rows")
    raw = data.draw(jsonl(rows), label="file")
    with dataset_file("train.jsonl", raw) as path:
        read = read_records(path)
        assert read.problems == []
        assert [r.data for r in read.records] == rows
        text = raw.decode("utf-8").removeprefix("\ufeff").split("\n")
        for record in read.records:  # each record names the line it is on
            number = int(record.where.rsplit(" ", 1)[1])
            assert json.loads(text[number - 1]) == record.data
    spec = DatasetSpec(
        train=f"{BUCKET}train.jsonl", format=fmt if explicit else "auto", validation_split=split
    )
    result = run_validator("train.jsonl", raw, spec)
    if split > 0 and len(rows) < 2:  # nothing would be left to train on, or to evaluate
        assert result is None
        return
    assert result is not None
    assert result.format == fmt
    assert result.train == [to_example(fmt, row, FIELDS) for row in rows]
    trainer_takes(spec, result)


@settings(max_examples=examples(100))
@given(fmt=st.sampled_from(FORMATS), data=st.data(), layout=st.sampled_from(["json", "json-indented", "csv"]))
def test_valid_json_and_csv_are_read_back_as_written(
    fmt: ConcreteFormat, data: st.DataObject, layout: str
) -> None:
    if layout == "csv":
        rows = data.draw(st.lists(records(fmt, extra=False), min_size=1, max_size=4), label="rows")
        raw, name = csv_bytes(rows, data.draw(st.sampled_from(["\n", "\r\n"]))), "train.csv"
        # CSV cannot tell an empty cell from a missing one, and holds strings only.
        expected = [
            {
                k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                for k, v in r.items()
                if v != ""
            }
            for r in rows
        ]
    else:
        rows = data.draw(st.lists(records(fmt), min_size=1, max_size=4), label="rows")
        raw, name = json_array(rows, 2 if layout == "json-indented" else None), "train.json"
        expected = rows
    with dataset_file(name, raw) as path:
        read = read_records(path)
    assert read.problems == []
    assert [r.data for r in read.records] == expected
    spec = DatasetSpec(train=f"{BUCKET}{name}")
    result = run_validator(name, raw, spec)
    assert result is not None
    assert result.format == fmt
    trainer_takes(spec, result)


@settings(max_examples=examples(250))
@given(
    fmt=st.sampled_from(FORMATS),
    data=st.data(),
    explicit=st.booleans(),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_a_broken_line_is_named(
    fmt: ConcreteFormat, data: st.DataObject, explicit: bool, newline: str
) -> None:
    rows = data.draw(st.lists(records(fmt, extra=False), min_size=1, max_size=5), label="rows")
    at = data.draw(st.integers(min_value=0, max_value=len(rows)), label="at")
    assume(explicit or at > 0)  # with format auto, line 1 decides the format of every other line
    broken = data.draw(BROKEN_LINES, label="broken")
    assume(at > 0 or not broken.startswith("\ufeff"))  # a BOM that starts the file is the file's
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    lines.insert(at, broken)
    raw = newline.join(lines).encode("utf-8")
    spec = DatasetSpec(train=f"{BUCKET}train.jsonl", format=fmt if explicit else "auto")
    with dataset_file("train.jsonl", raw) as path, pytest.raises(InvalidDataError) as caught:
        validate(spec, DataFiles(train=path, validation=None))
    check_problems(caught.value.problems, "train.jsonl", len(lines))
    named = {
        int(m.group(1)) for p in caught.value.problems if (m := re.match(r"train\.jsonl line (\d+):", p))
    }
    assert named == {at + 1}, caught.value.problems


@settings(max_examples=examples(300))
@given(
    raw=FILE_BYTES,
    name=st.sampled_from(
        [
            "train.jsonl",
            "train.ndjson",
            "train.json",
            "train.csv",
            "train.parquet",
            "train.txt",
            "train.jsonl.gz",
        ]
    ),
    fmt=st.sampled_from(["auto", *FORMATS]),
)
@example(raw=b"[" * 100_000, name="train.jsonl", fmt="auto")
@example(raw=b"[" * 100_000, name="train.json", fmt="auto")
@example(raw=b'{"text": ' + b"9" * 5000 + b"}", name="train.jsonl", fmt="auto")
@example(raw=b'{"messages": "' + b"[" * 5000 + b'"}', name="train.csv", fmt="chat")
@example(raw=b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n', name="train.jsonl", fmt="auto")
@example(raw=b'{"text": "\\ud800"}\n{"text": "ok"}\n', name="train.jsonl", fmt="auto")
@example(raw=b'{"text": null}\n', name="train.jsonl", fmt="text")
@example(raw=b'{"messages": [{"role": null, "content": "x"}]}\n', name="train.jsonl", fmt="chat")
@example(raw=b'{"' + b"k" * 5000 + b'": 1}\n', name="train.jsonl", fmt="auto")
@example(raw=b'{"a\\nb": 1}\n', name="train.jsonl", fmt="auto")
@example(raw=b"text\n" + b'"' + b"x" * 200_000 + b'"\n', name="train.csv", fmt="text")
def test_any_bytes_are_refused_in_words_or_taken_by_the_trainer(raw: bytes, name: str, fmt: Any) -> None:
    spec = DatasetSpec(train=f"{BUCKET}{name}", format=fmt)
    result = run_validator(name, raw, spec)
    event("refused" if result is None else "accepted")
    if result is not None:
        trainer_takes(spec, result)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"[" * 100_000, "nested too deeply"),
        (b'{"text": ' + b"9" * 5000 + b"}", "number too long"),
        (b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n', "line 2: not valid JSON (a byte order mark"),
        (b'{"text": "\\ud800"}\n', "half of a surrogate pair"),
        (b'{"text": null}\n', "must be a string, got null"),
        (b"[1]\n", "record must be a JSON object, got a list"),
    ],
)
def test_problems_found_by_fuzzing_are_said_in_words(raw: bytes, words: str) -> None:
    spec = DatasetSpec(train=f"{BUCKET}train.jsonl", format="text")
    with dataset_file("train.jsonl", raw) as path, pytest.raises(InvalidDataError) as caught:
        validate(spec, DataFiles(train=path, validation=None))
    (problem,) = caught.value.problems
    assert words in problem, problem


def test_a_validation_split_needs_two_records() -> None:
    """datasets' train_test_split refuses to leave the training set empty: say so before training."""
    spec = DatasetSpec(train=f"{BUCKET}train.jsonl", validation_split=0.1)
    with (
        dataset_file("train.jsonl", b'{"text": "only one"}\n') as path,
        pytest.raises(InvalidDataError) as caught,
    ):
        validate(spec, DataFiles(train=path, validation=None))
    assert "validationSplit" in str(caught.value)
    with dataset_file("train.jsonl", b'{"text": "one"}\n{"text": "two"}\n') as path:
        trainer_takes(spec, validate(spec, DataFiles(train=path, validation=None)))


def test_a_huge_value_is_cut_short_in_the_message() -> None:
    role = "x" * 100_000
    raw = json.dumps({"messages": [{"role": role, "content": "a"}, {"role": "assistant", "content": "b"}]})
    spec = DatasetSpec(train=f"{BUCKET}train.jsonl", format="chat")
    with dataset_file("train.jsonl", raw.encode()) as path, pytest.raises(InvalidDataError) as caught:
        validate(spec, DataFiles(train=path, validation=None))
    (problem,) = caught.value.problems
    assert len(problem) < MAX_PROBLEM
    assert "messages[0].role" in problem
