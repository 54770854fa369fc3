"""The JSON Schema -> structural schema translation refuses what it cannot carry into the CRD."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field

from kubetune_api.base import ApiModel
from kubetune_api.openapi import schema_of, structural


def _structural(model: type[ApiModel]) -> dict[str, Any]:
    schema, defs = schema_of(model)
    return structural(schema, defs, "")


def test_optional_nested_models_lists_and_enums_translate() -> None:
    class Inner(ApiModel):
        """An inner object."""

        size: int = Field(default=3, ge=1)
        """How many."""

    class Outer(ApiModel):
        """An outer object."""

        inner: Inner | None = None
        """Maybe an inner object."""
        names: tuple[str, ...] | None = Field(default=None, max_length=4)
        """Some names."""
        mode: str = Field(default="a", pattern="^(a|b)$")
        """A mode."""

    out = _structural(Outer)
    assert out["properties"]["inner"]["properties"]["size"] == {
        "type": "integer",
        "minimum": 1,
        "default": 3,
        "description": "How many.",
    }
    assert out["properties"]["names"] == {
        "type": "array",
        "maxItems": 4,
        "description": "Some names.",
        "items": {"type": "string"},
    }
    assert "required" not in out


@pytest.mark.parametrize(
    ("annotation", "default", "complaint"),
    [
        (dict[str, Any] | None, None, "free-form object would be pruned"),
        (tuple[int, int] | None, None, "does not know"),
        (int | None, 5, "can never be unset"),
    ],
)
def test_what_the_crd_cannot_carry_fails_loudly(annotation: Any, default: Any, complaint: str) -> None:
    model = type(
        "Model",
        (ApiModel,),
        {
            "__annotations__": {"field": annotation},
            "field": default,
            "__doc__": "A model.",
            "__module__": __name__,
        },
    )
    with pytest.raises(ValueError, match=complaint):
        _structural(model)
