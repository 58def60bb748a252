"""An OpenAI-compatible chat-completions server for offline runs, tests and benchmarks.

Answers are deterministic (the lead sentences of the last user message), so a run against the
simulator is reproducible and costs nothing. Faults are injected either by configuration
(latency, seeded lognormal latency, random 5xx, requests- and tokens-per-minute limits with
x-ratelimit-* headers (see simulator/ratelimits.py), an API key) or by markers written into the
last user message, so a test can aim one fault at one input row:

* ``[[fail:CODE]]`` / ``[[fail:CODExN]]`` - answer HTTP CODE (always / the first N times this
  exact body is seen);
* ``[[fail:badjson]]`` / ``[[fail:badjsonxN]]`` - status 200 with a body that is not JSON;
* ``[[fail:reset]]`` / ``[[fail:resetxN]]`` - drop the connection without answering;
* ``[[fail:truncate]]`` / ``[[fail:truncatexN]]`` - (streams) end the stream before ``[DONE]``;
* ``[[fail:badoutput]]`` / ``[[fail:badoutputxN]]`` - status 200, but the JSON answer or tool
  call does not fit the requested schema;
* ``[[sleep:MS]]`` - wait MS milliseconds before answering.

The Batch API (files and batches, OpenAI's shape; or xAI's) answers each line as this endpoint
answers its body; see simulator/batches.py and simulator/xai_batches.py for their timing and markers.

Usage markers shape the reported token counts, for cost tests:

* ``[[cached:N]]`` - report N of the prompt tokens as cached (``prompt_tokens_details``);
* ``[[prompt_tokens:N]]`` - report a prompt of N tokens (a 200k-token prompt without sending one).

Images (``image_url`` parts) count as prompt tokens by OpenAI's tile rule, and malformed parts
get the 400 a real endpoint gives: see simulator/vision.py.

With ``tools`` (and ``tool_choice`` not "none") the answer is a call of the first tool (or the one
``tool_choice`` names) with arguments made up to fit its JSON schema; with a ``json_schema``
``response_format`` the content is such a JSON object. Made-up values derive from the message
text, so they are deterministic too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import math
import random
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from batchrun.simulator.batches import PATHS as BATCH_PATHS
from batchrun.simulator.batches import OpenAIBatches
from batchrun.simulator.httpserver import HttpServer, Outcome, Request, Response
from batchrun.simulator.ratelimits import HeaderMode, RateLimits, Window
from batchrun.simulator.vision import BadPart, content_image_tokens
from batchrun.simulator.xai_batches import XaiBatches

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END_RE = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_MARKER_RE = re.compile(
    r"\[\[(?:fail:([1-5]\d\d|badjson|badoutput|reset|truncate)(?:x(\d+))?|sleep:(\d+))\]\]"
)
_USAGE_MARKER_RE = re.compile(r"\[\[(cached|prompt_tokens):(\d+)\]\]")
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_STREAM_PIECE_TOKENS = 4
_MODELS_CREATED = 1_735_689_600

SYSTEM_FINGERPRINT = "fp_simulator"  # the build that answers, as OpenAI and xAI name theirs


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated provider behaves; every random choice derives from ``seed``."""

    latency_ms: float = 0.0  # mean delay per request
    latency_sigma: float = 0.0  # > 0: delays drawn from a lognormal with this sigma (see latencies)
    error_rate: float = 0.0
    rpm: int | None = None
    # Tokens per minute: each request counts the tokens its usage reports (prompt + completion).
    tpm: int | None = None
    # How rpm and tpm are enforced, a 60th of each per 1 s: "sliding" counts the last second before
    # each request (a log, as many gateways do); "fixed" counts whole 1 s slices (as xAI does).
    # Sliding is the default because it is the stricter: a client within it is within any fixed
    # slice too.
    window: Window = "sliding"
    # What x-ratelimit-* headers count: that 1 s ("window"), or the minute, as OpenAI's do.
    headers: HeaderMode = "window"
    retry_after_s: float = 1.0
    seed: int = 0
    api_key: str | None = None
    models: tuple[str, ...] = ("grok-4.3", "grok-4.3-mini", "grok-3")
    # Offered besides `models`: a job's own model, so any job can be tried with --simulate.
    extra_models: tuple[str, ...] = ()
    # The rate limits' clock: tests whose subject is the window inject one they move by hand.
    clock: Callable[[], float] = time.monotonic
    keep_bodies: bool = False  # keep each chat request's (and batch line's) body in stats.bodies, for tests
    batch_api: Literal["openai", "xai", "none"] = "openai"  # the Batch API it offers (none: 404s)
    batch_s: float = 0.0  # how long a batch takes from its creation to its end
    batch_delay_ms: float = 0.0  # each Batch API answer's delay (done at once, answered after it)

    @property
    def offered(self) -> tuple[str, ...]:
        """Every model the simulator lists and answers for, each once."""
        return tuple(dict.fromkeys((*self.models, *self.extra_models)))


@dataclass
class SimulatorStats:
    """What the server actually did, for tests in the same process (e.g. a row paid twice)."""

    requests: int = 0
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    ok_by_user_message: collections.Counter[str] = field(default_factory=collections.Counter)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time.monotonic(), status)
    first_arrival_at: float | None = None  # arrivals is in order of answer, not of arrival
    bodies: list[bytes] = field(default_factory=list)  # with SimulatorConfig.keep_bodies, in arrival order
    last_answer_at: float = 0.0
    batch_requests: int = 0  # to the Batch API (files and batches)
    uploads: int = 0  # files uploaded
    batch_lines: int = 0  # batch lines answered (each also counted in ok_by_user_message when ok)
    batch_adds: int = 0  # calls that added requests to a batch (xAI's Batch API)
    tokens: int = 0  # in the usage of chat answers

    def summary(self) -> dict[str, Any]:
        """The counts as JSON (GET /simulator/stats), for a client in another process."""
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "tokens": self.tokens,
            # From the first request's arrival to the last answer: the client's time at the server.
            "span_s": self.last_answer_at - (self.first_arrival_at or self.last_answer_at),
            # time.monotonic() is the system's CLOCK_MONOTONIC on Linux, one clock for every
            # process: a benchmark subtracts the time it started a client (first request latency).
            "first_arrival_monotonic": self.first_arrival_at,
            "last_answer_monotonic": self.last_answer_at or None,
        }


@dataclass(frozen=True)
class RunningSimulator:
    """A simulator serving in a background thread."""

    base_url: str
    stats: SimulatorStats
    host: str
    port: int


@dataclass(frozen=True)
class _Later:
    """An answer due after a delay (latency, [[sleep]])."""

    delay_s: float
    answer: Callable[[], Outcome]


@dataclass(frozen=True)
class _Chat:
    """The parts of a validated request body that shape the answer."""

    model: str
    texts: list[str]
    last_user: str
    max_tokens: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    tool: dict[str, Any] | None  # the function to call instead of answering in text
    schema: dict[str, Any] | None  # response_format's JSON schema for the content
    image_tokens: int = 0  # the prompt tokens of its images (vision.py)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def latencies(mean_ms: float, sigma: float, seed: int) -> Iterator[float]:
    """The simulator's delays in seconds, in order of arrival: the same seed, the same sequence,
    so a benchmark can compute what a client with no overhead would achieve on them."""
    if sigma <= 0:
        yield from itertools.repeat(mean_ms / 1000)
        return
    rng = random.Random(seed)
    mu = math.log(mean_ms / 1000) - sigma**2 / 2  # so that the mean is mean_ms
    while True:
        yield rng.lognormvariate(mu, sigma)


@functools.lru_cache(maxsize=4096)  # texts repeat (system prompts, benchmark inputs); see _reply
def count_tokens(text: str) -> int:
    """The simulator's token count: words and single punctuation marks."""
    return len(TOKEN_RE.findall(text))


def _content_text(content: Any, param: str) -> str:
    """Message content as text: a string, None, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return " ".join(p["text"] for p in content if isinstance(p.get("text"), str))
    raise _BadRequest("content must be a string or a list of content parts", param)


def _parse(body: bytes) -> _Chat:
    """Validate a request body the way the real API does, enough to catch client bugs."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _BadRequest("We could not parse the JSON body of your request.", None) from None
    if not isinstance(data, dict):
        raise _BadRequest("The request body must be a JSON object.", None)
    model, messages = data.get("model"), data.get("messages")
    if not isinstance(model, str):
        raise _BadRequest("you must provide a model parameter", "model")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list", "messages")
    texts: list[str] = []
    last_user = ""
    image_tokens = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _BadRequest("each message must be an object with a role", f"messages[{i}]")
        texts.append(_content_text(message.get("content"), f"messages[{i}].content"))
        if isinstance(parts := message.get("content"), list):
            try:
                image_tokens += content_image_tokens(parts, f"messages[{i}]", message["role"])
            except BadPart as exc:
                raise _BadRequest(str(exc), exc.param, exc.code) from None
        if message["role"] == "user":
            last_user = texts[-1]
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise _BadRequest("max_tokens must be a positive integer", "max_tokens")
    stop = data.get("stop")
    if stop is None or isinstance(stop, str):
        stop = [] if stop is None else [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _BadRequest("stop must be a string or a list of strings", "stop")
    stream_options = data.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    response_format = data.get("response_format")
    schema = None
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {"type": "object"}
    return _Chat(
        model=model,
        texts=texts,
        last_user=last_user,
        max_tokens=max_tokens,
        stop=stop,
        stream=data.get("stream") is True,
        include_usage=include_usage,
        tool=_chosen_tool(data.get("tools"), data.get("tool_choice")),
        schema=schema,
        image_tokens=image_tokens,
    )


@functools.lru_cache(maxsize=4096)
def _reply(text: str, max_tokens: int | None, stop: tuple[str, ...]) -> tuple[str, str, int]:
    """compose_answer and its token count, remembered: the regexes are most of the simulator's
    CPU per request, and a benchmark must measure the client, not the simulator."""
    content, finish = compose_answer(text, max_tokens, list(stop))
    return content, finish, count_tokens(content)


def _chosen_tool(tools: Any, choice: Any) -> dict[str, Any] | None:
    """The function the model "decides" to call: the one tool_choice names, else the first."""
    if tools is None or choice == "none":
        return None
    if not isinstance(tools, list) or not tools:
        raise _BadRequest("tools must be a non-empty list", "tools")
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _BadRequest("each tool must be {type: function, function: {name, ...}}", f"tools[{i}]")
        functions.append(function)
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        named = [f for f in functions if f["name"] == wanted]
        if not named:
            raise _BadRequest(f"tool_choice names an unknown function {wanted!r}", "tool_choice")
        return named[0]
    return functions[0]


def made_up(schema: Any, text: str, key: str = "") -> Any:
    """A value fitting JSON `schema`, derived from `text`: the simulator's structured answers."""
    if not isinstance(schema, dict):
        return None
    digest = int.from_bytes(hashlib.blake2b(f"{key}:{text}".encode(), digest_size=4).digest())
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][digest % len(schema["enum"])]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    words = TOKEN_RE.findall(text) or [key or "none"]
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: made_up(sub, text, name) for name, sub in properties.items()}
    if kind == "array":
        return [made_up(schema.get("items") or {}, text, f"{key}{i}") for i in range(2)]
    if kind == "integer":
        return len(words)
    if kind == "number":
        return len(words) / 10
    if kind == "boolean":
        return digest % 2 == 0
    if kind == "string":
        start = digest % len(words)
        return " ".join(words[start : start + 3])
    return None


def compose_answer(text: str, max_tokens: int | None, stop: list[str]) -> tuple[str, str]:
    """The deterministic reply: the first two sentences of ``text``; returns (content, finish)."""
    text = " ".join(_USAGE_MARKER_RE.sub(" ", _MARKER_RE.sub(" ", text)).split())
    ends = [m.end() for m in itertools.islice(_SENTENCE_END_RE.finditer(text), 2)]
    answer = text[: ends[-1]] if len(ends) == 2 else text
    cuts = [i for s in stop if s and (i := answer.find(s)) >= 0]
    if cuts:
        answer = answer[: min(cuts)]
    if max_tokens is not None:
        token_ends = [m.end() for m in TOKEN_RE.finditer(answer)]
        if len(token_ends) > max_tokens:
            return answer[: token_ends[max_tokens - 1]], "length"
    return answer, "stop"


class _Simulator:
    """Request handlers plus the mutable state they share (attempt counts, rate window, RNG)."""

    def __init__(self, config: SimulatorConfig, stats: SimulatorStats) -> None:
        self.config = config
        self.stats = stats
        self._rng = random.Random(config.seed)
        self._latencies = latencies(config.latency_ms, config.latency_sigma, config.seed)
        self._attempts: dict[str, int] = {}
        self._auth = None if config.api_key is None else f"Bearer {config.api_key}"
        self._limits = RateLimits(config.rpm, config.tpm, config.window, config.headers)
        self._retry_headers = {
            "Retry-After": str(math.ceil(config.retry_after_s)),
            "retry-after-ms": str(round(config.retry_after_s * 1000)),
        }
        self._offered = frozenset(config.offered)
        models = [
            {"id": m, "object": "model", "created": _MODELS_CREATED, "owned_by": "xai"}
            for m in config.offered
        ]
        self._models_body = orjson.dumps({"object": "list", "data": models})
        self._routes: dict[str, tuple[str, Callable[[Request], Outcome | Coroutine[Any, Any, Outcome]]]] = {
            "/v1/models": ("GET", self.models),
            "/v1/chat/completions": ("POST", self.chat),
            "/simulator/stats": ("GET", self.stats_summary),
            "/simulator/reset": ("POST", self.reset_stats),
        }
        self._batches: OpenAIBatches | XaiBatches | None = None
        if config.batch_api == "openai":
            self._batches = OpenAIBatches(config.batch_s, self.reply, self._error, stats)
        elif config.batch_api == "xai":
            self._batches = XaiBatches(config.batch_s, self.reply, stats)

    def _error(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        default_kind = "server_error" if status >= 500 else "invalid_request_error"
        kind = _ERROR_TYPES.get(status, default_kind)
        headers = {**self._retry_headers, **(headers or {})} if status in (429, 503) else headers or {}
        payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return Response(status, orjson.dumps(payload), headers)

    def _unauthorized(self, request: Request) -> Response | None:
        if self._auth is None or request.headers.get("authorization") == self._auth:
            return None
        # Like real providers, quote the key back: clients must keep it out of their logs.
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        return self._error(401, f"Incorrect API key provided: {given}.", code="invalid_api_key")

    def handle(self, request: Request) -> Outcome | Coroutine[Any, Any, Outcome]:
        """Route a request: an answer now, or a coroutine for one that waits (latency, [[sleep]])."""
        route = self._routes.get(request.path)
        if route is None and self._batches is not None and request.path.startswith(BATCH_PATHS):
            answer = self._unauthorized(request) or self._batches.handle(request)
            delay_s = self.config.batch_delay_ms / 1000
            return _answer_after(delay_s, answer) if delay_s else answer
        if route is None:
            return self._error(404, f"Unknown request URL: {request.method} {request.path}.")
        method, handler = route
        if request.method != method:
            return self._error(405, f"Method {request.method} not allowed on {request.path}.")
        return handler(request)

    def models(self, request: Request) -> Response:
        return self._unauthorized(request) or Response(200, self._models_body)

    def stats_summary(self, request: Request) -> Response:
        return Response(200, orjson.dumps(self.stats.summary()))

    def reset_stats(self, request: Request) -> Response:
        """Start counting afresh (the benchmark measures several clients on one server)."""
        self.stats.requests = 0
        self.stats.by_status.clear()
        self.stats.ok_by_user_message.clear()
        self.stats.arrivals.clear()
        self.stats.bodies.clear()
        self.stats.first_arrival_at = None
        self.stats.last_answer_at = 0.0
        self.stats.tokens = 0
        self._limits.clear()
        self._latencies = latencies(self.config.latency_ms, self.config.latency_sigma, self.config.seed)
        return Response(200, orjson.dumps(self.stats.summary()))

    def chat(self, request: Request) -> Outcome | Coroutine[Any, Any, Outcome]:
        self.stats.requests += 1
        if self.config.keep_bodies:
            self.stats.bodies.append(request.body)
        arrived = time.monotonic()
        if self.stats.first_arrival_at is None:
            self.stats.first_arrival_at = arrived
        outcome = self._chat(request)
        if isinstance(outcome, _Later):
            return self._counted_later(arrived, outcome)
        return self._counted(arrived, outcome)

    def _counted(self, arrived: float, outcome: Outcome) -> Outcome:
        if outcome is not None:  # a dropped connection has no status
            self.stats.by_status[outcome.status] += 1
            self.stats.arrivals.append((arrived, outcome.status))
            self.stats.last_answer_at = time.monotonic()
        return outcome

    async def _counted_later(self, arrived: float, later: _Later) -> Outcome:
        # One coroutine, nothing created inside it before it runs: a server closing cancels it
        # before its first step, and a coroutine made beforehand would be left never awaited.
        await asyncio.sleep(later.delay_s)
        return self._counted(arrived, later.answer())

    def _chat(self, request: Request) -> Outcome | _Later:
        """Validate one chat request, then answer it now or after its delay."""
        if denied := self._unauthorized(request):
            return denied
        try:
            chat = _parse(request.body)
        except _BadRequest as exc:
            return self._error(400, str(exc), param=exc.param, code=exc.code)
        if chat.model not in self._offered:
            message = f"The model `{chat.model}` does not exist or you do not have access to it."
            return self._error(404, message, param="model", code="model_not_found")
        has_markers, fault, sleep_ms = _markers(chat.last_user)
        headers: dict[str, str] = {}
        if self.config.rpm or self.config.tpm:
            tokens = _total_tokens(chat, has_markers) if self._limits.counts_tokens else 0
            verdict = self._limits.admit(self.config.clock(), tokens)
            headers = verdict.headers
            if verdict.refused is not None:
                limit = self.config.rpm if verdict.refused == "requests" else self.config.tpm
                message = f"Rate limit reached: {limit} {verdict.refused} per minute."
                return self._error(429, message, code="rate_limit_exceeded", headers=headers)

        delay_s = next(self._latencies) + sleep_ms / 1000
        answer = functools.partial(self._answer, request.body, chat, has_markers, fault, headers)
        return _Later(delay_s, answer) if delay_s > 0 else answer()

    def reply(self, body: bytes) -> Outcome:
        """The answer to `body` now, as `chat` gives it, with no key check, latency, rate limit or
        stream: a batch line's (simulator/batches.py)."""
        if self.config.keep_bodies:
            self.stats.bodies.append(body)
        try:
            chat = dataclasses.replace(_parse(body), stream=False)
        except _BadRequest as exc:
            return self._error(400, str(exc), param=exc.param)
        if chat.model not in self._offered:
            message = f"The model `{chat.model}` does not exist or you do not have access to it."
            return self._error(404, message, param="model", code="model_not_found")
        has_markers, fault, _ = _markers(chat.last_user)
        return self._answer(body, chat, has_markers, fault, {})

    def _answer(
        self,
        body: bytes,
        chat: _Chat,
        has_markers: bool,
        marked_fault: tuple[str | None, str | None],
        headers: dict[str, str],
    ) -> Outcome:
        """The answer once its delay is over: a fault (counted per exact body), or the reply."""
        fault, times = marked_fault
        digest = hashlib.blake2b(body, digest_size=8).hexdigest()
        if fault is not None and times is not None:
            seen = self._attempts[digest] = self._attempts.get(digest, 0) + 1
            if seen > int(times):
                fault = None
        if fault is None and self._rng.random() < self.config.error_rate:
            fault = str(self._rng.choice((500, 502, 503)))
        if fault == "reset":
            return None
        if fault is not None and fault not in ("badjson", "badoutput", "truncate"):
            return self._error(int(fault), f"Simulated HTTP {fault} error.", headers=headers)

        content, call, finish, completion_tokens = _compose(chat, fault, digest)
        prompt_tokens, marked = _prompt_tokens(chat, has_markers)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if fault is None:
            self.stats.tokens += prompt_tokens + completion_tokens
        if "cached" in marked:
            usage["prompt_tokens_details"] = {"cached_tokens": min(marked["cached"], prompt_tokens)}
        head = {
            "id": f"chatcmpl-{digest}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if fault in (None, "badoutput"):
            self.stats.ok_by_user_message[chat.last_user] += 1
        if chat.stream:
            return _stream(chat, head, (content, call), finish, usage, fault, headers)
        # refusal and logprobs are required (null) in OpenAI's reference; strict clients check.
        reply: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if call is not None:
            reply["tool_calls"] = [call]
        choice = {"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}
        answer = orjson.dumps({**head, "choices": [choice], "usage": usage})
        if fault == "badjson":
            answer = answer[: len(answer) // 2]
        return Response(200, answer, headers)


def _compose(
    chat: _Chat, fault: str | None, digest: str
) -> tuple[str | None, dict[str, Any] | None, str, int]:
    """The answer's content or tool call, its finish reason and its completion tokens."""
    content: str | None
    content, finish, completion_tokens = _reply(chat.last_user, chat.max_tokens, tuple(chat.stop))
    call: dict[str, Any] | None = None
    if chat.tool is not None or chat.schema is not None:
        plain = " ".join(_MARKER_RE.sub(" ", chat.last_user).split())
        if chat.tool is not None:
            made = made_up(chat.tool.get("parameters") or {"type": "object"}, plain)
            arguments = orjson.dumps({"unexpected": True} if fault == "badoutput" else made).decode()
            function = {"name": chat.tool["name"], "arguments": arguments}
            call = {"id": f"call_{digest}", "type": "function", "function": function}
            content, finish = None, "tool_calls"
        else:
            content = orjson.dumps(made_up(chat.schema, plain)).decode()
            if fault == "badoutput":
                content = "I would rather answer in prose."
        completion_tokens = count_tokens(call["function"]["arguments"] if call else content or "")
    return content, call, finish, completion_tokens


def _prompt_tokens(chat: _Chat, has_markers: bool) -> tuple[int, dict[str, int]]:
    """The prompt's tokens (texts, images, or as a marker says) and the usage markers given."""
    marked = {name: int(n) for name, n in _USAGE_MARKER_RE.findall(chat.last_user)} if has_markers else {}
    counted = sum(count_tokens(t) + 4 for t in chat.texts) + chat.image_tokens
    return marked.get("prompt_tokens", counted), marked


def _total_tokens(chat: _Chat, has_markers: bool) -> int:
    """The total tokens the answer to `chat` will report (with no fault): what tpm counts."""
    return _prompt_tokens(chat, has_markers)[0] + _compose(chat, None, "")[3]


async def _answer_after(delay_s: float, answer: Outcome) -> Outcome:
    await asyncio.sleep(delay_s)
    return answer


def _markers(last_user: str) -> tuple[bool, tuple[str | None, str | None], int]:
    """Whether the message has markers, the first fault it asks for (and how many times), and
    the milliseconds its sleeps add up to."""
    fault, times, sleep_ms = None, None, 0
    has_markers = "[[" in last_user  # most rows have none: skip the regexes
    for m in _MARKER_RE.finditer(last_user) if has_markers else ():
        if m[3] is not None:
            sleep_ms += int(m[3])
        elif fault is None:
            fault, times = m[1], m[2]
    return has_markers, (fault, times), sleep_ms


def _stream(
    chat: _Chat,
    head: dict[str, Any],
    answer: tuple[str | None, dict[str, Any] | None],
    finish: str,
    usage: dict[str, Any],
    fault: str | None,
    headers: dict[str, str],
) -> Response:
    """The answer as server-sent events, cut into pieces of a few tokens each; a tool call
    streams its id and name first, then its arguments in pieces."""
    head = {**head, "object": "chat.completion.chunk"}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

    def delta(d: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return event([{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}])

    content, call = answer
    if call is None:
        events = [delta({"role": "assistant", "content": ""})]
        events += [delta({"content": piece}) for piece in _pieces(content or "")]
    else:
        opening = {"index": 0, "id": call["id"], "type": "function"}
        opening["function"] = {"name": call["function"]["name"], "arguments": ""}
        events = [delta({"role": "assistant", "content": None, "tool_calls": [opening]})]
        events += [
            delta({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in _pieces(call["function"]["arguments"])
        ]
    events.append(delta({}, finish))
    if chat.include_usage:
        events.append(event([], usage=usage))
    events.append(b"data: [DONE]\n\n")
    if fault == "badjson":
        events = [events[1][: len(events[1]) // 2] + b"\n\n"]
    elif fault == "truncate":
        events = events[: len(events) // 2]
    headers = {"Cache-Control": "no-cache", **headers}
    return Response(200, headers=headers, content_type="text/event-stream", chunks=events)


def _pieces(text: str) -> list[str]:
    """`text` cut every few tokens, as a model streams it."""
    ends = [m.end() for m in TOKEN_RE.finditer(text)]
    cuts = [0, *ends[_STREAM_PIECE_TOKENS - 1 : -1 : _STREAM_PIECE_TOKENS], len(text)]
    return [text[a:b] for a, b in itertools.pairwise(cuts) if b > a]


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


async def _start(
    config: SimulatorConfig, stats: SimulatorStats, host: str, port: int
) -> tuple[HttpServer, int]:
    """Start listening; returns the server and the bound port (``port`` 0 picks a free one)."""
    server = HttpServer(_Simulator(config, stats).handle)
    return server, await server.start(host, port)


async def serve_forever(
    config: SimulatorConfig, host: str, port: int, ready: Callable[[str], None] | None = None
) -> None:
    """Serve until cancelled (the ``batchrun simulate`` command); ``ready`` gets the base URL."""
    server, bound = await _start(config, SimulatorStats(), host, port)
    try:
        if ready is not None:
            ready(_base_url(host, bound))
        await asyncio.Event().wait()
    finally:
        await server.close()


@contextlib.contextmanager
def serve_in_thread(
    config: SimulatorConfig = SimulatorConfig(),  # frozen, so a shared default is safe
    host: str = "127.0.0.1",
    port: int = 0,
) -> Iterator[RunningSimulator]:
    """Run a simulator on its own event loop in a daemon thread, for synchronous callers."""
    stats = SimulatorStats()
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        try:
            server, state["port"] = await _start(config, stats, host, port)
        except Exception as exc:
            state["error"] = exc
            started.set()
            return
        stop, loop = asyncio.Event(), asyncio.get_running_loop()
        state["stop"] = lambda: loop.call_soon_threadsafe(stop.set)
        started.set()
        try:
            await stop.wait()
        finally:
            await server.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="simulator", daemon=True)
    thread.start()
    started.wait()
    if "error" in state:
        thread.join()
        raise state["error"]
    try:
        yield RunningSimulator(_base_url(host, state["port"]), stats, host, state["port"])
    finally:
        state["stop"]()
        thread.join()
