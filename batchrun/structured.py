"""Structured output: the job's `output.fields` read out of an answer, checked and typed.

The fields come from the first tool call's arguments when the job uses tools, else from JSON in
the content (a ```json fenced block is tolerated, as models often add one). An answer that does
not parse or does not fit raises InvalidOutput; the runner asks again, showing the model its
answer and the reason (at temperature 0 the same question gets the same answer).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import orjson
import polars as pl

from batchrun.answers import ChatResult
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
# What batchrun sends as response_format while an endpoint refuses the one before: the strict
# schema derived from output.fields, then JSON mode with that schema (llama.cpp's server and others
# take it and keep to the schema), then plain JSON mode, then none.
_JSON_MODE = {"type": "json_object"}
_NOT_READ = "Not run: only the first call is read."
_REASON_CHARS = 300  # of a reason quoted back to the model: field values can be long


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


def format_fallbacks(fields: Mapping[str, FieldType]) -> tuple[dict[str, Any] | None, ...]:
    """The response_formats to try in turn when the endpoint refuses one; None: send none."""
    return response_format(fields), {**_JSON_MODE, "schema": json_schema(fields)}, _JSON_MODE, None


def describe_format(format: dict[str, Any] | None) -> str:
    """A response_format in one line: a schema, which can be long, is named, not quoted."""
    if format is None:
        return "no response_format"
    shown = orjson.dumps({k: v for k, v in format.items() if k != "schema"}).decode()
    return f"response_format {shown}" + (" with the fields' schema" if "schema" in format else "")


def read_fields(
    fields: Mapping[str, FieldType], answer: ChatResult, tools: bool, cap: tuple[str, int] | None
) -> dict[str, Any]:
    """The fields out of an answer (its first tool call's with `tools`); InvalidOutput says what
    is off, or that the answer was cut short, which only a higher `cap` (params key, value) cures."""
    try:
        return parse_fields(fields, answer.content, (answer.tool_calls or []) if tools else None)
    except InvalidOutput:
        if (cut := cut_short(answer, cap)) is not None:
            raise InvalidOutput(cut) from None
        raise


def cut_short(answer: ChatResult, cap: tuple[str, int] | None) -> str | None:
    """Why the answer was cut short, if it was: at the cap (params key, value), or by the endpoint.

    A tool call cut at the cap can still say `finish_reason: tool_calls` (llama.cpp's server
    does), so completion tokens that reach the cap count as cut too.
    """
    if cap is not None and (answer.finish_reason == "length" or (answer.completion_tokens or 0) >= cap[1]):
        return f"the answer was cut at params.{cap[0]} ({cap[1]}); raise params.{cap[0]}"
    if answer.finish_reason == "length":
        return "the answer was cut short by the endpoint (finish_reason length); set params.max_tokens"
    return None


def reask_messages(
    answer: ChatResult, error: InvalidOutput, tools: bool, cap: tuple[str, int] | None
) -> list[dict[str, Any]]:
    """What follows the question in a re-ask: the answer that did not fit, then why, so that
    the model (at temperature 0 too) has a reason to answer differently.

    An assistant message with tool calls must be followed by one tool message per call id
    (servers such as llama.cpp's refuse the conversation otherwise); a call the server sent
    without an id gets one made up from its position, the same in both messages.
    """
    if cut_short(answer, cap) is not None:
        reason = "it was cut off at the length limit; answer more briefly"
    else:
        reason = str(error).removeprefix(f"{error.kind}: ")[:_REASON_CHARS]
    again = (
        "Call the tool again with arguments that fit." if tools else "Answer again with only the JSON object."
    )
    if not answer.tool_calls:
        said = {"role": "assistant", "content": answer.content or ""}
        return [said, {"role": "user", "content": f"Your answer did not fit: {reason}. {again}"}]
    ids = [c["id"] or f"call_{i}" for i, c in enumerate(answer.tool_calls)]
    calls = [
        {"id": id_, "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for id_, c in zip(ids, answer.tool_calls, strict=True)
    ]
    # The fields are read from the first call only: its tool message says what was wrong.
    results = [f"Not run: the arguments did not fit: {reason}.", *(_NOT_READ for _ in ids[1:])]
    not_run = [
        {"role": "tool", "tool_call_id": id_, "content": text} for id_, text in zip(ids, results, strict=True)
    ]
    return [
        {"role": "assistant", "content": answer.content, "tool_calls": calls},
        *not_run,
        {"role": "user", "content": again},
    ]


@functools.cache
def reask_growth() -> int:
    """More prompt tokens than a re-ask adds to the question besides the answer it quotes (which
    the answer's own output tokens bound): the bytes of the messages with the longest reason
    (four bytes a character) and a tool call named and identified in 64 characters each."""
    call = {"id": "x" * 64, "name": "x" * 64, "arguments": ""}
    answer = ChatResult("", None, None, None, None, None, None, tool_calls=[call])
    long_reason = InvalidOutput("\U0001f600" * _REASON_CHARS)
    return len(orjson.dumps(reask_messages(answer, long_reason, True, None)))


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
