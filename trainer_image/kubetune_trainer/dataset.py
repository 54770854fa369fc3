"""Fetch, validate and prepare the dataset: the steps between object storage and TRL.

1. :func:`fetch` downloads the train (and validation) files.
2. :func:`validate` reads every record, detects or checks the format, and raises
   :class:`InvalidDataError` listing the first problems -- no torch involved.
3. :func:`token_stats` measures token lengths once a tokenizer is loaded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api.spec import DatasetSpec

from .datafiles import read_records
from .errors import InvalidDataError
from .formats import ConcreteFormat, check_record, describe_formats, detect_format, to_example
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


def _check_file(
    path: Path, spec: DatasetSpec, fmt: ConcreteFormat | None
) -> tuple[ConcreteFormat | None, list[dict[str, Any]], list[str], int]:
    """Read one file; return (format, examples, first problems, problem count)."""
    result = read_records(path)
    problems = list(result.problems)
    fields = spec.field_mapping
    if fmt is None and result.records:
        first = result.records[0]
        fmt = detect_format(first.data, fields)
        if fmt is None:
            keys = ", ".join(sorted(first.data)) or "none"
            problems.append(
                f"{first.where}: cannot detect the format from fields [{keys}]; "
                f"expected one of {describe_formats(fields)} (or set dataset.format/fieldMapping)"
            )
            return None, [], problems, len(problems)
    examples: list[dict[str, Any]] = []
    if fmt is not None:
        for record in result.records:
            found = check_record(fmt, record.data, fields)
            problems.extend(f"{record.where}: {p}" for p in found)
            if not found:
                examples.append(to_example(fmt, record.data, fields))
    return fmt, examples, problems, len(problems)


def validate(spec: DatasetSpec, files: DataFiles) -> ValidatedData:
    """Check every record of every file; raise InvalidDataError with the first problems."""
    fmt: ConcreteFormat | None = None if spec.format == "auto" else spec.format
    fmt, train, problems, total = _check_file(files.train, spec, fmt)
    validation: list[dict[str, Any]] = []
    if files.validation is not None and fmt is not None:
        _, validation, more, more_total = _check_file(files.validation, spec, fmt)
        problems += more
        total += more_total
    if total:
        raise InvalidDataError(problems[: spec.max_reported_errors], total)
    assert fmt is not None  # a file with no records raised in read_records
    log.info(
        "dataset: format %s%s, %d train / %d validation records, all valid",
        fmt,
        " (detected)" if spec.format == "auto" else "",
        len(train),
        len(validation),
    )
    return ValidatedData(format=fmt, train=train, validation=validation)


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
    if "text" in example:
        return str(example["text"]) + (tokenizer.eos_token or "")
    if isinstance(example["prompt"], list):
        conversation = example["prompt"] + example["completion"]
        return str(tokenizer.apply_chat_template(conversation, tokenize=False))
    return str(example["prompt"]) + str(example["completion"]) + (tokenizer.eos_token or "")


def token_stats(examples: list[dict[str, Any]], tokenizer: Any, max_length: int) -> TokenStats:
    """Token lengths (p50/p95/max) and how many records exceed ``max_length``."""
    texts = [example_text(e, tokenizer) for e in examples]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return summarize_lengths([len(ids) for ids in encoded], max_length)
