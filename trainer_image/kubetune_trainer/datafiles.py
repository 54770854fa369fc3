"""Read dataset files (jsonl, json, csv, parquet) into records that know where they came from.

Nothing here needs torch: a malformed file fails the job in a second, before
any model is loaded. Problems are collected (not raised one by one) so that one
run reports the first N of them, each as ``"<file> line <n>: <what>"``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api.base import json_kind

from .errors import InvalidDataError

SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Record:
    """One dataset row and its location (``"train.jsonl line 17"``)."""

    where: str
    data: dict[str, Any]


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


#: The start of json.JSONDecodeError's message -> what it means, in words a user can act on.
_JSON_ERRORS = (
    ("Expecting ',' delimiter", "a comma or a closing } or ] is missing after a value, at column {col}"),
    ("Expecting ':' delimiter", "a colon is missing after a field name, at column {col}"),
    (
        "Expecting property name",
        "a field name must be in double quotes (or a comma is left before }), at column {col}",
    ),
    ("Illegal trailing comma", "a comma is left before a closing } or ], at column {col}"),
    ("Expecting value", "a value is missing or not JSON (strings need double quotes), at column {col}"),
    ("Unterminated string", "a string is not closed (it opens at column {col})"),
    (
        "Invalid control character",
        "a raw tab or line break inside a string (write \\t or \\n), at column {col}",
    ),
    ("Invalid \\uXXXX escape", "a \\u escape needs 4 hex digits, at column {col}"),
    ("Invalid \\escape", "a backslash starts an unknown escape (write \\\\ for one), at column {col}"),
    ("Extra data", "more than one JSON value (one record per line), the next at column {col}"),
    (
        "Unexpected UTF-8 BOM",
        "a byte order mark (U+FEFF) starts the line, as when files are joined: remove it",
    ),
)

#: Leading bytes of binary files that are sometimes uploaded under a text name.
#: None of these formats is read compressed: ``.gz`` & co. are refused as file types.
_MAGIC = (
    (b"\x1f\x8b", "is gzip-compressed: decompress it (gunzip) and upload the plain file"),
    (b"\x28\xb5\x2f\xfd", "is zstd-compressed: decompress it (zstd -d) and upload the plain file"),
    (b"\xfd7zXZ\x00", "is xz-compressed: decompress it (unxz) and upload the plain file"),
    (b"PK\x03\x04", "is a zip archive: extract the file from it and upload that"),
    (b"PAR1", "is a Parquet file: name it .parquet"),
)
_COMPRESSED_SUFFIXES = (".gz", ".zst", ".xz", ".bz2", ".zip")


def json_problem(exc: json.JSONDecodeError) -> str:
    """``"a colon is missing after a field name, at column 9"``: the parser's complaint in plain words."""
    plain = next((words for prefix, words in _JSON_ERRORS if exc.msg.startswith(prefix)), None)
    if plain is None:  # a message this table does not know (a newer Python): its own words
        return f"{exc.msg}, at column {exc.colno}"
    return plain.replace("{col}", str(exc.colno))


class UnreadableJsonError(ValueError):
    """Text that is not JSON the trainer can use; ``str()`` says why in plain words."""


_DECODER = json.JSONDecoder()
_JSON_WHITESPACE = " \t\n\r"
#: A ``\uD800``-``\uDFFF`` escape: JSON, but only a pair of them is a character.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_lone_surrogates(value: Any) -> Any:
    """``value`` if every string in it is text (json.loads lets ``"\\ud800"`` through, and
    datasets/pyarrow refuse it later, after the model is loaded)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnreadableJsonError(
            "a \\uD800-\\uDFFF escape is half of a surrogate pair, not a character "
            "(write the character itself, or both halves of the pair)"
        ) from exc
    return value


def parse_json(text: str, start: int = 0) -> tuple[Any, int]:
    """The JSON value at ``text[start:]`` and where it ends, or :class:`UnreadableJsonError` in plain words.

    Beyond the parser's syntax errors (:func:`json_problem`): nesting deeper than Python's stack,
    integers longer than Python converts, and half surrogate pairs, which would otherwise escape
    as RecursionError, ValueError, or a UnicodeEncodeError in datasets.
    """
    try:
        value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise UnreadableJsonError(json_problem(exc)) from exc
    except RecursionError as exc:
        raise UnreadableJsonError(
            "nested too deeply (lists or objects inside each other, thousands deep)"
        ) from exc
    except ValueError as exc:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise UnreadableJsonError(
            "a number too long to read (thousands of digits): write it as a string"
        ) from exc
    if _SURROGATE_ESCAPE.search(text, start, end):
        _no_lone_surrogates(value)
    return value, end


def loads(text: str) -> Any:
    """:func:`json.loads` with :func:`parse_json`'s plain-words problems (whitespace around allowed)."""
    start = len(text) - len(text.lstrip(_JSON_WHITESPACE))
    if text.startswith("\ufeff", start):
        raise UnreadableJsonError(dict(_JSON_ERRORS)["Unexpected UTF-8 BOM"])
    value, end = parse_json(text, start)
    rest = text[end:]
    if rest.strip(_JSON_WHITESPACE):
        column = end + len(rest) - len(rest.lstrip(_JSON_WHITESPACE)) + 1
        raise UnreadableJsonError(
            f"more than one JSON value (one record per line), the next at column {column}"
        )
    return value


def shown(value: Any, limit: int = 40) -> str:
    """A value as a message quotes it: a string quoted on one line (escapes for line breaks) and cut
    at ``limit`` characters, anything else by its kind (a role that is a 100 kB string must not
    fill the termination message and hide every other problem)."""
    if not isinstance(value, str):
        return json_kind(value)
    quoted = repr(value[: limit + 1])
    return quoted if len(quoted) <= limit else quoted[:limit] + "…"


def _binary_kind(raw: bytes) -> str | None:
    for magic, what in _MAGIC:
        # Parquet ends in its magic too: a CSV whose header starts with "PAR1" is not one.
        if raw.startswith(magic) and (magic != b"PAR1" or raw.endswith(magic)):
            return what
    return None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _decode_utf8(name: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = raw[exc.start : exc.start + 1].hex()
        raise InvalidDataError(
            [f"{name} line {line}: not valid UTF-8 (byte 0x{bad} at column {column})"]
        ) from exc
    return text.removeprefix("\ufeff")


def _json_lines(name: str, text: str) -> ReadResult:
    result = ReadResult()
    # JSONL lines end at "\n" only: str.splitlines() also breaks at U+2028, U+0085, \x1c..., which
    # json.dumps(ensure_ascii=False) leaves raw inside strings. A trailing "\r" is JSON whitespace.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            value = loads(line)
        except UnreadableJsonError as exc:
            result.problems.append(f"{where}: not valid JSON ({exc})")
            continue
        if not isinstance(value, dict):
            result.problems.append(f"{where}: record must be a JSON object, got {json_kind(value)}")
            continue
        result.records.append(Record(where, value))
    return result


def _json_array(name: str, text: str) -> ReadResult:
    """A JSON array of objects, decoded element by element so each keeps its line number."""
    result = ReadResult()
    pos = text.index("[") + 1
    size = len(text)
    while True:
        while pos < size and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= size:
            result.problems.append(
                f"{name} line {_line_of(text, pos)}: not valid JSON (the array is not closed with ])"
            )
            return result
        if text[pos] == "]":
            break
        where = f"{name} line {_line_of(text, pos)}"
        try:
            value, pos = parse_json(text, pos)
        except UnreadableJsonError as exc:
            line = _line_of(text, getattr(exc.__cause__, "pos", pos))
            result.problems.append(f"{name} line {line}: not valid JSON ({exc})")
            return result  # cannot resynchronise inside a broken array
        if not isinstance(value, dict):
            result.problems.append(f"{where}: record must be a JSON object, got {json_kind(value)}")
            continue
        result.records.append(Record(where, value))
    if text[pos + 1 :].strip():
        result.problems.append(f"{name} line {_line_of(text, pos + 1)}: unexpected data after the JSON array")
    return result


#: The longest CSV cell read (the csv module's default, 128 KiB, would refuse a long document).
CSV_FIELD_LIMIT = 2**31 - 1


def _csv(name: str, text: str) -> ReadResult:
    result = ReadResult()
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return result
    except csv.Error as exc:
        result.problems.append(f"{name} line 1: invalid CSV header ({exc})")
        return result
    last_line = reader.line_num
    while True:
        start = last_line + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            result.problems.append(f"{name} line {start}: invalid CSV ({exc})")
            break
        last_line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        where = f"{name} line {start}"
        if len(row) != len(header):
            result.problems.append(f"{where}: expected {len(header)} columns, got {len(row)}")
            continue
        # An empty cell is a missing value: CSV cannot tell "" from null.
        data = {key: value for key, value in zip(header, row, strict=True) if value != ""}
        result.records.append(Record(where, data))
    return result


def _parquet(name: str, path: Path) -> ReadResult:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidDataError([f"{name} line 1: not a readable Parquet file ({exc})"]) from exc
    result = ReadResult()
    for number, row in enumerate(table.to_pylist(), start=1):
        data = {key: value for key, value in row.items() if value is not None}
        result.records.append(Record(f"{name} row {number}", data))
    return result


def read_records(path: Path, name: str | None = None, source: str | None = None) -> ReadResult:
    """Read ``path`` by its suffix; ``name`` is how line messages refer to the file.

    ``source`` (the object's URI) names the file in messages about the whole file.
    """
    name = name or path.name
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        hint = "compressed files are not read: decompress it; " if suffix in _COMPRESSED_SUFFIXES else ""
        raise InvalidDataError([f"{name}: unsupported file type {suffix!r} ({hint}supported: {supported})"])
    if suffix == ".parquet":
        result = _parquet(name, path)
    else:
        raw = path.read_bytes()
        # One message for the whole file: its bytes read as text would fail on every line.
        kind = _binary_kind(raw)
        if kind is not None:
            raise InvalidDataError([f"{source or name} {kind}"])
        text = _decode_utf8(name, raw)
        if suffix == ".csv":
            result = _csv(name, text)
        elif suffix == ".json" and text.lstrip().startswith("["):
            result = _json_array(name, text)
        else:
            result = _json_lines(name, text)
    if not result.records and not result.problems:
        raise InvalidDataError([f"{name} line 1: no records (the file is empty)"])
    return result
