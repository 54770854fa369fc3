"""The base of every API model, and the metadata the CRD generator reads off the models.

A cross-field rule is declared once, as a :class:`Rule`: the CEL expression the API server
evaluates at apply time, and the same check in Python, which every model runs when it is built
(so the SDK, the operator and the trainer refuse what the API server refuses). Field-level
metadata that only the CRD needs (immutability, int-or-string, formats) goes in
``json_schema_extra`` through the helpers here, so a field's whole contract sits on the field.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, ClassVar, Self, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

#: The extension keys the generator copies into the CRD as they are.
CEL_KEY = "x-kubernetes-validations"
INT_OR_STRING_KEY = "x-kubernetes-int-or-string"
PRESERVE_UNKNOWN_KEY = "x-kubernetes-preserve-unknown-fields"


@dataclass(frozen=True)
class Rule:
    """One CEL rule of an object's schema, with its Python twin.

    ``check`` gets the model instance and returns True when the rule holds; it is None for
    transition rules (``oldSelf``), which only the API server can judge.
    """

    cel: str
    message: str
    field_path: str | None = None
    check: Callable[[Any], bool] | None = None

    def as_crd(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


@dataclass(frozen=True)
class FieldRule:
    """A CEL rule on one field's value, with its Python twin: ``Annotated[str, FieldRule(...)]``.

    Used instead of ``pattern`` where the API server's own message (a regular expression) would
    not tell the user what to write. ``check`` gets the parsed value; the message is the same in
    both places.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]

    @classmethod
    def matching(cls, pattern: str, message: str) -> FieldRule:
        """The rule "the whole value matches ``pattern``" (RE2 in CEL, ``re`` in Python)."""
        return cls(
            cel=f"self.matches({cel_string(pattern)})",
            message=message,
            check=lambda value: bool(re.fullmatch(pattern, value)),
        )

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        def validate(value: Any) -> Any:
            if not self.check(value):
                raise PydanticCustomError(RULE_ERROR, self.message, {"field_path": ""})
            return value

        return core_schema.no_info_after_validator_function(validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        target = handler.resolve_ref_schema(json_schema)
        target.setdefault(CEL_KEY, []).append({"rule": self.cel, "message": self.message})
        return json_schema


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields refused; immutable values."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        # JSON has no NaN or infinity (the API server refuses 1e400), and a config written with one
        # would say null, which the trainer refuses.
        allow_inf_nan=False,
    )

    #: Object-level CEL rules (see :class:`Rule`), emitted as the object's x-kubernetes-validations.
    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """The model's JSON schema with its object-level CEL rules attached."""
        json_schema = handler(core_schema)
        if "cel_rules" in cls.__dict__ and cls.cel_rules:
            target = handler.resolve_ref_schema(json_schema)
            target[CEL_KEY] = [rule.as_crd() for rule in cls.cel_rules]
        return json_schema

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """A null for a field that cannot be null means unset (so its default), as the API server
        reads it: it prunes such a null before defaulting (``lora: null`` is the default lora)."""
        if not isinstance(data, dict) or None not in data.values():
            return data
        unset = _not_nullable(cls)
        return {key: value for key, value in data.items() if value is not None or key not in unset}

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        for rule in type(self).cel_rules:
            if rule.check is not None and not rule.check(self):
                # The rule's fieldPath travels in the error, so it can name the field as the API server does.
                raise PydanticCustomError(RULE_ERROR, rule.message, {"field_path": rule.field_path or ""})
        return self


RULE_ERROR = "cel_rule"


@functools.cache
def _not_nullable(model: type[ApiModel]) -> frozenset[str]:
    """The wire names (aliases) of the fields whose type does not admit None. Only those: a null
    under any other key (an unknown field, a Python name) is left for validation to refuse, as
    the API server refuses an unknown field."""
    return frozenset(
        info.alias or name for name, info in model.model_fields.items() if not _admits_none(info.annotation)
    )


def _admits_none(annotation: Any) -> bool:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    return get_origin(annotation) in (Union, UnionType) and any(_admits_none(a) for a in get_args(annotation))


def json_kind(value: Any) -> str:
    """What a value is, in the words of JSON and YAML (``null``, ``a number``, ``a list``), not
    Python's type names (``NoneType``, ``int``, ``tuple``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, bytes | bytearray):
        return "binary data"
    return "a value of another type"


#: pydantic's messages that speak Python ("a valid tuple", "instance of LoraSpec") -> the user's words.
_PLAIN = {
    "model_type": "must be an object (field: value pairs), not {kind}",
    "model_attributes_type": "must be an object (field: value pairs), not {kind}",
    "dict_type": "must be an object (key: value pairs), not {kind}",
    "tuple_type": "must be a list, not {kind}",
    "list_type": "must be a list, not {kind}",
}


def _path_part(part: str | int) -> str:
    """A field name after a dot; a map key (a label key, say) or an index in brackets, as the API
    server writes them; a key that would break the line (a line break, a bracket) quoted."""
    if isinstance(part, str) and part.isidentifier():
        return f".{part}"
    if isinstance(part, str) and not (part.isprintable() and "[" not in part and "]" not in part):
        return f"[{json.dumps(part)}]"
    return f"[{part}]"


def field_errors(error: ValidationError) -> list[str]:
    """Each problem as ``spec.quantization.bits: <what to change>``, the way the API server names fields.

    One line per error, in ``error.errors()``'s order (callers pair them up).
    """
    lines = []
    for item in error.errors():
        path = "".join(_path_part(part) for part in item["loc"])
        if item["type"] == RULE_ERROR:
            path += str((item.get("ctx") or {}).get("field_path", ""))
        path = path.lstrip(".")
        plain = _PLAIN.get(item["type"])
        message = plain.format(kind=json_kind(item.get("input"))) if plain else str(item["msg"])
        lines.append(f"{path}: {message}" if path else message)
    return lines


def cel_string(text: str) -> str:
    """``text`` as a single-quoted CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def immutable(what: str) -> dict[str, Any]:
    """``json_schema_extra`` for a field that cannot change once the FineTuneJob is created."""
    return {
        CEL_KEY: [
            {"rule": "self == oldSelf", "message": f"{what} is immutable once the FineTuneJob is created"}
        ]
    }


def immutable_optional(field: str) -> Rule:
    """An object rule keeping an optional field as created: unset stays unset, a value stays.

    (``self == oldSelf`` on the field itself cannot catch it being added or removed.)
    """
    return Rule(
        cel=(
            f"has(self.{field}) == has(oldSelf.{field}) && "
            f"(!has(self.{field}) || self.{field} == oldSelf.{field})"
        ),
        message=f"{field} is immutable once the FineTuneJob is created",
        field_path=f".{field}",
    )


def cel(rule: str, message: str) -> dict[str, Any]:
    """``json_schema_extra`` for a field-level CEL rule without a Python twin (the bound is also in Field)."""
    return {CEL_KEY: [{"rule": rule, "message": message}]}
