"""All HTTP to the chat endpoint: one keep-alive client, response parsing, failure classification.

The core talks httpx's API, so a Python user can hand in their own client (custom auth, proxies,
mTLS, `MockTransport`), and the default one puts aiohttp's connection pool under that API.

Which httpx: `httpx2` (Pydantic's maintained continuation, same API; the openai SDK and
genai-prices already depend on it) rather than `httpx` (0.28.1, no release since Dec 2024).
Measured here, 64 connections, one core, CPU per request: aiohttp alone 0.10-0.12 ms; httpx2
over aiohttp's pool 0.27-0.30; httpx over it 0.31-0.34; httpx2's own pool 1.0 (so never the
default). `httpx-aiohttp` (by a former httpx maintainer; the openai SDK vendors the same module
for its `aiohttp` extra) supplies the exception mapping and the event-stream wrapper.

Under our own pool the transport is `AiohttpPool`, not httpx-aiohttp's `AiohttpTransport`, which
per request builds a timeout, consults the environment for proxies and netrc in a worker thread
(aiohttp's `trust_env`), filters cookies and wraps the body in a stream: together ~0.2 ms CPU per
row (README, Speed). `AiohttpPool` reads the proxy variables (HTTP_PROXY, HTTPS_PROXY, NO_PROXY)
once, for the one endpoint it serves; httpx2 builds the TLS context (SSL_CERT_FILE, SSL_CERT_DIR,
else the system's store).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import errno
import re
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, TypedDict

import aiohttp
import httpx2
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from httpx_aiohttp.httpx2.transport import AiohttpResponseStream, map_aiohttp_exceptions
from yarl import URL

from batchrun.errors import (
    BatchrunError,
    EndpointDown,
    JobAborted,
    PermanentError,
    RetryableError,
    redact,
)
from batchrun.limits import RateLimitHeaders
from batchrun.streaming import StreamAssembler

CONNECT_TIMEOUT_S = 10.0  # a server that does not accept a connection this soon is down, not slow
RETRYABLE_STATUS = frozenset({408, 409, 429})
OUTAGE_STATUS = frozenset({502, 503, 504})  # a gateway whose upstream is away: the breaker's evidence
# Error codes (OpenAI's and common gateways') that mean the account cannot pay for any request.
NO_CREDIT_CODES = frozenset(
    {"insufficient_quota", "insufficient_balance", "billing_hard_limit_reached", "quota_exceeded"}
)
TransportFailure = TimeoutError | httpx2.HTTPError | aiohttp.ClientError


@dataclasses.dataclass(frozen=True, slots=True)
class ChatResult:
    content: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    model: str | None
    response_id: str | None
    ttft_ms: float | None = None  # time to the first content piece, when streamed
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    reasoning_tokens: int | None = None  # usage.completion_tokens_details.reasoning_tokens
    budget: RateLimitHeaders | None = None  # the x-ratelimit-* headers, when the server sent them
    tool_calls: list[dict[str, str]] | None = None  # [{id, name, arguments}], arguments as sent


class ChatClient:
    """A shared connection pool to one OpenAI-compatible endpoint; use it as `async with`.

    `http_client`, when given, is used instead of the pool built here and left open on exit
    (its owner closes it); its own timeouts apply as well as `timeout_s`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float,
        max_connections: int,
        *,
        http_client: httpx2.AsyncClient | None = None,
    ):
        self._base_url = base_url
        self._url = httpx2.URL(base_url.rstrip("/") + "/chat/completions")
        self._models_url = httpx2.URL(base_url.rstrip("/") + "/models")
        self._timeout_s = timeout_s  # over the whole answer, as httpx's per-phase timeouts are not
        self._connect_timeout_s = min(CONNECT_TIMEOUT_S, timeout_s)
        self._api_key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._max_connections = max_connections
        self._given = http_client
        self._pool: AiohttpPool | None = None

    async def __aenter__(self) -> ChatClient:
        if self._given is None:
            self._pool = AiohttpPool(self._base_url, self._max_connections, self._connect_timeout_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    def __repr__(self) -> str:
        return f"ChatClient({str(self._url)!r})"

    def _request(self, method: str, url: httpx2.URL, body: dict[str, Any] | None = None) -> httpx2.Request:
        """A given client merges its defaults (headers, params) in `build_request`; our own has
        none worth merging, and that merge cost 0.25 ms CPU per row, as much as aiohttp's whole request."""
        content = orjson.dumps(body) if body is not None else None
        if self._given is not None:
            return self._given.build_request(method, url, content=content, headers=self._headers)
        return httpx2.Request(method, url, content=content, headers=self._headers)

    async def _send(self, request: httpx2.Request, stream: bool = False) -> httpx2.Response:
        """Through the given client, or straight to our own pool: a client without auth, hooks,
        cookies or redirects to follow would add nothing but its CPU (~0.05 ms per row) to that."""
        if self._given is not None:
            return await self._given.send(request, stream=stream)
        assert self._pool is not None, "use the client as `async with`"
        return await self._pool.handle_async_request(request)

    async def models(self) -> list[str] | None:
        """The ids `GET /models` lists for this key, None if the endpoint has no such list;
        raises like `complete` on failure."""
        with self._errors():
            async with asyncio.timeout(self._timeout_s):
                response = await self._send(self._request("GET", self._models_url))
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise classify_status(response.status_code, response.headers, response.content)
            try:
                return [str(m["id"]) for m in orjson.loads(response.content)["data"]]
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise RetryableError("invalid_response", f"unreadable model list ({exc})") from None

    async def complete(self, body: dict[str, Any]) -> ChatResult:
        """Send one request; raise RetryableError, PermanentError or JobAborted on failure."""
        with self._errors():
            async with asyncio.timeout(self._timeout_s):
                if body.get("stream"):
                    return await self._complete_streamed(body)
                response = await self._send(self._request("POST", self._url, body))
            if response.status_code != 200:
                raise classify_status(response.status_code, response.headers, response.content)
            result = parse_completion(response.content)
            if (budget := server_budget(response.headers)) is not None:
                result = dataclasses.replace(result, budget=budget)
            return result

    async def _complete_streamed(self, body: dict[str, Any]) -> ChatResult:
        sent = time.perf_counter()
        ttft_ms = None
        stream = StreamAssembler()
        response = await self._send(self._request("POST", self._url, body), stream=True)
        try:
            if response.status_code != 200:
                raise classify_status(response.status_code, response.headers, await response.aread())
            try:
                async for event in httpx2.EventSource(response):
                    if stream.feed(event.data):
                        ttft_ms = round((time.perf_counter() - sent) * 1000, 1)
            except httpx2.SSEError as exc:  # not an event stream at all, or an event past 1 MiB
                raise RetryableError("invalid_response", str(exc)) from None
        finally:
            await response.aclose()
        content = stream.finish()
        usage = stream.usage or {}
        return ChatResult(
            content=content,
            finish_reason=stream.finish_reason,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            total_tokens=usage.get("total_tokens"),
            model=stream.model,
            response_id=stream.response_id,
            ttft_ms=ttft_ms,
            budget=server_budget(response.headers),
            tool_calls=stream.tool_calls,
            **_usage_details(usage),
        )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Transport failures as EndpointDown; and since servers echo keys in error bodies
        ("Incorrect API key provided: sk-..."), every error text masked."""
        try:
            try:
                yield
            except (TimeoutError, httpx2.HTTPError, aiohttp.ClientError) as exc:
                raise transport_error(exc, self._timeout_s, self._connect_timeout_s) from None
        except BatchrunError as exc:
            exc.args = tuple(redact(str(a), self._api_key) for a in exc.args)
            raise


class AiohttpPool(httpx2.AsyncBaseTransport):
    """aiohttp's connection pool under httpx2's API (an httpx2 transport), for batchrun's own
    requests to one endpoint; proxies and CA certificates are taken from the environment.

    What is fixed for the pool is decided once, not per request: the proxy for `base_url` from
    the environment, the connect timeout, no cookies. An answer is read whole inside the
    transport (one `Response` holding its body), except an event stream, which stays a stream.
    Failures are httpx2's exceptions caused by aiohttp's, as from httpx-aiohttp's transport.
    """

    def __init__(self, base_url: str, max_connections: int, connect_timeout_s: float):
        self._base_url = URL(base_url)
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        self._tls = httpx2.create_ssl_context(trust_env=True)
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    def _open(self) -> aiohttp.ClientSession:
        """The session, made inside the running loop on first use."""
        proxy, proxy_auth = None, None
        with contextlib.suppress(LookupError):  # no proxy set, or NO_PROXY names the host
            proxy, proxy_auth = get_env_proxy_for_url(self._base_url)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, ssl=self._tls),
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            proxy=proxy,
            proxy_auth=proxy_auth,
            auto_decompress=False,  # httpx2's Response decodes, as for any transport
        )
        return self._session

    def _url(self, url: httpx2.URL) -> URL:
        text = str(url)
        if (parsed := self._urls.get(text)) is None:
            parsed = self._urls[text] = URL(text, encoded=True)
        return parsed

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        session = self._session or self._open()
        with map_aiohttp_exceptions():
            response = await session.request(
                request.method,
                self._url(request.url),
                headers=request.headers,
                data=request.content or None,
                allow_redirects=False,
            )
            if response.content_type == "text/event-stream":
                stream = AiohttpResponseStream(response)
                return httpx2.Response(
                    response.status, headers=response.raw_headers, stream=stream, request=request
                )
            try:
                body = await response.read()
            finally:
                response.release()
        return httpx2.Response(response.status, headers=response.raw_headers, content=body, request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def transport_error(exc: TransportFailure, timeout_s: float, connect_timeout_s: float) -> EndpointDown:
    """The one place a transport failure becomes words: what happened, never the library's classes
    or its internal codes (a cut chunked body is aiohttp's `TransferEncodingError: 400`).

    Through the aiohttp transport, httpx2's exception wraps aiohttp's, whose class is read instead
    (the transport maps coarsely: a server that hung up becomes `ConnectTimeout`). A client the
    user passed raises httpx2's own, whose OS or TLS reason lies at the end of the chain.
    Each message follows its kind (`connection: refused`), since the error reads `kind: message`.
    """
    if isinstance(exc, httpx2.HTTPError) and isinstance(exc.__cause__, aiohttp.ClientError):
        exc = exc.__cause__
    root = _root(exc)
    if isinstance(exc, aiohttp.ConnectionTimeoutError | httpx2.ConnectTimeout):  # before TimeoutError
        return EndpointDown("timeout", f"no connection within {connect_timeout_s:g} s")
    if isinstance(exc, TimeoutError):  # the deadline over the whole answer
        return EndpointDown("timeout", f"no answer within {timeout_s:g} s")
    if isinstance(exc, httpx2.TimeoutException):  # a given client's own read, write or pool timeout
        return EndpointDown("timeout", f"no answer within the HTTP client's timeout ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return EndpointDown("connection", f"refused by the proxy (HTTP {exc.status}: {exc.message})")
    if isinstance(exc, aiohttp.ClientProxyConnectionError | httpx2.ProxyError):
        return EndpointDown("connection", f"to the proxy failed ({_reason(exc)})")
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(root, socket.gaierror):
        return EndpointDown("dns", f"the host name does not resolve ({_reason(exc)})")
    if isinstance(exc, aiohttp.ClientSSLError) or isinstance(root, ssl.SSLError):
        return EndpointDown("tls", f"the handshake failed ({_reason(exc)})")
    if isinstance(root, ConnectionRefusedError):
        return EndpointDown("connection", "refused")
    if isinstance(exc, aiohttp.ClientConnectorError | httpx2.ConnectError):
        return EndpointDown("connection", f"failed ({_reason(exc)})")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return EndpointDown("connection", "closed before the answer ended")
    if isinstance(exc, aiohttp.ServerDisconnectedError | httpx2.RemoteProtocolError):
        return EndpointDown("connection", "closed by the server before it answered")
    if isinstance(root, ConnectionResetError) or getattr(root, "errno", None) == errno.ECONNRESET:
        return EndpointDown("connection", "reset by the server")
    return EndpointDown("connection", _reason(exc))


def _root(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (httpx2 -> httpcore2 -> OSError -> ConnectionRefusedError)."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return exc


_SSL_NOISE_RE = re.compile(r"^\[SSL: \w+\] |\s*\(_ssl\.c:\d+\)$")


def _reason(exc: BaseException) -> str:
    """The innermost OS or TLS reason (`Name or service not known`, `wrong version number`)."""
    cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or _root(exc)
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        return f"certificate verify failed: {cause.verify_message}"
    text = getattr(cause, "strerror", None) or str(cause)
    return _SSL_NOISE_RE.sub("", text) or "no reason given"


def parse_completion(raw: bytes) -> ChatResult:
    """Read a chat.completion body; a body we cannot read is worth another attempt."""
    try:
        data = orjson.loads(raw)
        choice = data["choices"][0]
        message = choice["message"]
        usage = data.get("usage") or {}
        return ChatResult(
            content=message.get("content"),
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            total_tokens=usage.get("total_tokens"),
            model=data.get("model"),
            response_id=data.get("id"),
            tool_calls=_tool_calls(message.get("tool_calls")),
            **_usage_details(usage),
        )
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        snippet = raw[:80].decode("utf-8", "replace")
        raise RetryableError("invalid_response", f"unreadable completion body: {snippet!r}") from None


def _tool_calls(calls: list[dict[str, Any]] | None) -> list[dict[str, str]] | None:
    if not calls:
        return None
    return [
        {
            "id": call.get("id") or "",
            "name": call["function"]["name"],
            "arguments": call["function"].get("arguments") or "",
        }
        for call in calls
    ]


class _UsageDetails(TypedDict):
    cached_tokens: int | None
    reasoning_tokens: int | None


def _usage_details(usage: dict[str, Any]) -> _UsageDetails:
    """Cached prompt tokens and reasoning tokens, which are priced differently, when reported."""
    prompt = usage.get("prompt_tokens_details") or {}
    completion = usage.get("completion_tokens_details") or {}
    return {
        "cached_tokens": prompt.get("cached_tokens"),
        "reasoning_tokens": completion.get("reasoning_tokens"),
    }


def classify_status(status: int, headers: Mapping[str, str], raw: bytes) -> Exception:
    """Map a non-200 answer to the error type that decides what happens next.

    A row's error kind is the server's error code when it gives one (`context_length_exceeded`),
    else `http_NNN`; a 429 is always `rate_limited`.
    """
    error = _error_fields(raw)
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


class _ErrorFields(NamedTuple):
    code: str | None  # a word such as `context_length_exceeded`; not a number (LiteLLM sends "400")
    type: str | None
    message: str | None


_CODE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def _error_fields(raw: bytes) -> _ErrorFields:
    """What an error body says, in OpenAI's shape (`error.code`, `.type`, `.message`), FastAPI's
    (`detail`, a string or a list of `{loc, msg}`) or a bare `message` (vLLM)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _ErrorFields(None, None, None)
    if not isinstance(body, dict):
        return _ErrorFields(None, None, None)
    error = body.get("error")
    if not isinstance(error, dict):
        error = {"message": error or body.get("detail") or body.get("message"), "code": body.get("code")}
    message = error.get("message")
    if isinstance(message, list):  # FastAPI's validation errors
        message = "; ".join(_validation_error(item) for item in message)
    code, kind = (str(error.get(key) or "") for key in ("code", "type"))
    return _ErrorFields(
        code if _CODE_RE.fullmatch(code) and code.lower() not in ("none", "null") else None,
        kind or None,
        str(message)[:200] if message else None,
    )


def _validation_error(item: object) -> str:
    """One of FastAPI's `detail` entries, `{"loc": ["body", "model"], "msg": "Field required"}`."""
    if not isinstance(item, dict):
        return str(item)
    where = ".".join(str(part) for part in item.get("loc") or ())
    return f"{where}: {item.get('msg')}" if where else str(item.get("msg"))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header as sent, or as a LiteLLM gateway forwards it (`llm_provider-retry-after`)."""
    return headers.get(name) or headers.get(f"llm_provider-{name}")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, else `Retry-After` (secs or date)."""
    if ms := _header(headers, "retry-after-ms"):
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = _header(headers, "retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?)(ms|h|m|s)?")
_UNIT_S = {"ms": 0.001, "h": 3600.0, "m": 60.0, "s": 1.0, None: 1.0}


def server_budget(headers: Mapping[str, str]) -> RateLimitHeaders | None:
    """The `x-ratelimit-remaining-*` / `-reset-*` headers (OpenAI's and xAI's names), if any."""
    requests = _count(_header(headers, "x-ratelimit-remaining-requests"))
    tokens = _count(_header(headers, "x-ratelimit-remaining-tokens"))
    if requests is None and tokens is None:
        return None
    return RateLimitHeaders(
        remaining_requests=requests,
        reset_requests_s=_duration(_header(headers, "x-ratelimit-reset-requests")),
        remaining_tokens=tokens,
        reset_tokens_s=_duration(_header(headers, "x-ratelimit-reset-tokens")),
    )


def _count(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _duration(value: str | None) -> float | None:
    """Seconds in a reset header: `0.25`, `20ms`, `1s`, `6m0s`, `1h2m3.5s`; None if unreadable."""
    if not value:
        return None
    parts = _DURATION_RE.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    return sum(float(number) * _UNIT_S[unit or None] for number, unit in parts)
