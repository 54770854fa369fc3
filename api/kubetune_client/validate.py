"""``kubetune validate``: the trainer's own dataset checks, run on local files before any upload.

The same code the trainer runs before it loads a model (:func:`kubetune_trainer.dataset.validate`
over :mod:`kubetune_trainer.datafiles` and :mod:`kubetune_trainer.formats`), so a file that passes
here passes there, and a bad record gets the same ``<file> line <n>: <what>`` message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from kubetune_api.base import field_errors
from kubetune_api.spec import DatasetFormat, DatasetSpec, FieldMapping
from kubetune_trainer.dataset import DataFiles, validate
from kubetune_trainer.errors import InvalidDataError

from .errors import InvalidDatasetError, InvalidSpecError


@dataclass(frozen=True)
class ValidationReport:
    """A dataset that passed: its (detected) format and record counts."""

    format: str
    train_records: int
    validation_records: int

    def as_dict(self) -> dict[str, object]:
        return {
            "valid": True,
            "format": self.format,
            "trainRecords": self.train_records,
            "validationRecords": self.validation_records,
        }


def dataset_spec(
    train: Path,
    validation: Path | None = None,
    fmt: DatasetFormat = "auto",
    field_mapping: FieldMapping | None = None,
    max_reported_errors: int = 20,
) -> DatasetSpec:
    """A ``spec.dataset`` for local files: its own fields validated by the API model, the file
    names kept as they are (the trainer names the file, not the URI, in line messages)."""
    try:
        checked = DatasetSpec(
            train="s3://local-file/train",
            validation="s3://local-file/validation" if validation else None,
            format=fmt,
            field_mapping=field_mapping or FieldMapping(),
            max_reported_errors=max_reported_errors,
        )
    except ValidationError as exc:
        raise InvalidSpecError("invalid dataset settings: " + "; ".join(field_errors(exc))) from exc
    # The whole-file messages name the "object" (a gzip file, say): here that is the local path.
    return checked.model_copy(
        update={"train": str(train), "validation": str(validation) if validation else None}
    )


def validate_files(
    train: Path,
    validation: Path | None = None,
    fmt: DatasetFormat = "auto",
    field_mapping: FieldMapping | None = None,
    max_reported_errors: int = 20,
) -> ValidationReport:
    """Check every record of ``train`` (and ``validation``) as the trainer would.

    Raises :class:`InvalidDatasetError` listing the first problems (``train.jsonl line 3: ...``).
    """
    for path in (train, validation):
        if path is not None and not path.is_file():
            raise InvalidDatasetError(f"{path}: no such file")
    spec = dataset_spec(train, validation, fmt, field_mapping, max_reported_errors)
    try:
        checked = validate(spec, DataFiles(train=train, validation=validation))
    except InvalidDataError as exc:
        raise InvalidDatasetError(str(exc)) from exc
    return ValidationReport(checked.format, len(checked.train), len(checked.validation))
