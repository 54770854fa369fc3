"""``FineTuneSweep``: a hyperparameter search whose trials are ordinary FineTuneJobs.

The spec is a FineTuneJob spec (``template``, the very model of :mod:`kubetune_api.spec`), a search
space over paths of that spec, an objective read from the trials' reported progress, and the
sampler and pruner that choose and stop trials. The status records every trial (its parameters,
state, value and intermediate values), which is all the operator needs to rebuild the Optuna
study in memory on each reconcile: no database.

Which paths may be searched is derived from :class:`~kubetune_api.spec.FineTuneJobSpec` itself
(:data:`SWEEPABLE`), so a new numeric field of the training spec is searchable without an edit
here, and the CRD's CEL rules and the Python checks read the same table.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, ClassVar, Final, Literal, Self, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from . import coordinates
from .base import (
    CEL_KEY,
    PRESERVE_UNKNOWN_KEY,
    RULE_ERROR,
    ApiModel,
    FieldRule,
    Rule,
    cel_string,
    field_errors,
)
from .resource import ObjectMeta, PrinterColumn
from .spec import SEED_MAX, FineTuneJobSpec
from .status import MAX_MESSAGE, Condition
from .sweep_reasons import SweepPhase, TrialState

# -- API coordinates ------------------------------------------------------------------------------
KIND: Final = "FineTuneSweep"
LIST_KIND: Final = f"{KIND}List"
PLURAL: Final = "finetunesweeps"
SINGULAR: Final = "finetunesweep"
SHORT_NAMES: Final = ("fts",)
CRD_NAME: Final = f"{PLURAL}.{coordinates.GROUP}"

#: Most trials a sweep may ask for: its status records each one (see docs/operator.md, Sweeps).
MAX_TRIALS: Final = 500
#: A trial is named ``<sweep>-<number>`` (number below MAX_TRIALS: 3 digits), and a FineTuneJob name
#: is at most coordinates.MAX_NAME_LENGTH (55) characters.
MAX_SWEEP_NAME_LENGTH: Final = coordinates.MAX_NAME_LENGTH - 1 - len(str(MAX_TRIALS - 1))
#: Most parameters in a search space, and choices of one parameter.
MAX_PARAMETERS: Final = 16
MAX_CHOICES: Final = 64
#: Intermediate values kept per trial (the latest ones): bounds the status of a long sweep.
MAX_INTERMEDIATE_VALUES: Final = 32

#: The sections of FineTuneJobSpec whose fields a sweep may search (plus the top-level ``method``):
#: how to train, never what to train on, where to write or on what hardware.
SWEEPABLE_SECTIONS: Final = ("training", "lora", "quantization")
SWEEPABLE_TOP_LEVEL: Final = ("method",)

ParameterKind = Literal["int", "float", "categorical"]
Scalar = int | float | str | bool


@dataclass(frozen=True)
class Sweepable:
    """A searchable spec path: its kind, the values a categorical one admits, its numeric bounds."""

    path: str
    kind: ParameterKind
    literals: tuple[Scalar, ...] = ()
    #: (inclusive?, bound) pairs; None when the field has no such bound.
    lower: tuple[bool, float] | None = None
    upper: tuple[bool, float] | None = None

    def admits(self, value: float) -> bool:
        if self.lower is not None and not (
            value >= self.lower[1] if self.lower[0] else value > self.lower[1]
        ):
            return False
        return self.upper is None or (value <= self.upper[1] if self.upper[0] else value < self.upper[1])

    def bounds_text(self) -> str:
        parts = []
        if self.lower is not None:
            parts.append(f"{'at least' if self.lower[0] else 'above'} {_number(self.lower[1])}")
        if self.upper is not None:
            parts.append(f"{'at most' if self.upper[0] else 'below'} {_number(self.upper[1])}")
        return " and ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """The annotation without Annotated and Optional, and the metadata Annotated carried."""
    metadata: list[Any] = []
    while True:
        if get_origin(annotation) is Annotated:
            args = get_args(annotation)
            annotation, metadata = args[0], [*metadata, *args[1:]]
            continue
        if get_origin(annotation) in (Union, UnionType):
            options = [a for a in get_args(annotation) if a is not type(None)]
            if len(options) == 1:
                annotation = options[0]
                continue
        return annotation, metadata


def _classify(path: str, info: Any) -> Sweepable | None:
    annotation, metadata = _unwrap(info.annotation)
    metadata = [*metadata, *info.metadata]
    if get_origin(annotation) is Literal:
        return Sweepable(path, "categorical", tuple(get_args(annotation)))
    if annotation is bool:
        return Sweepable(path, "categorical", (True, False))
    if annotation not in (int, float):
        return None
    lower: tuple[bool, float] | None = None
    upper: tuple[bool, float] | None = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            lower = (True, float(item.ge))  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Gt):
            lower = (False, float(item.gt))  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Le):
            upper = (True, float(item.le))  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Lt):
            upper = (False, float(item.lt))  # type: ignore[arg-type]
    return Sweepable(path, "int" if annotation is int else "float", (), lower, upper)


def _sweepable() -> dict[str, Sweepable]:
    out: dict[str, Sweepable] = {}
    fields = FineTuneJobSpec.model_fields
    for name in SWEEPABLE_TOP_LEVEL:
        found = _classify(fields[name].alias or name, fields[name])
        if found is not None:
            out[found.path] = found
    for section in SWEEPABLE_SECTIONS:
        model = _unwrap(fields[section].annotation)[0]
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        for name, info in model.model_fields.items():
            found = _classify(f"{fields[section].alias or section}.{info.alias or name}", info)
            if found is not None:
                out[found.path] = found
    return out


#: Every spec path a search parameter may name, by path (wire names: ``training.learningRate``).
SWEEPABLE: Final = _sweepable()
NUMERIC_PATHS: Final = tuple(path for path, s in SWEEPABLE.items() if s.kind != "categorical")
INT_PATHS: Final = tuple(path for path, s in SWEEPABLE.items() if s.kind == "int")


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(cel_string(v) for v in values) + "]"


def _bound_rule(s: Sweepable) -> Rule:
    ops = []
    if s.lower is not None:
        ops.append(("low", ">=" if s.lower[0] else ">", s.lower[1]))
    if s.upper is not None:
        ops.append(("high", "<=" if s.upper[0] else "<", s.upper[1]))
    condition = " && ".join(f"self.{side} {op} {float(bound)!r}" for side, op, bound in ops)
    return Rule(
        cel=f"self.path != {cel_string(s.path)} || !has(self.low) || ({condition})",
        message=f"{s.path} must be {s.bounds_text()}: low and high are values of it",
        field_path=".low",
        check=lambda p: (
            p.path != s.path or p.low is None or p.high is None or (s.admits(p.low) and s.admits(p.high))
        ),
    )


PATH_RULE = FieldRule(
    cel=f"self in {_cel_list(tuple(SWEEPABLE))}",
    message=(
        "must be a numeric or categorical field of the FineTuneJob spec under "
        + ", ".join(SWEEPABLE_SECTIONS)
        + " (or method), written as in the manifest, such as training.learningRate or lora.r"
    ),
    check=lambda v: v in SWEEPABLE,
)
#: A choice: any JSON scalar (its type is checked against the field's by applying it to the template).
Choice = Annotated[Scalar, Field(json_schema_extra={PRESERVE_UNKNOWN_KEY: True})]


RANGE_OR_CHOICES: Final = "set either low and high (a range) or choices, not both and not neither"
GRID_NEEDS_CHOICES: Final = (
    "sampler grid needs choices for every parameter (a range has no grid): give choices, or use tpe"
)


def _whole(value: float | None) -> bool:
    return value is None or float(value).is_integer()


class SearchParameter(ApiModel):
    """One dimension of the search: a spec path, and either a range (low, high, log) or choices."""

    cel_rules = (
        Rule(
            cel="has(self.low) == has(self.high)",
            message="a range needs both low and high",
            field_path=".high",
            check=lambda p: (p.low is None) == (p.high is None),
        ),
        Rule(
            cel=f"!has(self.low) || self.path in {_cel_list(NUMERIC_PATHS)}",
            message="a range (low, high) needs a numeric field: give this one choices",
            field_path=".low",
            check=lambda p: p.low is None or p.path in NUMERIC_PATHS,
        ),
        Rule(
            cel="!has(self.low) || !has(self.high) || self.low < self.high",
            message="low must be below high",
            field_path=".low",
            check=lambda p: p.low is None or p.high is None or p.low < p.high,
        ),
        Rule(
            cel="!self.log || (has(self.low) && self.low > 0.0)",
            message="log: true needs a range with low above 0",
            field_path=".log",
            check=lambda p: not p.log or (p.low is not None and p.low > 0),
        ),
        Rule(
            cel=(
                f"!has(self.low) || !(self.path in {_cel_list(INT_PATHS)}) || "
                "(self.low == double(int(self.low)) && self.high == double(int(self.high)))"
            ),
            message="this field is an integer: low and high must be whole numbers",
            field_path=".low",
            check=lambda p: p.low is None or p.path not in INT_PATHS or (_whole(p.low) and _whole(p.high)),
        ),
        *(_bound_rule(s) for s in SWEEPABLE.values() if s.kind != "categorical" and (s.lower or s.upper)),
    )

    path: Annotated[str, Field(min_length=1, max_length=128), PATH_RULE]
    """The FineTuneJob spec field to search, as in the manifest: training.learningRate, lora.r,
    lora.alpha, training.numTrainEpochs, method, ..."""
    low: float | None = Field(default=None, ge=-1e15, le=1e15)
    """Lowest value of a range (inclusive)."""
    high: float | None = Field(default=None, ge=-1e15, le=1e15)
    """Highest value of a range (inclusive)."""
    log: bool = False
    """Sample the range on a log scale (learning rates); needs low above 0."""
    choices: tuple[Choice, ...] | None = Field(default=None, min_length=1, max_length=MAX_CHOICES)
    """The values to choose from (numbers, strings or booleans), for any field; the grid sampler
    needs choices for every parameter."""

    @model_validator(mode="after")
    def _range_or_choices(self) -> Self:
        # Python only: CEL cannot see choices (its items have no one type), so the operator reports it.
        if (self.choices is not None) == (self.low is not None):
            raise PydanticCustomError(RULE_ERROR, RANGE_OR_CHOICES, {"field_path": ".choices"})
        return self

    @property
    def kind(self) -> ParameterKind:
        return "categorical" if self.choices is not None else SWEEPABLE[self.path].kind


class ObjectiveSpec(ApiModel):
    """What the sweep optimizes: a metric every trial reports in its status.progress."""

    metric: Literal["evalLoss", "loss"] = "evalLoss"
    """evalLoss (the latest evaluation loss: needs evaluation in the template) or loss (the latest
    training loss), as the trial's trainer last reported it in status.progress."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether lower (minimize) or higher (maximize) values are better."""


class PrunerSpec(ApiModel):
    """Stops unpromising trials early from the values they report while they run."""

    type: Literal["median", "successive-halving"]
    """median: stop a trial whose latest value is worse than the median of the finished trials'
    values at the same step; successive-halving: Optuna's asynchronous successive halving."""
    startup_trials: int = Field(default=5, ge=0, le=MAX_TRIALS)
    """median: no trial is pruned until this many trials have succeeded."""
    warmup_steps: int = Field(default=0, ge=0, le=1_000_000_000)
    """median: no trial is pruned before it reports a value past this training step."""
    min_resource: int = Field(default=1, ge=1, le=1_000_000_000)
    """successive-halving: the training step of the first rung."""
    reduction_factor: int = Field(default=3, ge=2, le=100)
    """successive-halving: 1/reductionFactor of the trials go on at each rung."""


def _sweep_immutable(what: str) -> dict[str, Any]:
    return {
        CEL_KEY: [
            {"rule": "self == oldSelf", "message": f"{what} is immutable once the FineTuneSweep is created"}
        ]
    }


def _unique_paths(spec: FineTuneSweepSpec) -> bool:
    paths = [p.path for p in spec.search_space]
    return len(paths) == len(set(paths))


def _evaluates(spec: FineTuneSweepSpec) -> bool:
    searched = {p.path for p in spec.search_space}
    return (
        spec.objective.metric != "evalLoss"
        or spec.template.training.eval_strategy != "no"
        or "training.evalStrategy" in searched
    )


class FineTuneSweepSpec(ApiModel):
    """The desired search. template, searchSpace, objective, sampler and seed are immutable once
    created; maxTrials, maxParallel and pruner may be edited."""

    cel_rules = (
        Rule(
            cel="self.searchSpace.all(p, self.searchSpace.exists_one(q, q.path == p.path))",
            message="each path may appear once in searchSpace",
            field_path=".searchSpace",
            check=_unique_paths,
        ),
        Rule(
            cel="!has(self.template.cancel) || !self.template.cancel",
            message="template.cancel must be false: trials that start cancelled never run",
            field_path=".template.cancel",
            check=lambda s: not s.template.cancel,
        ),
        Rule(
            cel="!has(self.template.suspend) || !self.template.suspend",
            message="template.suspend must be false: suspended trials never report a value",
            field_path=".template.suspend",
            check=lambda s: not s.template.suspend,
        ),
        Rule(
            cel=(
                "self.objective.metric != 'evalLoss' || "
                "(has(self.template.training) && has(self.template.training.evalStrategy) && "
                "self.template.training.evalStrategy != 'no') || "
                "self.searchSpace.exists(p, p.path == 'training.evalStrategy')"
            ),
            message=(
                "objective.metric evalLoss needs evaluation: set template.training.evalStrategy (and "
                "template.dataset.validation or validationSplit), or use metric loss"
            ),
            field_path=".objective.metric",
            check=_evaluates,
        ),
    )

    template: FineTuneJobSpec = Field(json_schema_extra=_sweep_immutable("template"))
    """The FineTuneJob spec every trial starts from; each trial sets the searched paths to its own
    values, and writes under <template.output.uri>/<trial name> (so trials never share an output)."""
    search_space: tuple[SearchParameter, ...] = Field(
        min_length=1, max_length=MAX_PARAMETERS, json_schema_extra=_sweep_immutable("searchSpace")
    )
    """The parameters to search, each a path of the template with a range or choices."""
    objective: ObjectiveSpec = Field(default=ObjectiveSpec(), json_schema_extra=_sweep_immutable("objective"))
    """What the sweep optimizes."""
    max_trials: int = Field(default=10, ge=1, le=MAX_TRIALS)
    """How many trials to run in all (grid: at most the grid's size). Editable."""
    max_parallel: int = Field(default=1, ge=1, le=100)
    """How many trials may run at once. Editable."""
    sampler: Literal["tpe", "random", "grid"] = Field(
        default="tpe", json_schema_extra=_sweep_immutable("sampler")
    )
    """How the next parameters are chosen: tpe (Optuna's Tree-structured Parzen Estimator), random,
    or grid (every combination of the choices, in an order shuffled by the seed)."""
    seed: int = Field(default=0, ge=0, le=SEED_MAX, json_schema_extra=_sweep_immutable("seed"))
    """Seed of the sampler: the same sweep over the same results asks for the same trials."""
    pruner: PrunerSpec | None = Field(default=None)
    """Stops unpromising trials early; unset: every trial runs to its end. Editable."""

    @model_validator(mode="after")
    def _grid_has_choices(self) -> Self:
        # Python only, as SearchParameter's choices check: the operator reports it (InvalidSearchSpace).
        if self.sampler == "grid" and any(p.choices is None for p in self.search_space):
            raise PydanticCustomError(RULE_ERROR, GRID_NEEDS_CHOICES, {"field_path": ".sampler"})
        return self


class IntermediateValue(ApiModel):
    """The objective metric as a running trial reported it at one training step."""

    step: int = Field(ge=0, json_schema_extra={"format": "int64"})
    """Optimizer step of the report."""
    value: float
    """The metric's value at that step."""


class TrialStatus(ApiModel):
    """One trial: its FineTuneJob, the parameters it was given and what became of it."""

    number: int = Field(ge=0, json_schema_extra={"format": "int32"})
    """The trial's number (0, 1, ...): its FineTuneJob is <sweep>-<number>."""
    name: str
    """Name of the trial's FineTuneJob."""
    parameters: dict[str, Scalar] = Field(json_schema_extra={PRESERVE_UNKNOWN_KEY: True})
    """The value of each searched path in this trial."""
    state: TrialState
    """Running, Succeeded, Failed or Pruned."""
    value: float | None = None
    """The objective metric the trial reported last (for Succeeded trials, its result)."""
    intermediate_values: tuple[IntermediateValue, ...] | None = Field(
        default=None, max_length=MAX_INTERMEDIATE_VALUES
    )
    """The metric at the steps the operator saw it while the trial ran (the latest 32): what the
    pruner reads."""
    message: str | None = Field(default=None, max_length=1024)
    """Why a trial failed or was pruned."""


class FineTuneSweepStatus(ApiModel):
    """Observed state, written by the operator from the trials' FineTuneJobs."""

    phase: SweepPhase | None = None
    """Running, Succeeded or Failed."""
    reason: str | None = Field(default=None, max_length=256)
    """Machine-readable reason for the phase."""
    message: str | None = Field(default=None, max_length=MAX_MESSAGE)
    """Human-readable detail."""
    observed_generation: int | None = Field(default=None, json_schema_extra={"format": "int64"})
    """The metadata.generation this status reflects."""
    trials: tuple[TrialStatus, ...] | None = Field(default=None, max_length=MAX_TRIALS)
    """Every trial so far, by number."""
    best_trial: str | None = None
    """Name of the best succeeded trial's FineTuneJob (its output holds the best adapter)."""
    best_value: float | None = None
    """The best trial's value."""
    best_parameters: dict[str, Scalar] | None = Field(
        default=None, json_schema_extra={PRESERVE_UNKNOWN_KEY: True}
    )
    """The best trial's parameters."""
    trials_succeeded: int | None = Field(default=None, json_schema_extra={"format": "int32"})
    """Trials that succeeded."""
    trials_running: int | None = Field(default=None, json_schema_extra={"format": "int32"})
    """Trials whose FineTuneJob has not ended."""
    trials_pruned: int | None = Field(default=None, json_schema_extra={"format": "int32"})
    """Trials stopped by the pruner."""
    trials_failed: int | None = Field(default=None, json_schema_extra={"format": "int32"})
    """Trials that failed (or ended without the metric)."""
    trials_summary: str | None = None
    """Trials ended out of maxTrials, for kubectl get."""
    start_time: str | None = None
    """When the first trial was created (RFC 3339)."""
    completion_time: str | None = None
    """When the sweep succeeded or failed (RFC 3339)."""
    conditions: tuple[Condition, ...] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Running, Succeeded and Failed, each True or False with a reason."""


def _name_ok(sweep: FineTuneSweep) -> bool:
    name = sweep.metadata.name
    return name is None or (
        bool(re.fullmatch(coordinates.NAME_PATTERN, name)) and len(name) <= MAX_SWEEP_NAME_LENGTH
    )


class FineTuneSweep(ApiModel):
    """FineTuneSweep searches hyperparameters of a FineTuneJob with Optuna: it runs each trial as
    an ordinary FineTuneJob built from its template, records every trial in status, and names the
    best one. The kubetune operator rebuilds the study from status on each reconcile."""

    cel_rules = (
        Rule(
            cel=(
                f"self.metadata.name.matches('{coordinates.NAME_PATTERN}') && "
                f"size(self.metadata.name) <= {MAX_SWEEP_NAME_LENGTH}"
            ),
            message=(
                "metadata.name must be a DNS-1123 label (lower-case letters, digits and '-') of at most "
                f"{MAX_SWEEP_NAME_LENGTH} characters, because each trial's FineTuneJob is named "
                "<sweep>-<trial number>"
            ),
            check=_name_ok,
        ),
    )
    printer_columns: ClassVar[tuple[PrinterColumn, ...]] = (
        PrinterColumn("Phase", "string", ".status.phase", "Lifecycle phase of the sweep."),
        PrinterColumn("Best", "number", ".status.bestValue", "The best trial's objective value so far."),
        PrinterColumn("Trials", "string", ".status.trialsSummary", "Trials ended out of maxTrials."),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp"),
        PrinterColumn("Best-Trial", "string", ".status.bestTrial", "The best trial's FineTuneJob.", 1),
        PrinterColumn("Running", "integer", ".status.trialsRunning", "Trials running now.", 1),
    )

    api_version: str = Field(
        default=coordinates.API_VERSION, pattern=f"^{re.escape(coordinates.API_VERSION)}$"
    )
    """APIVersion defines the versioned schema of this representation of an object."""
    kind: str = Field(default=KIND, pattern=f"^{KIND}$")
    """Kind is a string value representing the REST resource this object represents."""
    metadata: ObjectMeta = ObjectMeta()
    spec: FineTuneSweepSpec
    status: FineTuneSweepStatus | None = None


# -- applying parameters to the template ----------------------------------------------------------


class InvalidParametersError(ValueError):
    """Parameters that make the template an invalid FineTuneJob spec; the message says which."""


def apply_parameters(template: FineTuneJobSpec, parameters: dict[str, Scalar]) -> FineTuneJobSpec:
    """The template with each path set to its value, validated as a FineTuneJob spec.

    Raises :class:`InvalidParametersError` naming the parameter and what the spec refuses.
    """
    body = template.model_dump(mode="json", by_alias=True, exclude_none=True)
    for path, value in parameters.items():
        node = body
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return FineTuneJobSpec.model_validate(body)
    except ValidationError as err:
        given = ", ".join(f"{path}={json.dumps(value)}" for path, value in parameters.items())
        problems = "; ".join(field_errors(err))
        raise InvalidParametersError(
            f"the template with {given} is not a valid FineTuneJob spec: {problems}"
        ) from None


def check_search_space(spec: FineTuneSweepSpec) -> None:
    """Apply each range's ends and each choice to the template: the checks CEL cannot make (a
    choice's type, rules across fields such as qlora needing 4 bits). Raises InvalidParametersError."""
    for parameter in spec.search_space:
        if parameter.choices is not None:
            values: tuple[Scalar, ...] = parameter.choices
        else:
            assert parameter.low is not None
            assert parameter.high is not None
            cast = int if parameter.kind == "int" else float
            values = (cast(parameter.low), cast(parameter.high))
        for value in values:
            try:
                apply_parameters(spec.template, {parameter.path: value})
            except InvalidParametersError as err:
                raise InvalidParametersError(f"searchSpace {parameter.path}: {err}") from None
