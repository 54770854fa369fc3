"""Malformed datasets end the trainer with exit code 42 and a precise message, before any training.

Each case runs the real entrypoint as a subprocess against the real local S3
server. The base model is never uploaded: validation must fail before the
trainer even looks for it.
"""

from __future__ import annotations

import gzip
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from kubetune_api.exitcodes import ExitCode

from .conftest import TrainerRun, alpaca_records, chat_records, to_jsonl

pytestmark = pytest.mark.s3


def _parquet_bytes() -> bytes:
    return b"PAR1 this is not really parquet PAR1"


def _csv(rows: list[list[str]]) -> bytes:
    import csv

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


@dataclass
class Case:
    id: str
    files: dict[str, bytes]  # name under data/ -> content (not uploaded: missing object)
    expect: list[str]  # substrings of the error message
    train: str = "train.jsonl"
    dataset: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    objective: str | None = None  # spec.objective; None: the default (sft)
    spec: dict[str, Any] = field(default_factory=dict)  # other spec fields (task, classification)


GOOD = alpaca_records(4)


def pairs(n: int = 3) -> list[dict[str, Any]]:
    """Good text preference pairs (objective dpo)."""
    return [
        {"prompt": f"after {c} comes", "chosen": " green", "rejected": " blue"}
        for c in ("red", "black", "white")[:n]
    ]


CHAT_PAIR = {
    "prompt": [{"role": "user", "content": "what follows red"}],
    "chosen": [{"role": "assistant", "content": "green"}],
    "rejected": [{"role": "assistant", "content": "purple"}],
}

CLASSIFIER = {"task": "sequence-classification", "method": "lora"}

#: Good KTO records (objective kto): a desirable and an undesirable completion.
KTO_GOOD = [
    {"prompt": "after red comes", "completion": " green", "label": True},
    {"prompt": "after red comes", "completion": " purple", "label": False},
]

CASES = [
    Case(
        "invalid-json-line",
        {"train.jsonl": to_jsonl(GOOD[:1]) + b'{"instruction": "x", "output": \n' + to_jsonl(GOOD[1:])},
        ["train.jsonl line 2: not valid JSON (a value is missing or not JSON"],
    ),
    Case(
        "missing-field",
        {"train.jsonl": to_jsonl([*GOOD[:2], {"instruction": "x", "input": ""}, *GOOD[2:]])},
        ["train.jsonl line 3: missing 'output'"],
    ),
    Case(
        "wrong-type",
        {"train.jsonl": to_jsonl([{"prompt": "p", "completion": 7}])},
        ["train.jsonl line 1: field 'completion' must be a string, got a number"],
    ),
    Case("empty-file", {"train.jsonl": b""}, ["train.jsonl line 1: no records"]),
    Case("blank-lines-only", {"train.jsonl": b"\n  \n\n"}, ["train.jsonl line 1: no records"]),
    Case(
        "empty-completion",
        {"train.jsonl": to_jsonl([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": "  "}])},
        ["train.jsonl line 2: field 'completion' is empty"],
    ),
    Case(
        "non-utf8",
        {"train.jsonl": to_jsonl(GOOD[:1]) + b'{"text": "caf\xe9"}\n'},
        ["train.jsonl line 2: not valid UTF-8 (byte 0xe9 at column 14)"],
    ),
    Case("missing-object", {}, ["data/train.jsonl: not found"]),
    Case(
        "record-not-an-object",
        {"train.jsonl": to_jsonl(GOOD[:1]) + b'["instruction", "output"]\n'},
        ["train.jsonl line 2: record must be a JSON object, got a list"],
    ),
    Case(
        "bad-chat-role",
        {
            "train.jsonl": to_jsonl(
                [
                    *chat_records(2),
                    {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]},
                ]
            )
        },
        ["train.jsonl line 3: field 'messages[0].role' must be one of system, user, assistant, got 'human'"],
    ),
    Case(
        "undetectable-format",
        {"train.jsonl": to_jsonl([{"question": "q", "answer": "a"}])},
        ["train.jsonl line 1: cannot detect the format from fields [answer, question]"],
    ),
    Case(
        "csv-missing-column",
        {"train.csv": _csv([["instruction", "input"], ["say hi", ""], ["say bye", "now"]])},
        ["train.csv line 2: missing 'output'", "train.csv line 3: missing 'output'"],
        train="train.csv",
        dataset={"format": "alpaca"},
    ),
    Case(
        "csv-ragged-row",
        {"train.csv": _csv([["prompt", "completion"], ["a", "b"], ["c", "d", "e"]])},
        ["train.csv line 3: expected 2 columns, got 3"],
        train="train.csv",
    ),
    Case(
        "json-array-broken",
        {"train.json": b'[\n  {"text": "a"},\n  {"text": "b",,}\n]\n'},
        ["train.json line 3: not valid JSON (a field name must be in double quotes"],
        train="train.json",
    ),
    Case(
        "corrupt-parquet",
        {"train.parquet": _parquet_bytes()},
        ["train.parquet line 1: not a readable Parquet file"],
        train="train.parquet",
    ),
    Case(
        "gzip-compressed",
        {"train.jsonl": gzip.compress(to_jsonl(GOOD))},
        ["/data/train.jsonl is gzip-compressed: decompress it"],
    ),
    Case(
        "mixed-formats",
        {"train.jsonl": to_jsonl([*GOOD, *chat_records(1)])},
        ["train.jsonl line 5: a chat record (field 'messages'), but line 1 made this file alpaca"],
    ),
    Case(
        "bad-validation-file",
        {"train.jsonl": to_jsonl(GOOD), "val.jsonl": to_jsonl([{"instruction": "x", "output": ""}])},
        ["val.jsonl line 1: field 'output' is empty"],
        dataset={"validation": "VAL"},
    ),
    Case(
        "field-mapping-missing-column",
        {"train.jsonl": to_jsonl([{"question": "q", "answer": "a"}, {"question": "q2"}])},
        ["train.jsonl line 2: missing 'answer'"],
        dataset={"format": "alpaca", "fieldMapping": {"instruction": "question", "output": "answer"}},
    ),
    Case(
        "preference-missing-rejected",
        {"train.jsonl": to_jsonl([*pairs(2), {"prompt": "after red comes", "chosen": " green"}])},
        ["train.jsonl line 3: missing 'rejected'"],
        objective="dpo",
    ),
    Case(
        "preference-chosen-equals-rejected",
        {"train.jsonl": to_jsonl([*pairs(1), {"prompt": "p", "chosen": " green", "rejected": " green"}])},
        ["train.jsonl line 2: fields 'chosen' and 'rejected' are the same: the pair prefers nothing"],
        objective="dpo",
    ),
    Case(
        "preference-empty-chosen",
        {"train.jsonl": to_jsonl([*pairs(2), {"prompt": "p", "chosen": "  ", "rejected": " blue"}])},
        ["train.jsonl line 3: field 'chosen' is empty"],
        objective="dpo",
    ),
    Case(
        "preference-wrong-type",
        {"train.jsonl": to_jsonl([*pairs(1), {"prompt": "p", "chosen": 7, "rejected": " blue"}])},
        ["train.jsonl line 2: field 'chosen' must be a string, got a number"],
        objective="dpo",
    ),
    Case(
        "preference-chat-prompt-with-text-response",
        {"train.jsonl": to_jsonl([CHAT_PAIR, {**CHAT_PAIR, "rejected": "purple"}])},
        [
            "train.jsonl line 2: field 'rejected' is text and 'prompt' is a list of messages: give the"
            " prompt and its responses both as text or both as lists of messages"
        ],
        objective="dpo",
    ),
    Case(
        "preference-chat-response-without-assistant",
        {
            "train.jsonl": to_jsonl(
                [CHAT_PAIR, {**CHAT_PAIR, "chosen": [{"role": "user", "content": "green"}]}]
            )
        },
        ["train.jsonl line 2: field 'chosen' has no assistant message to learn from"],
        objective="dpo",
    ),
    Case(
        "preference-field-mapping",
        {
            "train.jsonl": to_jsonl(
                [{"q": "p", "good": " green", "bad": " blue"}, {"q": "p", "good": " green"}]
            )
        },
        ["train.jsonl line 2: missing 'bad'"],
        dataset={"fieldMapping": {"prompt": "q", "chosen": "good", "rejected": "bad"}},
        objective="dpo",
    ),
    Case(
        "dpo-with-supervised-data",
        {"train.jsonl": to_jsonl(GOOD)},
        [
            "train.jsonl line 1: an alpaca record (fields 'instruction' and 'output'), but objective dpo"
            " trains on preference pairs (fields 'prompt', 'chosen' and 'rejected')"
        ],
        objective="dpo",
    ),
    Case(
        "classification-records",
        {
            "train.jsonl": to_jsonl(
                [
                    {"text": "what follows red", "label": "warm"},
                    {"text": "what follows blue", "label": "cool"},
                    {"text": " ", "label": "warm"},
                    {"text": "what follows green"},
                    {"text": "x", "label": True},
                    {"text": "x", "label": 2.5},
                    {"text": "x", "text_pair": 7, "label": "warm"},
                    {"text": "x", "label": 1},
                ]
            )
        },
        [
            "train.jsonl line 3: field 'text' is empty",
            "train.jsonl line 4: a text record (field 'text'), but line 1 made this file classification"
            " (fields 'text' and 'label')",
            "train.jsonl line 5: field 'label' must be a class name (a string) or an index (an integer),"
            " got a boolean",
            "train.jsonl line 6: field 'label' must be a class name (a string) or an index (an integer),"
            " got the number 2.5",
            "train.jsonl line 7: field 'text_pair' must be a string, got a number",
            "train.jsonl line 8: field 'label' is an index (an integer), but train.jsonl line 1 has a name",
        ],
        spec=CLASSIFIER,
    ),
    Case(
        "classification-labels-and-validation",
        {
            "train.jsonl": to_jsonl(
                [{"sentence": "a", "category": "warm"}, {"sentence": "b", "category": 2}]
            ),
            "val.jsonl": to_jsonl([{"sentence": "c", "category": 0}, {"sentence": "d", "category": "hot"}]),
        },
        [
            "train.jsonl line 2: field 'category' is the index 2, but classification.labels has 2 labels"
            " (indices 0 to 1: 'cool', 'warm')",
            "val.jsonl line 2: field 'category' is 'hot', which is not one of the labels of"
            " classification.labels ('cool', 'warm')",
        ],
        dataset={"validation": "VAL", "fieldMapping": {"text": "sentence", "label": "category"}},
        spec={**CLASSIFIER, "classification": {"labels": ["cool", "warm"]}},
    ),
    Case(
        "sft-with-preference-data",
        {"train.jsonl": to_jsonl(pairs())},
        [
            "train.jsonl line 1: a preference pair (fields 'prompt', 'chosen' and 'rejected'), but objective"
            " sft trains on supervised records: use objective dpo, orpo or reward"
        ],
    ),
    Case(  # objective kto: every kind of bad record, under a field mapping
        "unpaired-preference-bad-records",
        {
            "train.jsonl": to_jsonl(
                [
                    *(
                        {"prompt": r["prompt"], "completion": r["completion"], "good": r["label"]}
                        for r in KTO_GOOD
                    ),
                    {"prompt": "after red comes", "completion": " green", "good": "true"},
                    {"prompt": "after red comes", "completion": " green", "good": 1},
                    {"prompt": "after red comes", "good": False},
                    {
                        "prompt": [{"role": "user", "content": "what follows red"}],
                        "completion": " green",
                        "good": True,
                    },
                    {
                        "prompt": "after red comes",
                        "completion": [{"role": "assistant", "content": "g"}],
                        "good": True,
                    },
                    {"prompt": "  ", "completion": " green", "good": True},
                ]
            )
        },
        [
            "train.jsonl line 3: field 'good' must be true or false, not the string 'true'",
            "train.jsonl line 4: field 'good' must be true or false, got a number",
            "train.jsonl line 5: missing 'completion'",
            "train.jsonl line 6: field 'completion' is text and 'prompt' is a list of messages",
            "train.jsonl line 7: field 'completion' is a list of messages and 'prompt' is text",
            "train.jsonl line 8: field 'prompt' is empty",
        ],
        dataset={"fieldMapping": {"label": "good"}},
        objective="kto",
    ),
    Case(
        "kto-with-supervised-data",
        {"train.jsonl": to_jsonl([{"prompt": "after red comes", "completion": " green"}])},
        [
            "train.jsonl line 1: a prompt_completion record (fields 'prompt' and 'completion'), but objective"
            " kto trains on unpaired records (fields 'prompt', 'completion' and 'label'): add a 'label' of"
            " true or false to every record"
        ],
        objective="kto",
    ),
    Case(
        "sft-with-kto-data",
        {"train.jsonl": to_jsonl(KTO_GOOD)},
        [
            "train.jsonl line 1: an unpaired_preference record (fields 'prompt', 'completion' and 'label'),"
            " but objective sft trains on supervised records: use objective kto, or remove 'label'"
        ],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_dataset_exits_42_before_training(
    case: Case, trainer_run: TrainerRun, s3_client: Any
) -> None:
    bucket = trainer_run.bucket
    for name, content in case.files.items():
        s3_client.put_object(Bucket=bucket, Key=f"data/{name}", Body=content)
    dataset = {"train": f"s3://{bucket}/data/{case.train}", **case.dataset}
    if dataset.get("validation") == "VAL":
        dataset["validation"] = f"s3://{bucket}/data/val.jsonl"
    trainer_run.config["dataset"] = dataset
    trainer_run.env.update(case.env)
    if case.objective is not None:
        trainer_run.config["objective"] = case.objective
    trainer_run.config.update(case.spec)

    started = time.monotonic()
    code, log = trainer_run.run(timeout=120)
    elapsed = time.monotonic() - started

    assert code == ExitCode.INVALID_DATA, log
    for expected in case.expect:
        assert expected in log, log
    summary = json.loads(trainer_run.termination_path.read_text())
    assert summary["exitCode"] == ExitCode.INVALID_DATA
    assert case.expect[0] in summary["error"]
    # Before any training step: no model loaded, nothing written to the output.
    assert "precision:" not in log
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/")
    assert listed.get("KeyCount", 0) == 0
    assert elapsed < 60
