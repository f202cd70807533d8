"""The base of every config section: unknown keys refused, no booleans taken as numbers, and the small
helpers the validators share (a check that names the fix, a value shown short, JSON-only values)."""

from __future__ import annotations

import math
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads true/false/yes/no/on/off as booleans, which pydantic would take as 1 and 0."""
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError(
                "bool_number", "expected a number, not a boolean (YAML reads true/false/yes/no/on/off as booleans)"
            )
        return value


def _is_number(annotation: Any) -> bool:
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType, Literal) else (annotation,)
    return any(option in (int, float) or type(option) is int for option in options)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def shown(value: Any) -> str:
    """A value as a message quotes it: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_json(value: Any, key: str, open_ids: set[int]) -> None:
    """DeepSpeed configs are JSON: strings, finite numbers, booleans, null, lists, string-keyed mappings."""
    if isinstance(value, (dict, list)):
        check(id(value) not in open_ids, f"{key} contains itself (a YAML alias loop); write it out")
        open_ids.add(id(value))
        for item_key, item in value.items() if isinstance(value, dict) else enumerate(value):
            check(
                isinstance(item_key, str) or isinstance(value, list),
                f"{key} has the non-string key {item_key!r}; quote it",
            )
            _check_json(item, f"{key}.{item_key}", open_ids)
        open_ids.discard(id(value))
        return
    check(
        value is None or isinstance(value, (str, int)) or isinstance(value, float) and math.isfinite(value),
        f"{key}={shown(value)} is not a JSON value (string, finite number, boolean, null, list or mapping); quote it",
    )
