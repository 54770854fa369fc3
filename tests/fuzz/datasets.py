"""Hypothesis strategies for dataset files: valid records of each format, and bytes that are not.

Text is drawn from all of Unicode (no lone surrogates: a UTF-8 file cannot hold one) with the
characters that break line-based readers mixed in often: U+2028/U+2029, U+0085 and the other
characters ``str.splitlines`` breaks at, CR, NUL, BOM, tabs.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from kubetune_api.spec import FieldMapping
from kubetune_trainer.formats import ROLES, ConcreteFormat

Strategy = st.SearchStrategy[Any]
Record = dict[str, Any]

FORMATS: tuple[ConcreteFormat, ...] = ("alpaca", "chat", "prompt_completion", "text")
FIELDS = FieldMapping()
FIELD_NAMES = {getattr(FIELDS, name) for name in FieldMapping.model_fields}

#: Where str.splitlines() breaks besides \n and \r; json.dumps(ensure_ascii=False) leaves them raw.
LINE_BREAKERS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"
AWKWARD = LINE_BREAKERS + '\r\n\t\x00\ufeff \u00a0\u200b\u202e\U0001f600é"\\{}[],:'
TEXT: Strategy = st.text(
    alphabet=st.characters(exclude_categories=["Cs"]) | st.sampled_from(AWKWARD), max_size=60
)
#: Text with something to learn: not only whitespace (the validator refuses an empty answer).
NONBLANK: Strategy = st.builds(
    lambda a, b, c: a + b + c, TEXT, st.characters(exclude_categories=["Cs", "Zs", "Cc"]), TEXT
).filter(lambda s: bool(s.strip()))
JSON_SCALARS: Strategy = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), TEXT
)
#: Any JSON value, nested a few levels.
JSON_VALUES: Strategy = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
#: Keys no format reads (so extra fields do not change the detected format).
EXTRA_KEYS: Strategy = TEXT.filter(lambda k: k not in FIELD_NAMES)


def _message(role: str) -> Strategy:
    content = NONBLANK if role == "assistant" else TEXT
    return st.fixed_dictionaries({"role": st.just(role), "content": content})


@st.composite
def _messages(draw: Callable[[Strategy], Any]) -> list[Record]:
    before = draw(st.lists(st.sampled_from(ROLES).flatmap(_message), max_size=4))
    after = draw(st.lists(st.sampled_from(ROLES).flatmap(_message), max_size=2))
    return [*before, draw(_message("assistant")), *after]


_SHAPES: dict[ConcreteFormat, Strategy] = {
    "alpaca": st.fixed_dictionaries(
        {FIELDS.instruction: NONBLANK, FIELDS.output: NONBLANK}, optional={FIELDS.input: TEXT}
    ),
    "chat": st.fixed_dictionaries({FIELDS.messages: _messages()}),
    "prompt_completion": st.fixed_dictionaries({FIELDS.prompt: NONBLANK, FIELDS.completion: NONBLANK}),
    "text": st.fixed_dictionaries({FIELDS.text: NONBLANK}),
}


def records(fmt: ConcreteFormat, extra: bool = True) -> Strategy:
    """A valid record of ``fmt`` (with fields no format reads, now and then)."""
    shape = _SHAPES[fmt]
    if not extra:
        return shape
    return st.builds(lambda r, x: {**x, **r}, shape, st.dictionaries(EXTRA_KEYS, JSON_VALUES, max_size=2))


@st.composite
def jsonl(draw: Callable[[Strategy], Any], rows: list[Record]) -> bytes:
    """``rows`` as JSON Lines the way tools write them: json.dumps(ensure_ascii=False) per line, with
    \\n or \\r\\n, maybe a BOM, blank lines, a missing final newline."""
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    lines = [json.dumps(row, ensure_ascii=draw(st.booleans())) for row in rows]
    out = []
    for line in lines:
        out.append(line)
        if draw(st.integers(min_value=0, max_value=9)) == 0:
            out.append(draw(st.sampled_from(["", " ", "\t", "\r"])))
    text = newline.join(out) + draw(st.sampled_from([newline, ""]))
    bom = "\ufeff" if draw(st.booleans()) else ""
    encoded: bytes = (bom + text).encode("utf-8")
    return encoded


def json_array(rows: list[Record], indent: int | None) -> bytes:
    return json.dumps(rows, ensure_ascii=False, indent=indent).encode("utf-8")


def csv_bytes(rows: list[Record], newline: str) -> bytes:
    """``rows`` as CSV with a header. With a \\n line terminator every cell is quoted: Python's writer
    would leave a lone \\r unquoted, which every reader (Python's too) takes as a line break."""
    header = sorted({key for row in rows for key in row})
    buffer = io.StringIO(newline="")
    if newline == "\n":
        writer = csv.DictWriter(buffer, fieldnames=header, lineterminator=newline, quoting=csv.QUOTE_ALL)
    else:
        writer = csv.DictWriter(buffer, fieldnames=header, lineterminator=newline)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v for k, v in row.items()}
        )
    return buffer.getvalue().encode("utf-8")


#: Lines that are not a valid record of any format.
BROKEN_LINES: Strategy = st.one_of(
    TEXT.filter(lambda s: not _parses(s)),
    st.builds(lambda r: json.dumps(r, ensure_ascii=False)[:-1], records("text", extra=False)),  # cut short
    st.builds(lambda v: json.dumps(v, ensure_ascii=False), JSON_SCALARS | st.lists(JSON_SCALARS, max_size=3)),
    st.builds(lambda v: json.dumps({FIELDS.text: v}), JSON_SCALARS.filter(lambda v: not isinstance(v, str))),
    st.builds(
        lambda v: json.dumps({FIELDS.messages: v}), JSON_VALUES.filter(lambda v: not isinstance(v, list))
    ),
    st.just('{"text": "a" "b"}'),
    st.just("{'text': 'single quotes'}"),
    st.just('{"text": "tab\there"}'),
    st.just('{"text": "\\x41"}'),
    st.just('{"text": "\\ud800"}'),  # half a surrogate pair: JSON, but no text
    st.just('{"text": "a",}'),
    st.just("[" * 5000 + "]" * 5000),
    st.just('{"text": ' + "9" * 5000 + "}"),
    st.just("\ufeff" + '{"text": "a"}'),  # a BOM in the middle of the file (two files concatenated)
    st.just('{"text": "a"} {"text": "b"}'),
    st.just('{"text": NaN}'),
).filter(lambda line: "\n" not in line and bool(line.strip()))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


#: Whole files that are not clean: random bytes, compressed and binary headers, valid files cut or
#: spliced, deep nesting, a huge line.
FILE_BYTES: Strategy = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda magic, rest: magic + rest,
        st.sampled_from([b"\x1f\x8b", b"PK\x03\x04", b"\x28\xb5\x2f\xfd", b"\xfd7zXZ\x00", b"PAR1"]),
        st.binary(max_size=50),
    ),
    st.lists(BROKEN_LINES, min_size=1, max_size=4).map(lambda lines: "\n".join(lines).encode("utf-8")),
    st.text(alphabet=st.characters(exclude_categories=["Cs"]) | st.sampled_from(AWKWARD), max_size=200).map(
        lambda t: t.encode("utf-8")
    ),
    st.builds(
        lambda b, i, j: b[:i] + b[j:],
        st.sampled_from(FORMATS)
        .flatmap(lambda f: st.lists(records(f), min_size=1, max_size=3))
        .map(lambda rows: "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8")),
        st.integers(0, 400),
        st.integers(0, 400),
    ),
    st.just(("[" * 100_000).encode()),
    st.just(('{"text": "' + "x" * 2_000_000 + '"}').encode()),
    st.just(b'{"text": "caf\xe9"}'),  # Latin-1, not UTF-8
)
