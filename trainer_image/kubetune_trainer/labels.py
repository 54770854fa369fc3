"""The label set of task sequence-classification: given by ``classification.labels``, or discovered.

A record's label is a class name (a string) or an index (an integer, into the label set).

* ``classification.labels`` given: those names, in index order; a string label must be one of
  them, an integer one an index below their number. Classes the training data never shows are
  kept (the head still has an output for each).
* Not given: every label of the training data is a name, or every one is an index (not both).
  Names: the sorted distinct names. Indices: the classes ``0`` to the largest index, each named
  by its number (``"0"``, ``"1"``, ...), and every one of them must appear in the training data
  (a missing one is more likely a mistake than a class to keep). Either way at least 2 classes.
* Validation labels must be in the set (a class the model never had cannot be scored).

In CSV files every cell is text, so a label there is always a name. Pure Python: runs before
any model loads, and every problem names the file, line and field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_api.base import json_kind

from .datafiles import shown

#: A record's label: a class name or an index.
Label = str | int
#: How many label names a message lists.
_NAMES_SHOWN = 8


def label_problem(value: Any, field: str) -> str | None:
    """What is wrong with one label's type, or None: a non-empty string or an integer of 0 or more."""
    expected = f"field '{field}' must be a class name (a string) or an index (an integer)"
    if isinstance(value, bool):  # before int: JSON true is not class 1
        return f"{expected}, got a boolean"
    if isinstance(value, int):
        return None if value >= 0 else f"field '{field}' is the index {value}: indices start at 0"
    if isinstance(value, float):
        return f"{expected}, got the number {value}"
    if isinstance(value, str):
        return None if value.strip() else f"field '{field}' is empty"
    return f"{expected}, got {json_kind(value)}"


def _kind(label: Label) -> str:
    return "an index (an integer)" if isinstance(label, int) else "a name (a string)"


def _listing(names: Sequence[str]) -> str:
    shown_names = ", ".join(shown(n, 24) for n in names[:_NAMES_SHOWN])
    return shown_names + (f", ... ({len(names)} in all)" if len(names) > _NAMES_SHOWN else "")


@dataclass(frozen=True)
class LabelSet:
    """The class names in index order, and where they came from (for messages)."""

    names: tuple[str, ...]
    source: str

    def problem(self, label: Label, field: str) -> str | None:
        """Why ``label`` (type-checked already) is not in the set, or None."""
        count = len(self.names)
        if isinstance(label, int):
            if label < count:
                return None
            return (
                f"field '{field}' is the index {label}, but {self.source} has {count} labels"
                f" (indices 0 to {count - 1}: {_listing(self.names)})"
            )
        if label in self.names:
            return None
        return (
            f"field '{field}' is {shown(label)}, which is not one of the labels of {self.source}"
            f" ({_listing(self.names)})"
        )

    def index(self, label: Label) -> int:
        """The class index of a label that is in the set."""
        return label if isinstance(label, int) else self.names.index(label)


def given(names: Sequence[str]) -> LabelSet:
    """The set ``classification.labels`` names (the API has checked: 2 or more, each once)."""
    return LabelSet(tuple(names), "classification.labels")


@dataclass
class SameKind:
    """Without classification.labels: every label (training and validation) a name, or every one
    an index. Called with each record's label and location; remembers the first."""

    field: str
    first: tuple[Label, str] | None = None

    def __call__(self, label: Label, where: str) -> str | None:
        if self.first is None:
            self.first = (label, where)
            return None
        first, first_where = self.first
        if isinstance(label, int) == isinstance(first, int):
            return None
        return (
            f"field '{self.field}' is {_kind(label)}, but {first_where} has {_kind(first)}: without"
            " classification.labels every label must be a name or every one an index; use one kind,"
            " or list the names in classification.labels (an index then points into that list)"
        )


def discover(labels: Sequence[Label], file: str) -> tuple[LabelSet | None, str | None]:
    """The set the training labels (all of one kind: :class:`SameKind`) make, or a problem naming
    ``file``."""
    if not labels:
        return None, None
    source = "the training data"
    if isinstance(labels[0], int):
        indices = {label for label in labels if isinstance(label, int)}
        top = max(indices)
        missing = sorted(set(range(top + 1)) - indices)
        if missing:
            listed = ", ".join(str(i) for i in missing[:_NAMES_SHOWN]) + (
                ", ..." if len(missing) > _NAMES_SHOWN else ""
            )
            return None, (
                f"{file}: the labels are indices up to {top}, but {listed} never appear: without"
                f" classification.labels integer labels name the classes 0 to {top}, each of which"
                " needs records; add them, or list the class names in classification.labels"
            )
        found = LabelSet(tuple(str(i) for i in range(top + 1)), source)
    else:
        found = LabelSet(tuple(sorted({str(label) for label in labels})), source)
    if len(found.names) < 2:
        only = shown(labels[0]) if isinstance(labels[0], str) else labels[0]
        return None, (
            f"{file}: every record has the label {only}: a classifier needs at least 2 classes;"
            " add records of the other classes (or list them in classification.labels)"
        )
    return found, None


@dataclass
class LabelChecks:
    """A run's label checks, record by record: against the given set; or, without one, of one
    kind, and (in the validation data) against the set the training data made (:meth:`learn`)."""

    field: str
    label_set: LabelSet | None
    same_kind: SameKind | None

    @classmethod
    def for_run(cls, field: str, names: Sequence[str] | None) -> LabelChecks:
        if names is not None:
            return cls(field, given(names), None)
        return cls(field, None, SameKind(field))

    def __call__(self, record: Mapping[str, Any], where: str) -> str | None:
        """The problem with the label of a record that passed the format check, or None."""
        label: Label = record[self.field]
        wrong = None if self.same_kind is None else self.same_kind(label, where)
        if wrong is None and self.label_set is not None:
            wrong = self.label_set.problem(label, self.field)
        return wrong

    def learn(self, train: Sequence[Mapping[str, Any]], file: str) -> str | None:
        """After a training file without problems: the set its labels make, when none was given;
        a problem naming ``file`` if they make none."""
        if self.label_set is not None:
            return None
        self.label_set, problem = discover([example["label"] for example in train], file)
        return problem

    def indexed(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The examples with each label replaced by its class index."""
        assert self.label_set is not None
        label_set = self.label_set
        return [{**example, "label": label_set.index(example["label"])} for example in examples]
