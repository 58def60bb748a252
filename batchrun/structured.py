"""Structured output: the job's `output.fields` read out of an answer, checked and typed.

The fields come from the first tool call's arguments when the job uses tools, else from JSON in
the content (a ```json fenced block is tolerated, as models often add one). An answer that does
not parse or does not fit raises InvalidOutput, which the runner retries like a failed request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
import polars as pl

from batchrun.errors import InvalidOutput
from batchrun.job import EnumField, FieldType

_FENCED_RE = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_POLARS_TYPES: dict[str, Any] = {
    "string": pl.String,
    "integer": pl.Int64,
    "number": pl.Float64,
    "boolean": pl.Boolean,
    "list": pl.List(pl.String),
}
_JSON_TYPES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}


def polars_type(field: FieldType) -> Any:
    return pl.String if isinstance(field, EnumField) else _POLARS_TYPES[field]


def json_schema(fields: Mapping[str, FieldType]) -> dict[str, Any]:
    """The fields as a JSON schema, for `response_format` (strict structured outputs)."""
    properties: dict[str, Any] = {}
    for name, field in fields.items():
        if isinstance(field, EnumField):
            properties[name] = {"type": "string", "enum": list(field.enum)}
        elif field == "list":
            properties[name] = {"type": "array", "items": {"type": "string"}}
        else:
            properties[name] = {"type": _JSON_TYPES[field]}
    return {
        "type": "object",
        "properties": properties,
        "required": list(fields),
        "additionalProperties": False,
    }


def response_format(fields: Mapping[str, FieldType]) -> dict[str, Any]:
    schema = {"name": "fields", "strict": True, "schema": json_schema(fields)}
    return {"type": "json_schema", "json_schema": schema}


def parse_fields(
    fields: Mapping[str, FieldType], content: str | None, tool_calls: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """The declared fields out of one answer, typed; raises InvalidOutput saying what is off."""
    if tool_calls is not None:
        if not tool_calls:
            raise InvalidOutput("expected a tool call carrying the fields; the answer had none")
        data = tool_calls[0]["arguments"]
        if isinstance(data, str):
            data = _json(data, "the tool call's arguments")
    else:
        if not content or not content.strip():
            raise InvalidOutput("expected a JSON object with the fields; the answer was empty")
        fenced = _FENCED_RE.search(content)
        data = _json(fenced[1] if fenced else content, "the answer")
    if not isinstance(data, dict):
        raise InvalidOutput(f"expected a JSON object with the fields, got {type(data).__name__}")
    return {name: _fit(name, field, data.get(name)) for name, field in fields.items()}


def _json(text: str, what: str) -> Any:
    try:
        return orjson.loads(text.strip())
    except orjson.JSONDecodeError:
        raise InvalidOutput(f"{what} is not valid JSON: {text.strip()[:60]!r}") from None


def _fit(name: str, field: FieldType, value: Any) -> Any:
    if value is None:
        raise InvalidOutput(f"field '{name}' is missing")
    if isinstance(field, EnumField):
        if value not in field.enum:
            raise InvalidOutput(f"field '{name}' is {value!r}, not one of {', '.join(field.enum)}")
        return value
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[field]
    if field == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    if not ok:
        expected = "a list of strings" if field == "list" else f"a {field}"
        raise InvalidOutput(f"field '{name}' is {value!r}, not {expected}")
    return float(value) if field == "number" else value
