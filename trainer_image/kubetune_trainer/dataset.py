"""Fetch, validate and prepare the dataset: the steps between object storage and TRL.

1. :func:`fetch` downloads the train (and validation) files.
2. :func:`validate` reads every record, detects or checks the format, and raises
   :class:`InvalidDataError` listing the first problems -- no torch involved.
3. :func:`token_stats` measures token lengths once a tokenizer is loaded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from kubetune_api.spec import DatasetSpec, FieldMapping, Objective, Task, data_formats

from .datafiles import read_records, shown
from .errors import InvalidDataError
from .formats import (
    ConcreteFormat,
    check_record,
    describe_formats,
    detect_format,
    format_fields,
    to_example,
)
from .labels import LabelChecks
from .storage import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataFiles:
    train: Path
    validation: Path | None


@dataclass(frozen=True)
class ValidatedData:
    """Checked, format-normalised examples ready for TRL (see :func:`formats.to_example`)."""

    format: ConcreteFormat
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    #: format classification: the class names in index order (each example's label is an index).
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenStats:
    records: int
    p50: int
    p95: int
    max: int
    truncated: int
    max_length: int

    def describe(self) -> str:
        return (
            f"{self.records} records, p50 {self.p50}, p95 {self.p95}, max {self.max}; "
            f"{self.truncated} longer than maxSeqLength {self.max_length} (truncated)"
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "records": self.records,
            "tokensP50": self.p50,
            "tokensP95": self.p95,
            "tokensMax": self.max,
            "truncated": self.truncated,
            "maxLength": self.max_length,
        }


def fetch(spec: DatasetSpec, store: ObjectStore, dest: Path) -> DataFiles:
    """Download the dataset files; a missing or forbidden object raises InvalidDataError."""

    def one(uri: str, role: str) -> Path:
        name = uri.rsplit("/", 1)[-1] or role
        return store.download_file(uri, dest / role / name)

    train = one(spec.train, "train")
    validation = one(spec.validation, "validation") if spec.validation else None
    return DataFiles(train=train, validation=validation)


@dataclass(frozen=True)
class _Format:
    """The format records are checked against, and what chose it (for mixed-format messages)."""

    name: ConcreteFormat
    decided_by: str | None  # "train.jsonl line 1" when detected; None when set by dataset.format


def _mismatch(
    data: dict[str, Any], fmt: _Format, fields: FieldMapping, here: str | None, wanted: Collection[str] = ()
) -> str | None:
    """``"a chat record (field 'messages'), but line 1 made this file alpaca (...)"``, or None.

    Said instead of "missing 'output'" when a failing record plainly is another format.
    ``here`` is the file's name when its own first record decided the format.
    """
    other = detect_format(data, fields, wanted)
    if other is None or other == fmt.name:
        return None
    if fmt.decided_by is None:
        why = f"dataset.format is {fmt.name}"
    elif here is not None:  # "train.jsonl line 1" -> "line 1"
        why = f"{fmt.decided_by.removeprefix(f'{here} ')} made this file {fmt.name}"
    else:
        why = f"{fmt.decided_by} made this dataset {fmt.name}"
    return f"a {other} record ({format_fields(other, fields)}), but {why} ({format_fields(fmt.name, fields)})"


def _check_file(
    path: Path,
    uri: str,
    spec: DatasetSpec,
    fmt: _Format | None,
    *,
    wanted: Collection[str] = (),
    labels: LabelChecks | None = None,
) -> tuple[_Format | None, list[dict[str, Any]], list[str], int]:
    """Read one file; return (format, examples, first problems, problem count). ``wanted``: the
    formats the run trains on, preferred by detection; ``labels``: the classification label checks."""
    result = read_records(path, source=uri)
    problems = list(result.problems)
    fields = spec.field_mapping
    here = path.name if fmt is None else None  # read_records' name for this file
    if fmt is None and result.records:
        first = result.records[0]
        detected = detect_format(first.data, fields, wanted)
        if detected is None:
            names = sorted(first.data)
            keys = ", ".join(_field_name(k) for k in names[:_KEYS_SHOWN]) or "none"
            if len(names) > _KEYS_SHOWN:
                keys += f", and {len(names) - _KEYS_SHOWN} more"
            problems.append(
                f"{first.where}: cannot detect the format from fields [{keys}]; "
                f"expected one of {describe_formats(fields, wanted)} (or set dataset.format/fieldMapping)"
            )
            return None, [], problems, len(problems)
        fmt = _Format(detected, first.where)
    examples: list[dict[str, Any]] = []
    if fmt is not None:
        for record in result.records:
            found = check_record(fmt.name, record.data, fields)
            if not found and labels is not None and fmt.name == "classification":
                found = [wrong] if (wrong := labels(record.data, record.where)) else []
            if found:
                mismatch = _mismatch(record.data, fmt, fields, here, wanted)
                problems.extend(f"{record.where}: {p}" for p in ([mismatch] if mismatch else found))
            else:
                examples.append(to_example(fmt.name, record.data, fields))
    return fmt, examples, problems, len(problems)


#: How many of a record's field names a message lists, and how much of each.
_KEYS_SHOWN = 6
_KEY_CHARS = 24


def _field_name(key: str) -> str:
    """A field name as the list in a message shows it: as it is, or quoted and cut if it is long or
    holds line breaks or the list's own punctuation."""
    plain = key.isprintable() and len(key) <= _KEY_CHARS and not any(c in key for c in ",[]'")
    return key if plain and key else shown(key, _KEY_CHARS)


#: What a run that trains on one format trains on, in a mismatch message.
_TRAINS_ON = {
    "preference": "preference pairs",
    "unpaired_preference": "unpaired records",
    "classification": "labelled text",
}


def _what_runs_on(fmt: ConcreteFormat, task: Task) -> str:
    """The runs that train on ``fmt``, as a change to the spec: ``"use objective dpo, orpo or reward"``."""
    for other in get_args(Task):
        objectives = [o for o in get_args(Objective) if fmt in data_formats(o, other)]
        if not objectives:
            continue
        names = ", ".join(objectives[:-1]) + (" or " if len(objectives) > 1 else "") + objectives[-1]
        if other == task:
            return f"use objective {names}"
        return f"use task {other}" + ("" if "sft" in objectives else f" with objective {names}")
    return "set dataset.format"


def _conversion(fmt: ConcreteFormat, wanted: ConcreteFormat, fields: FieldMapping) -> str:
    """How to turn ``fmt`` data into the ``wanted`` format, where it is a small change."""
    if wanted == "classification":
        return f"add a '{fields.label}' to every record (or name its column in dataset.fieldMapping.label)"
    if wanted == "unpaired_preference" and fmt == "prompt_completion":
        return f"add a '{fields.label}' of true or false to every record (true: the completion is desirable)"
    if wanted == "unpaired_preference" and fmt == "preference":
        return (
            "convert the data (a pair makes two records: its chosen completion with label true, its"
            " rejected one with label false)"
        )
    return "convert the data"


def _objective_mismatch(
    fmt: _Format | None, objective: Objective, fields: FieldMapping, task: Task = "causal-lm"
) -> str | None:
    """``"train.jsonl line 1: ..."`` when the detected format is not one the run trains on
    (``spec.data_formats``), saying what it trains on and what to change.

    Only a detected format can mismatch: a set dataset.format is checked against the objective
    at apply time (spec.OBJECTIVE_RULES).
    """
    formats = data_formats(objective, task)
    if fmt is None or fmt.decided_by is None or fmt.name in formats:
        return None
    found = format_fields(fmt.name, fields)
    article = "an" if fmt.name[0] in "aeiou" else "a"
    record = "a preference pair" if fmt.name == "preference" else f"{article} {fmt.name} record"
    run = f"objective {objective}" if task == "causal-lm" else f"task {task}"
    change = _what_runs_on(fmt.name, task)
    if len(formats) > 1:  # the supervised formats: the run's other formats are other data
        if fmt.name == "unpaired_preference":  # SFT would learn the undesirable completions too
            change += f", or remove '{fields.label}' to train on every completion"
        return f"{fmt.decided_by}: {record} ({found}), but {run} trains on supervised records: {change}"
    (wanted,) = (f for f in get_args(ConcreteFormat) if f in formats)
    return (
        f"{fmt.decided_by}: {record} ({found}), but {run} trains on {_TRAINS_ON.get(wanted, wanted)}"
        f" ({format_fields(wanted, fields)}): {_conversion(fmt.name, wanted, fields)}, or {change}"
    )


def validate(
    spec: DatasetSpec,
    files: DataFiles,
    objective: Objective = "sft",
    task: Task = "causal-lm",
    class_names: Sequence[str] | None = None,
) -> ValidatedData:
    """Check every record of every file against the format and the objective (and for task
    sequence-classification the labels against ``class_names``, else the set the training data
    makes: labels.py); raise InvalidDataError with the first problems."""
    fmt = None if spec.format == "auto" else _Format(spec.format, None)
    wanted = data_formats(objective, task)
    labels = (
        LabelChecks.for_run(spec.field_mapping.label, class_names)
        if task == "sequence-classification"
        else None
    )
    fmt, train, problems, total = _check_file(
        files.train, spec.train, spec, fmt, wanted=wanted, labels=labels
    )
    wrong = _objective_mismatch(fmt, objective, spec.field_mapping, task)
    if wrong is not None:
        raise InvalidDataError([wrong], 1)
    if labels is not None and not total and (unusable := labels.learn(train, files.train.name)):
        problems.append(unusable)
        total += 1
    validation: list[dict[str, Any]] = []
    if files.validation is not None and fmt is not None:
        _, validation, more, more_total = _check_file(
            files.validation, spec.validation or "", spec, fmt, wanted=wanted, labels=labels
        )
        problems += more
        total += more_total
    if not total and spec.validation_split > 0 and len(train) < 2:
        # datasets' train_test_split would refuse it, after the model is loaded.
        problems.append(
            f"{files.train.name}: dataset.validationSplit {spec.validation_split} holds out at least one "
            f"record, and the file has {len(train)}: add records, or set validationSplit to 0"
        )
        total += 1
    if total:
        raise InvalidDataError(problems[: spec.max_reported_errors], total)
    assert fmt is not None  # a file with no records raised in read_records
    log.info(
        "dataset: format %s%s, %d train / %d validation records, all valid",
        fmt.name,
        " (detected)" if spec.format == "auto" else "",
        len(train),
        len(validation),
    )
    if labels is not None and labels.label_set is not None:
        log.info("dataset: %d labels (%s)", len(labels.label_set.names), labels.label_set.source)
        names = labels.label_set.names
        return ValidatedData(fmt.name, labels.indexed(train), labels.indexed(validation), names)
    return ValidatedData(format=fmt.name, train=train, validation=validation)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (``q`` in 0..100)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize_lengths(lengths: list[int], max_length: int) -> TokenStats:
    ordered = sorted(lengths)
    return TokenStats(
        records=len(ordered),
        p50=percentile(ordered, 50),
        p95=percentile(ordered, 95),
        max=ordered[-1] if ordered else 0,
        truncated=sum(1 for n in ordered if n > max_length),
        max_length=max_length,
    )


def example_text(example: dict[str, Any], tokenizer: Any) -> str:
    """The full training text of one TRL row, as the tokenizer will see it."""
    if "messages" in example:
        return str(tokenizer.apply_chat_template(example["messages"], tokenize=False))
    if "text" in example:  # text, or classification (with its second text when it has one)
        pair = f" {example['text_pair']}" if example.get("text_pair") else ""
        return str(example["text"]) + pair + (tokenizer.eos_token or "")
    if "chosen" in example:  # a preference pair: its longer response, as DPO truncates it
        texts = [
            example_text({"prompt": example["prompt"], "completion": example[k]}, tokenizer)
            for k in ("chosen", "rejected")
        ]
        return max(texts, key=len)
    if isinstance(example["prompt"], list):
        conversation = example["prompt"] + example["completion"]
        return str(tokenizer.apply_chat_template(conversation, tokenize=False))
    return str(example["prompt"]) + str(example["completion"]) + (tokenizer.eos_token or "")


def token_stats(examples: list[dict[str, Any]], tokenizer: Any, max_length: int) -> TokenStats:
    """Token lengths (p50/p95/max) and how many records exceed ``max_length``."""
    texts = [example_text(e, tokenizer) for e in examples]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return summarize_lengths([len(ids) for ids in encoded], max_length)
