"""The base of every API model, and the metadata the CRD generator reads off the models.

A cross-field rule is declared once, as a :class:`Rule`: the CEL expression the API server
evaluates at apply time, and the same check in Python, which every model runs when it is built
(so the SDK, the operator and the trainer refuse what the API server refuses). Field-level
metadata that only the CRD needs (immutability, int-or-string, formats) goes in
``json_schema_extra`` through the helpers here, so a field's whole contract sits on the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

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

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        for rule in type(self).cel_rules:
            if rule.check is not None and not rule.check(self):
                # The rule's fieldPath travels in the error, so it can name the field as the API server does.
                raise PydanticCustomError(RULE_ERROR, rule.message, {"field_path": rule.field_path or ""})
        return self


RULE_ERROR = "cel_rule"


def field_errors(error: ValidationError) -> list[str]:
    """Each problem as ``spec.quantization.bits: <what to change>``, the way the API server names fields."""
    lines = []
    for item in error.errors():
        # A map key (anything but a field name: a label key, say) in brackets, as the API server writes it.
        path = "".join(
            f".{part}" if isinstance(part, str) and part.isidentifier() else f"[{part}]"
            for part in item["loc"]
        )
        if item["type"] == RULE_ERROR:
            path += str((item.get("ctx") or {}).get("field_path", ""))
        path = path.lstrip(".")
        lines.append(f"{path}: {item['msg']}" if path else str(item["msg"]))
    return lines


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
