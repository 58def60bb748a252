"""The one boundary between a server's bytes and batchrun: every answer crosses it once.

A chat answer (a JSON body or an event stream's chunks), an error body, the headers batchrun reads
and a model list each become here either a typed, bounded value or a row's failure with a kind:
strings are strings, token counts are ints in [0, 2**31) that fit the request they answer, short
fields are short, and the API key is masked in every letter case. Nothing past this module
distrusts a value, and nothing before it writes to the checkpoint, a table, a terminal or the
budget. The client (client.py) bounds the bytes read; this module bounds what they may say.

Usage a request could not have been billed for (negative, fractional, out of range, more
output than its max_tokens, totals that contradict their parts) is set aside as unknown: the
budget then counts the request at its worst case, and sums show it as without usage, so no
answer can lower spending or lift a budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import email.utils
import math
import re
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from batchrun.errors import EndpointDown, JobAborted, PermanentError, RequestFailed, RetryableError
from batchrun.limits import RateLimitHeaders

MAX_COUNT = 2**31  # a token count at or past this is no request's (and would overflow a report)
SHORT = 256  # characters kept of a model name, id, finish reason or tool name
MAX_WAIT_S = 86_400.0  # a Retry-After or reset past a day is read as "not said"
ERROR_MESSAGE_CHARS = 200
RETRYABLE_STATUS = frozenset({408, 409, 429})
OUTAGE_STATUS = frozenset({502, 503, 504})  # a gateway whose upstream is away: the breaker's evidence
# Error codes (OpenAI's and common gateways') that mean the account cannot pay for any request.
NO_CREDIT_CODES = frozenset(
    {"insufficient_quota", "insufficient_balance", "billing_hard_limit_reached", "quota_exceeded"}
)


class Redactor:
    """Masks an API key in server text: as sent, in any letter case, and cut short to 8+
    characters ("sk-abc123****"), since gateways quote keys back in error messages."""

    MIN_PREFIX = 8

    def __init__(self, secret: str):
        self._pattern: re.Pattern[str] | None = None
        if secret:
            # The longest prefix wins: the first 8 characters, then each further one only after
            # the one before it.
            first, rest = secret[: self.MIN_PREFIX], secret[self.MIN_PREFIX :]
            tail = "".join(f"(?:{re.escape(c)}" for c in rest) + ")?" * len(rest)
            self._pattern = re.compile(re.escape(first) + tail, re.IGNORECASE)

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub("[redacted]", text)


@dataclasses.dataclass(frozen=True, slots=True)
class ChatResult:
    """One answer, as read at the boundary: every field of the type it says, within bounds."""

    content: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    model: str | None
    response_id: str | None
    system_fingerprint: str | None = None  # the server's build that answered
    ttft_ms: float | None = None  # time to the first content piece, when streamed
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    reasoning_tokens: int | None = None  # usage.completion_tokens_details.reasoning_tokens
    budget: RateLimitHeaders | None = None  # the x-ratelimit-* headers, when the server sent them
    tool_calls: list[dict[str, str]] | None = None  # [{id, name, arguments}], arguments as JSON text
    usage_problem: str | None = None  # why the usage the server sent was set aside as unknown


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    usage_problem: str | None = None

    def as_fields(self) -> dict[str, Any]:
        """ChatResult's fields it fills (`dataclasses.asdict` deep-copies, ~10x the CPU)."""
        return {name: getattr(self, name) for name in self.__slots__}


@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """What an answer must fit: the request it answers, and the key to mask."""

    redact: Redactor
    output_tokens: int | None  # the request's max_tokens (or max_completion_tokens), if set


def invalid(message: str) -> RetryableError:
    """A row's failure for an answer batchrun cannot read; another attempt may read better."""
    return RetryableError("invalid_response", message)


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else "null"


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{where} is {_kind(value)}, not an object")
    return value


def _short(value: object, where: str, bounds: Bounds) -> str | None:
    """A short string field (model, id, finish_reason): a string, masked and cut, or null."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{where} is {_kind(value)}, not a string")
    return bounds.redact(value)[:SHORT]


def read_text(value: object, where: str) -> str | None:
    """Message content: a string, or a list of parts whose text parts are joined (Mistral's and
    others' shape); parts of other types (thinking, refusal) carry no answer text."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(f"{where} is {_kind(value)}, not text")
    texts = []
    for part in value:
        part = _object(part, f"a part of {where}")
        if part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"the text of a part of {where} is {_kind(text)}, not a string")
            texts.append(text)
    return "".join(texts)


def _arguments(value: object) -> str:
    """A tool call's arguments as JSON text: sent as a string, or (llama.cpp, others) an object."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        try:
            return orjson.dumps(value).decode()
        except TypeError:  # an integer past 64 bits
            raise invalid("tool call arguments hold a number out of range") from None
    raise invalid(f"tool call arguments are {_kind(value)}")


def _tool_calls(value: object, bounds: Bounds) -> list[dict[str, str]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise invalid(f"message.tool_calls is {_kind(value)}, not a list")
    calls = []
    for call in value:
        call = _object(call, "a tool call")
        function = _object(call.get("function"), "a tool call's function")
        calls.append(
            {
                "id": _short(call.get("id"), "a tool call's id", bounds) or "",
                "name": _short(function.get("name"), "a tool call's name", bounds) or "",
                "arguments": bounds.redact(_arguments(function.get("arguments"))),
            }
        )
    return calls or None


class _BadUsage(Exception):
    """Usage that no request could have been billed: set aside, not the row's failure."""


def _count(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadUsage(f"{name} is {_kind(value)}")
    if isinstance(value, float) and not value.is_integer():  # 12.0 is an integer in JSON Schema
        raise _BadUsage(f"{name} is {value}, not a whole number")
    if not 0 <= value < MAX_COUNT:
        raise _BadUsage(f"{name} is {value}, out of range")
    return int(value)


def read_usage(value: object, bounds: Bounds) -> Usage:
    """Token counts that a request of these bounds could have been billed; any other report is
    kept as unknown with the reason (the row then counts as without usage)."""
    if value is None:
        return Usage()
    try:
        if not isinstance(value, dict):
            raise _BadUsage(f"usage is {_kind(value)}")
        prompt_details = value.get("prompt_tokens_details") or {}
        completion_details = value.get("completion_tokens_details") or {}
        if not isinstance(prompt_details, dict) or not isinstance(completion_details, dict):
            raise _BadUsage("usage details are not objects")
        usage = Usage(
            _count(value.get("prompt_tokens"), "prompt_tokens"),
            _count(value.get("completion_tokens"), "completion_tokens"),
            _count(value.get("total_tokens"), "total_tokens"),
            _count(prompt_details.get("cached_tokens"), "cached_tokens"),
            _count(completion_details.get("reasoning_tokens"), "reasoning_tokens"),
        )
        _check_usage(usage, bounds)
        return usage
    except _BadUsage as exc:
        return Usage(usage_problem=str(exc))


def _check_usage(usage: Usage, bounds: Bounds) -> None:
    """Counts that contradict each other or the request. OpenAI counts reasoning inside
    completion_tokens, xAI beside it, in the total only: `prompt + completion <= total <=
    prompt + completion + reasoning` holds for both. max_tokens bounds what is generated,
    reasoning included."""
    prompt, completion, total = usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
    if usage.cached_tokens is not None and usage.cached_tokens > (prompt or 0):
        raise _BadUsage(f"cached_tokens {usage.cached_tokens} is more than prompt_tokens {prompt}")
    parts = None if prompt is None or completion is None else prompt + completion
    reasoning = usage.reasoning_tokens or 0
    if parts is not None and total is not None and not parts <= total <= parts + reasoning:
        raise _BadUsage(f"total_tokens {total} is not prompt_tokens + completion_tokens ({parts})")
    output = completion if total is None or prompt is None else max(total - prompt, completion or 0)
    cap = bounds.output_tokens
    if cap is not None and output is not None and output > cap:
        raise _BadUsage(f"{output} output tokens is more than the request's max_tokens {cap}")


def _server_error(value: object, bounds: Bounds) -> RetryableError:
    """`{"error": ...}` inside an answer of HTTP 200 (a stream's error chunk, a gateway's body)."""
    fields = error_fields({"error": value}, bounds.redact)
    message = fields.message or "the answer is an error"
    return RetryableError(fields.code or "server_error", f"the server sent an error: {message}")


def read_completion(raw: bytes, bounds: Bounds, budget: RateLimitHeaders | None = None) -> ChatResult:
    """A chat.completion body, or the row's failure: unreadable bodies are worth another attempt."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        snippet = bounds.redact(raw[:80].decode("utf-8", "replace"))
        raise invalid(f"unreadable completion body: {snippet!r}") from None
    data = _object(data, "the answer")
    if data.get("error") is not None:
        raise _server_error(data["error"], bounds)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise invalid(f"the answer's choices are {_kind(choices) if choices != [] else 'empty'}")
    choice = _object(choices[0], "choices[0]")
    message = _object(choice.get("message"), "choices[0].message")
    finish_reason = _short(choice.get("finish_reason"), "finish_reason", bounds)
    if finish_reason == "error":
        raise invalid("the answer ended with finish_reason: error")
    content = read_text(message.get("content"), "message.content")
    return ChatResult(
        content=None if content is None else bounds.redact(content),
        finish_reason=finish_reason,
        model=_short(data.get("model"), "model", bounds),
        response_id=_short(data.get("id"), "id", bounds),
        system_fingerprint=_short(data.get("system_fingerprint"), "system_fingerprint", bounds),
        tool_calls=_tool_calls(message.get("tool_calls"), bounds),
        budget=budget,
        **read_usage(data.get("usage"), bounds).as_fields(),
    )


class StreamAssembler:
    """A streamed answer's event data, fed one event at a time; `finish()` gives the answer or
    says it is incomplete. Each chunk is checked as it comes, like a whole body."""

    def __init__(self, bounds: Bounds) -> None:
        self._bounds = bounds
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.usage: object = None  # the last usage sent (vLLM sends a running one on every chunk)
        self.model: str | None = None
        self.response_id: str | None = None
        self.system_fingerprint: str | None = None
        self.done = False
        self.saw_content = False
        self._calls: dict[int, dict[str, str]] = {}  # tool calls by index, arguments growing

    def feed(self, data: str) -> bool:
        """Take one event's data; True when it carried the first piece of content (time to first token)."""
        if not data:
            return False  # an event of only `event:` or `id:` fields
        if data == "[DONE]":
            self.done = True
            return False
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise invalid(f"unreadable stream chunk ({exc})") from None
        chunk = _object(chunk, "a stream chunk")
        if chunk.get("error") is not None:
            raise _server_error(chunk["error"], self._bounds)
        self.response_id = self.response_id or _short(chunk.get("id"), "id", self._bounds)
        self.model = self.model or _short(chunk.get("model"), "model", self._bounds)
        fingerprint = _short(chunk.get("system_fingerprint"), "system_fingerprint", self._bounds)
        self.system_fingerprint = self.system_fingerprint or fingerprint
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise invalid(f"a stream chunk's choices are {_kind(choices)}")
        first = False
        for choice in choices:
            choice = _object(choice, "a stream choice")
            delta = _object(choice.get("delta") or {}, "a stream delta")
            content = read_text(delta.get("content"), "delta.content")
            if content:
                self.pieces.append(content)
            calls = delta.get("tool_calls") or []
            if not isinstance(calls, list):
                raise invalid(f"delta.tool_calls is {_kind(calls)}, not a list")
            for call in calls:
                self._add_tool_call_delta(_object(call, "a tool call delta"))
            if (content or calls) and not self.saw_content:
                first = self.saw_content = True
            if (reason := _short(choice.get("finish_reason"), "finish_reason", self._bounds)) is not None:
                if reason == "error":
                    raise invalid("the stream ended with finish_reason: error")
                self.finish_reason = reason
        return first

    def _add_tool_call_delta(self, call: dict[str, Any]) -> None:
        """Tool calls stream as pieces keyed by index: id and name once, arguments in parts."""
        index = call.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int):
            raise invalid(f"a tool call delta's index is {_kind(index)}")
        entry = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        function = _object(call.get("function") or {}, "a tool call delta's function")
        bounds = self._bounds
        entry["id"] = entry["id"] or _short(call.get("id"), "a tool call's id", bounds) or ""
        entry["name"] = entry["name"] or _short(function.get("name"), "a tool call's name", bounds) or ""
        entry["arguments"] += _arguments(function.get("arguments"))

    def finish(self, ttft_ms: float | None = None, budget: RateLimitHeaders | None = None) -> ChatResult:
        """The assembled answer; a stream cut off is worth another attempt.

        `[DONE]` alone does not prove the answer whole: llama.cpp's server sends it mid-answer
        when another request waits, so a stream whose choice never got a `finish_reason` is cut.
        """
        if not self.done:
            raise RetryableError("truncated_stream", "the stream ended before data: [DONE]")
        if self.finish_reason is None:
            raise RetryableError("truncated_stream", "data: [DONE] came before any finish_reason")
        redact = self._bounds.redact
        calls = [self._calls[i] for i in sorted(self._calls)]
        return ChatResult(
            content=redact("".join(self.pieces)) if self.pieces or not calls else None,
            finish_reason=self.finish_reason,
            model=self.model,
            response_id=self.response_id,
            system_fingerprint=self.system_fingerprint,
            ttft_ms=ttft_ms,
            budget=budget,
            tool_calls=[{**call, "arguments": redact(call["arguments"])} for call in calls] or None,
            **read_usage(self.usage, self._bounds).as_fields(),
        )


def read_models(raw: bytes, redact: Redactor) -> list[str]:
    """The ids of a `GET /models` list (`{"data": [{"id": ...}, ...]}`)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid("unreadable model list") from None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise invalid("the model list has no data list")
    ids = [entry.get("id") for entry in entries if isinstance(entry, dict)]
    return [redact(model)[:SHORT] for model in ids if isinstance(model, str)]


def classify_status(
    status: int, headers: Mapping[str, str], raw: bytes, redact: Redactor
) -> RequestFailed | JobAborted:
    """Map a non-200 answer to the error type that decides what happens next.

    A row's error kind is the server's error code when it gives one (`context_length_exceeded`),
    else `http_NNN`; a 429 is always `rate_limited`.
    """
    error = _error_fields(raw, redact)
    detail = f"HTTP {status}" + (f": {error.message}" if error.message else "")
    if status in (401, 403):
        return JobAborted(
            f"the endpoint rejected the API key ({detail}); check the key and that it may use this model"
        )
    if status == 402 or {error.code, error.type} & NO_CREDIT_CODES:
        return JobAborted(f"the account has no credit or quota left ({detail}); top up and rerun")
    if status == 404:
        return JobAborted(f"the endpoint answered 404 ({detail}); check the model name and endpoint.base_url")
    kind = "rate_limited" if status == 429 else error.code or f"http_{status}"
    if status in OUTAGE_STATUS:
        return EndpointDown(kind, detail, status, retry_after(headers))
    if status in RETRYABLE_STATUS or status >= 500:
        return RetryableError(kind, detail, status, retry_after(headers), server_budget(headers))
    return PermanentError(kind, detail, status)


class ErrorFields(NamedTuple):
    code: str | None  # a word such as `context_length_exceeded`; not a number (LiteLLM sends "400")
    type: str | None
    message: str | None


_CODE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_NO_ERROR = ErrorFields(None, None, None)


def _error_fields(raw: bytes, redact: Redactor) -> ErrorFields:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _NO_ERROR
    return error_fields(body, redact) if isinstance(body, dict) else _NO_ERROR


def error_fields(body: dict[str, Any], redact: Redactor) -> ErrorFields:
    """What an error body says, in OpenAI's shape (`error.code`, `.type`, `.message`), FastAPI's
    (`detail`, a string or a list of `{loc, msg}`), xAI's (`error` a string) or vLLM's (`message`)."""
    error = body.get("error")
    if not isinstance(error, dict):
        error = {"message": error or body.get("detail") or body.get("message"), "code": body.get("code")}
    message = error.get("message")
    if isinstance(message, list):  # FastAPI's validation errors
        message = "; ".join(_validation_error(item) for item in message)
    elif message is not None and not isinstance(message, str):
        message = str(message)
    code, kind = (error.get(key) for key in ("code", "type"))
    if not isinstance(code, str) or not _CODE_RE.fullmatch(code) or code.lower() in ("none", "null"):
        code = None
    return ErrorFields(
        code if code and redact(code) == code else None,  # a key quoted as the code is no kind
        redact(kind)[:SHORT] if isinstance(kind, str) and kind else None,
        redact(message)[:ERROR_MESSAGE_CHARS] if message else None,
    )


def _validation_error(item: object) -> str:
    """One of FastAPI's `detail` entries, `{"loc": ["body", "model"], "msg": "Field required"}`."""
    if not isinstance(item, dict):
        return str(item)[:ERROR_MESSAGE_CHARS]
    loc = item.get("loc")
    where = ".".join(str(part) for part in loc) if isinstance(loc, list) else ""
    return f"{where}: {item.get('msg')}" if where else str(item.get("msg"))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header as sent, or as a LiteLLM gateway forwards it (`llm_provider-retry-after`)."""
    return headers.get(name) or headers.get(f"llm_provider-{name}")


def _seconds(value: float) -> float | None:
    """A wait a server asked for, if it is one: finite, at most a day (a negative one is now)."""
    return max(0.0, value) if math.isfinite(value) and value <= MAX_WAIT_S else None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, else `Retry-After` (secs or date)."""
    if ms := _header(headers, "retry-after-ms"):
        try:
            return _seconds(float(ms) / 1000)
        except ValueError:
            pass
    value = _header(headers, "retry-after")
    if not value:
        return None
    try:
        return _seconds(float(value))
    except ValueError:
        pass
    try:
        return _seconds(email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?)(ms|h|m|s)?")
_UNIT_S = {"ms": 0.001, "h": 3600.0, "m": 60.0, "s": 1.0, None: 1.0}


def server_budget(headers: Mapping[str, str]) -> RateLimitHeaders | None:
    """The `x-ratelimit-remaining-*` / `-reset-*` / `-limit-*` headers (OpenAI's and xAI's names), if any."""
    requests = _header_count(_header(headers, "x-ratelimit-remaining-requests"))
    tokens = _header_count(_header(headers, "x-ratelimit-remaining-tokens"))
    if requests is None and tokens is None:
        return None
    return RateLimitHeaders(
        remaining_requests=requests,
        reset_requests_s=_duration(_header(headers, "x-ratelimit-reset-requests")),
        remaining_tokens=tokens,
        reset_tokens_s=_duration(_header(headers, "x-ratelimit-reset-tokens")),
        limit_requests=_header_count(_header(headers, "x-ratelimit-limit-requests")),
        limit_tokens=_header_count(_header(headers, "x-ratelimit-limit-tokens")),
    )


def _header_count(value: str | None) -> int | None:
    """A remaining count; Azure's `-1` and anything out of range say nothing."""
    try:
        count = int(value) if value is not None else None
    except ValueError:
        return None
    return count if count is not None and 0 <= count < MAX_COUNT else None


def _duration(value: str | None) -> float | None:
    """Seconds in a reset header: `0.25`, `20ms`, `1s`, `6m0s`, `1h2m3.5s`; None if unreadable."""
    if not value or len(value) > 64:
        return None
    parts = _DURATION_RE.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    return _seconds(sum(float(number) * _UNIT_S[unit or None] for number, unit in parts))


BATCH_ENDED = frozenset({"completed", "expired", "cancelled", "failed"})  # a batch's last statuses
BATCH_LINE_ERRORS = 20  # a failed batch's error messages kept


@dataclasses.dataclass(frozen=True, slots=True)
class BatchState:
    """A provider batch (OpenAI's batch object) as read at the boundary."""

    id: str
    status: str
    completed: int | None  # request_counts
    failed: int | None
    output_file_id: str | None
    error_file_id: str | None
    input_file_id: str | None
    errors: tuple[str, ...] = ()  # why it failed validation: the provider's messages
    total: int | None = None  # the requests in it
    name: str | None = None  # xAI's batches have one

    @property
    def ended(self) -> bool:
        return self.status in BATCH_ENDED


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        return _object(orjson.loads(raw), what)
    except orjson.JSONDecodeError:
        raise invalid(f"{what} is not JSON") from None


def read_file_id(raw: bytes, redact: Redactor) -> str:
    """The id of an uploaded file (OpenAI's file object)."""
    file_id = _short(_json_object(raw, "the file object").get("id"), "the file's id", Bounds(redact, None))
    if not file_id:
        raise invalid("the file object has no id")
    return file_id


def read_batch(raw: bytes, redact: Redactor) -> BatchState:
    """A batch object: its id, status, counts, files and errors, each checked and bounded."""
    return _batch_state(_json_object(raw, "the batch object"), Bounds(redact, None))


def read_batch_list(raw: bytes, redact: Redactor) -> list[BatchState]:
    """A list of batch objects (`GET /batches`); entries that are not batches are passed over."""
    entries = _json_object(raw, "the batch list").get("data")
    if not isinstance(entries, list):
        raise invalid("the batch list has no data list")
    bounds = Bounds(redact, None)
    found = []
    for entry in entries:
        try:
            found.append(_batch_state(_object(entry, "a batch"), bounds))
        except RetryableError:
            continue
    return found


def _batch_state(data: dict[str, Any], bounds: Bounds) -> BatchState:
    batch_id, status = (
        _short(data.get("id"), "the batch's id", bounds),
        _short(data.get("status"), "status", bounds),
    )
    if not batch_id or not status:
        raise invalid("the batch object has no id or status")
    counts = data.get("request_counts")
    counts = counts if isinstance(counts, dict) else {}
    listed = (data.get("errors") or {}).get("data") if isinstance(data.get("errors"), dict) else None
    messages = []
    for error in (listed if isinstance(listed, list) else [])[:BATCH_LINE_ERRORS]:
        if isinstance(error, dict):
            fields = error_fields({"error": error}, bounds.redact)
            line = error.get("line")
            where = f"line {line}: " if isinstance(line, int) and not isinstance(line, bool) else ""
            messages.append(where + (fields.message or fields.code or "invalid"))
    return BatchState(
        id=batch_id,
        status=status,
        completed=_optional_count(counts.get("completed")),
        failed=_optional_count(counts.get("failed")),
        output_file_id=_short(data.get("output_file_id"), "output_file_id", bounds),
        error_file_id=_short(data.get("error_file_id"), "error_file_id", bounds),
        input_file_id=_short(data.get("input_file_id"), "input_file_id", bounds),
        errors=tuple(messages),
        total=_optional_count(counts.get("total")),
    )


def _optional_count(value: object) -> int | None:
    try:
        return _count(value, "a count")
    except _BadUsage:
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class BatchLine:
    """One line of a batch's output or error file: the request it answers (custom_id), and its
    answer or its failure."""

    custom_id: str
    answer: ChatResult | None
    failure: RequestFailed | None
    status: int | None  # the line's HTTP status; None: no response (expired, cancelled, dropped)


def read_batch_line(raw: bytes, bounds: Bounds) -> BatchLine:
    """A result line, `{custom_id, response: {status_code, body}, error}`: its answer through
    read_completion, or its failure classified as a chat answer's would be (an answer that would
    stop an online job, 401 or 404, fails only its line). RetryableError if it names no request."""
    data = _json_object(raw, "a batch result line")
    custom_id = _short(data.get("custom_id"), "custom_id", bounds)
    if not custom_id:
        raise invalid("a batch result line has no custom_id")
    response = data.get("response")
    if not isinstance(response, dict):
        error = data.get("error")
        fields = error_fields({"error": error}, bounds.redact) if error else _NO_ERROR
        message = fields.message or "the batch gave no response for this request"
        return BatchLine(custom_id, None, RetryableError(fields.code or "batch_error", message), None)
    status = response.get("status_code")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status < 600:
        return BatchLine(custom_id, None, invalid(f"the line's status_code is {_kind(status)}"), None)
    body = orjson.dumps(response.get("body"))
    if status != 200:
        return BatchLine(custom_id, None, _line_failure(status, body, bounds), status)
    try:
        return BatchLine(custom_id, read_completion(body, bounds), None, status)
    except RetryableError as exc:
        return BatchLine(custom_id, None, exc, status)


def read_file_list(raw: bytes, redact: Redactor) -> dict[str, str]:
    """A list of files (`GET /files`): their ids by file name; entries without both are passed over."""
    entries = _json_object(raw, "the file list").get("data")
    if not isinstance(entries, list):
        raise invalid("the file list has no data list")
    bounds = Bounds(redact, None)
    found: dict[str, str] = {}
    for entry in entries:
        if isinstance(entry, dict):
            file_id = _short(entry.get("id"), "a file's id", bounds)
            name = _short(entry.get("filename"), "a file's name", bounds)
            if file_id and name:
                found[name] = file_id
    return found


def read_batch_api(raw: bytes) -> str | None:
    """Which Batch API answered `GET /batches`: `openai` (a `data` list), `xai` (a `batches` list)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("data"), list):
        return "openai"
    return "xai" if isinstance(data.get("batches"), list) else None


# xAI's batch results carry gRPC status codes; each as the HTTP status that says the same.
GRPC_STATUS = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400,
               12: 501, 13: 500, 14: 503, 15: 500, 16: 401}  # fmt: skip


def read_xai_batch(raw: bytes, redact: Redactor, now: float) -> BatchState:
    """xAI's batch object (`batch_id`, `state` counts, `expire_time`, `cancel_time`,
    `cancel_by_xai_message`), its status in OpenAI's words, which xAI does not give: `failed` if
    xAI cancelled it (its message), `validating` while it holds no request, `cancelling` /
    `cancelled` once cancelled, `expired` past its expiry with requests pending, else
    `in_progress` until none is pending, then `completed`."""
    return _xai_state(_json_object(raw, "the batch object"), Bounds(redact, None), now)


def read_xai_batch_list(raw: bytes, redact: Redactor, now: float) -> tuple[list[BatchState], str | None]:
    """A page of xAI's batch list (`batches`, `pagination_token`); entries not batches passed over."""
    data = _json_object(raw, "the batch list")
    entries = data.get("batches")
    if not isinstance(entries, list):
        raise invalid("the batch list has no batches list")
    bounds = Bounds(redact, None)
    found = []
    for entry in entries:
        with contextlib.suppress(RetryableError):
            found.append(_xai_state(_object(entry, "a batch"), bounds, now))
    return found, _short(data.get("pagination_token"), "pagination_token", bounds) or None


def _xai_state(data: dict[str, Any], bounds: Bounds, now: float) -> BatchState:
    batch_id = _short(data.get("batch_id"), "the batch's id", bounds)
    if not batch_id:
        raise invalid("the batch object has no batch_id")
    state = data.get("state")
    counts = {
        name: _optional_count(state.get(f"num_{name}")) or 0 if isinstance(state, dict) else 0
        for name in ("requests", "pending", "success", "error", "cancelled")
    }
    rejected = read_text(data.get("cancel_by_xai_message"), "cancel_by_xai_message")
    cancelled = data.get("cancel_time") is not None
    expires = _timestamp(data.get("expire_time"))
    if rejected:
        status = "failed"
    elif counts["pending"]:
        expired = expires is not None and expires <= now
        status = "cancelling" if cancelled else "expired" if expired else "in_progress"
    elif counts["cancelled"] or cancelled:
        status = "cancelled"
    else:
        status = "completed" if counts["requests"] else "validating"
    return BatchState(
        id=batch_id,
        status=status,
        completed=counts["success"],
        failed=counts["error"],
        output_file_id=None,
        error_file_id=None,
        input_file_id=None,
        errors=(bounds.redact(rejected)[:ERROR_MESSAGE_CHARS],) if rejected else (),
        total=counts["requests"],
        name=_short(data.get("name"), "name", bounds),
    )


def _timestamp(value: object) -> float | None:
    """An RFC 3339 time (`2025-01-02T03:04:05.678Z`) in seconds since the epoch; None if not one."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


def read_xai_results(raw: bytes, bounds: Bounds) -> tuple[list[BatchLine | None], str | None]:
    """A page of an xAI batch's results (`results`, or `succeeded` and `failed`; and the next
    page's `pagination_token`): each a BatchLine, or None for an entry that names no request."""
    data = _json_object(raw, "a page of batch results")
    entries = [
        entry
        for key in ("results", "succeeded", "failed")
        if isinstance(data.get(key), list)
        for entry in data[key]
    ]
    lines: list[BatchLine | None] = []
    for entry in entries:
        try:
            lines.append(_xai_result(_object(entry, "a batch result"), bounds))
        except RetryableError:
            lines.append(None)
    return lines, _short(data.get("pagination_token"), "pagination_token", bounds) or None


def _xai_result(data: dict[str, Any], bounds: Bounds) -> BatchLine:
    """One result, `{batch_request_id, batch_result: {response: {chat_get_completion}} | {error}}`
    (an `error` or `error_message` beside `batch_result` is read too)."""
    custom_id = _short(data.get("batch_request_id"), "batch_request_id", bounds)
    if not custom_id:
        raise invalid("a batch result has no batch_request_id")
    result = data.get("batch_result")
    result = result if isinstance(result, dict) else {}
    response = result.get("response")
    if isinstance(response, dict) and "chat_get_completion" in response:
        completion = response["chat_get_completion"]
        if not isinstance(completion, dict):
            return BatchLine(custom_id, None, invalid(f"the result's answer is {_kind(completion)}"), 200)
        try:
            return BatchLine(custom_id, read_completion(orjson.dumps(completion), bounds), None, 200)
        except RetryableError as exc:
            return BatchLine(custom_id, None, exc, 200)
    error = next(
        (
            e
            for e in (
                result.get("error"),
                result.get("error_message"),
                data.get("error"),
                data.get("error_message"),
            )
            if e
        ),
        None,
    )
    fields = error_fields({"error": error}, bounds.redact) if error else _NO_ERROR
    message = fields.message or "the batch gave no answer for this request"
    code = error.get("code") if isinstance(error, dict) else None
    status = GRPC_STATUS.get(code) if isinstance(code, int) and not isinstance(code, bool) else None
    if status is None:
        return BatchLine(custom_id, None, RetryableError("batch_error", message), None)
    body = orjson.dumps({"error": {"message": message}})
    return BatchLine(custom_id, None, _line_failure(status, body, bounds), status)


def _line_failure(status: int, body: bytes, bounds: Bounds) -> RequestFailed:
    """A batch line's failure, classified as a chat answer's would be; an answer that would stop
    an online job (401, 404) fails only its line."""
    failure = classify_status(status, {}, body, bounds.redact)
    if isinstance(failure, JobAborted):
        return PermanentError(f"http_{status}", failure.what(), status)
    return failure
