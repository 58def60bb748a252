"""All HTTP to the chat endpoint: one keep-alive client, response parsing, failure classification.

The core talks httpx's API, so a Python user can hand in their own client (custom auth, proxies,
mTLS, `MockTransport`), and the default one puts aiohttp's connection pool under that API.

Which httpx: `httpx2` (Pydantic's maintained continuation, same API; the openai SDK and
genai-prices already depend on it) rather than `httpx` (0.28.1, no release since Dec 2024).
Measured here, 64 connections, one core, CPU per request: aiohttp alone 0.10-0.12 ms; httpx2
over aiohttp's pool 0.27-0.30; httpx over it 0.31-0.34; httpx2's own pool 1.0 (so never the
default).

The transport is `AiohttpPool`, not httpx-aiohttp's `AiohttpTransport`, which per request
builds a timeout, consults the environment for proxies and netrc in a worker thread (aiohttp's
`trust_env`), filters cookies and wraps the body in a stream: together ~0.2 ms CPU per row
(docs/benchmarks.md). Its exception mapping and event-stream wrapper, all we used of that
package, are here too (`AIOHTTP_ERRORS`, `AiohttpStream`): importing them ran the package's
`__init__`, which imports httpx 0.28 beside httpx2, ~20 ms of every run's start.

`AiohttpPool` reads the proxy variables (HTTP_PROXY, HTTPS_PROXY, NO_PROXY) once, for the one
endpoint it serves; httpx2 builds the TLS context (SSL_CERT_FILE, SSL_CERT_DIR, else the
system's store).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import aiohttp
import httpx2
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from multidict import CIMultiDict
from yarl import URL

from batchrun.answers import (
    Bounds,
    ChatResult,
    Redactor,
    StreamAssembler,
    classify_status,
    invalid,
    read_completion,
    read_models,
    server_budget,
)
from batchrun.cost import output_tokens_cap
from batchrun.errors import EndpointDown, PermanentError
from batchrun.limits import RateLimitHeaders

CONNECT_TIMEOUT_S = 10.0  # a server that does not accept a connection this soon is down, not slow
TransportFailure = TimeoutError | httpx2.HTTPError | aiohttp.ClientError
# The same, for `except` (a union cannot be caught): caught by try/except, not by a context
# manager, whose entry cost ~2 µs a request.
TRANSPORT_FAILURES = (TimeoutError, httpx2.HTTPError, aiohttp.ClientError)


class ChatClient:
    """A shared connection pool to one OpenAI-compatible endpoint; use it as `async with`.

    `http_client`, when given, is used instead of the pool built here and left open on exit
    (its owner closes it); its own timeouts apply as well as `timeout_s`. Every answer is read
    through answers.py, at most `max_response_mb` of it.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float,
        max_connections: int,
        *,
        max_response_mb: float,
        http_client: httpx2.AsyncClient | None = None,
    ):
        self._base_url = base_url
        self._url = httpx2.URL(base_url.rstrip("/") + "/chat/completions")
        self._models_url = httpx2.URL(base_url.rstrip("/") + "/models")
        self._timeout_s = timeout_s  # over the whole answer, as httpx's per-phase timeouts are not
        self._connect_timeout_s = min(CONNECT_TIMEOUT_S, timeout_s)
        self._redact = Redactor(api_key)
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._own_headers = httpx2.Headers(self._headers)  # copied per request, not encoded again
        self._max_connections = max_connections
        self._max_bytes = int(max_response_mb * 1024 * 1024)
        self._given = http_client
        self._pool: AiohttpPool | None = None

    async def __aenter__(self) -> ChatClient:
        if self._given is None:
            self._pool = AiohttpPool(
                self._base_url, self._max_connections, self._connect_timeout_s, self._max_bytes
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    def __repr__(self) -> str:
        return f"ChatClient({str(self._url)!r})"

    def _request(self, method: str, url: httpx2.URL, content: bytes | None = None) -> httpx2.Request:
        """A given client merges its defaults (headers, params) in `build_request`; our own has
        none worth merging, and that merge cost 0.25 ms CPU per row, as much as aiohttp's whole request.
        For our own pool the body goes as a stream: `content=` would add Host and Content-Length
        headers (aiohttp adds both itself) at ~25 µs per row, most of httpx's request cost."""
        if self._given is not None:
            return self._given.build_request(method, url, content=content, headers=self._headers)
        return httpx2.Request(
            method, url, headers=self._own_headers, stream=httpx2.ByteStream(content or b"")
        )

    async def _send(self, request: httpx2.Request) -> httpx2.Response:
        """Through the given client, or straight to our own pool: a client without auth, hooks,
        cookies or redirects to follow would add nothing but its CPU (~0.05 ms per row) to that.
        An event stream comes back unread, any other answer read whole (at most max_response_mb)."""
        if self._given is None:
            assert self._pool is not None, "use the client as `async with`"
            return await self._pool.handle_async_request(request)
        response = await self._given.send(request, stream=True)
        response.stream = CappedStream(response.stream, self._max_bytes, response.status_code)
        if is_event_stream(response):
            return response
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def models(self) -> list[str] | None:
        """The ids `GET /models` lists for this key, None if the endpoint has no such list;
        raises like `complete` on failure."""
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._send(self._request("GET", self._models_url))
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise classify_status(response.status_code, response.headers, response.content, self._redact)
            return read_models(response.content, self._redact)
        except TRANSPORT_FAILURES as exc:
            raise self._down(exc) from None

    async def complete(self, body: dict[str, Any]) -> ChatResult:
        """Send one request; raise RetryableError, PermanentError or JobAborted on failure."""
        content = orjson.dumps(body)
        bounds = Bounds(self._redact, output_tokens_cap(body))  # an answer claims no more output
        try:
            async with asyncio.timeout(self._timeout_s):
                sent = time.perf_counter()
                response = await self._send(self._request("POST", self._url, content))
                if is_event_stream(response):
                    return await self._read_stream(response, bounds, sent)
            if response.status_code != 200:
                raise classify_status(response.status_code, response.headers, response.content, self._redact)
            return read_completion(response.content, bounds, rate_budget(response.headers))
        except TRANSPORT_FAILURES as exc:
            raise self._down(exc) from None

    async def _read_stream(self, response: httpx2.Response, bounds: Bounds, sent: float) -> ChatResult:
        """An event stream, assembled chunk by chunk; its bytes are capped as they arrive."""
        ttft_ms = None
        stream = StreamAssembler(bounds)
        try:
            if response.status_code != 200:
                await response.aread()
                raise classify_status(response.status_code, response.headers, response.content, self._redact)
            try:
                async for event in httpx2.EventSource(response):
                    if stream.feed(event.data):
                        ttft_ms = round((time.perf_counter() - sent) * 1000, 1)
            except httpx2.SSEError as exc:  # an event past 1 MiB
                raise invalid(str(exc)) from None
        finally:
            await response.aclose()
        return stream.finish(ttft_ms, rate_budget(response.headers))

    def _down(self, exc: TransportFailure) -> EndpointDown:
        """A transport failure as EndpointDown, in words with the key masked (a proxy's reason)."""
        down = transport_error(exc, self._timeout_s, self._connect_timeout_s)
        return EndpointDown(down.kind, self._redact(down.message), down.status)


class CappedStream(httpx2.AsyncByteStream):
    """A response body that fails its row once it passes `max_bytes`, so no answer, however
    long or endless, holds more than that in memory."""

    def __init__(self, stream: Any, max_bytes: int, status: int):
        self._stream = stream
        self._max_bytes = max_bytes
        self._status = status

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._stream:
            seen += len(chunk)
            if seen > self._max_bytes:
                raise too_large(self._max_bytes, self._status)
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


def rate_budget(headers: httpx2.Headers) -> RateLimitHeaders | None:
    """answers.server_budget, asked only when a header's name says `ratelimit`: on an answer
    without them its four lookups that miss cost ~4 µs, this scan ~1."""
    if not any(b"ratelimit" in name.lower() for name, _ in headers.raw):
        return None
    return server_budget(headers)


def is_event_stream(response: httpx2.Response) -> bool:
    """As httpx2's EventSource decides it (and aiohttp's `content_type`): the media type alone."""
    media_type = response.headers.get("content-type", "").partition(";")[0]
    return media_type.strip().lower() == "text/event-stream"


def too_large(max_bytes: int, status: int) -> PermanentError:
    return PermanentError(
        "response_too_large",
        f"the answer is longer than endpoint.max_response_mb ({max_bytes / 2**20:g} MB); not read further",
        status,
    )


@functools.cache
def tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """httpx2's verifying context (certifi's CAs, or those SSL_CERT_FILE or SSL_CERT_DIR name),
    made once per process for each setting of the two: loading the CAs takes ~0.05 s and ~20 MB,
    which every run in a notebook and every `GET /models` would otherwise pay again."""
    return httpx2.create_ssl_context(trust_env=True)


class AiohttpPool(httpx2.AsyncBaseTransport):
    """aiohttp's connection pool under httpx2's API (an httpx2 transport), for batchrun's own
    requests to one endpoint; proxies and CA certificates are taken from the environment.

    What is fixed for the pool is decided once, not per request: the proxy for `base_url` from
    the environment, the connect timeout, no cookies. An answer is read whole inside the
    transport (one `Response` holding its body), except an event stream, which stays a stream.
    Failures are httpx2's exceptions caused by aiohttp's (`AIOHTTP_ERRORS`).
    """

    def __init__(self, base_url: str, max_connections: int, connect_timeout_s: float, max_bytes: int):
        self._base_url = URL(base_url)
        self._max_bytes = max_bytes
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        # Plain http (a local vLLM, the simulator) loads no CAs; aiohttp's default context (made
        # at its import) would still verify an https URL, should one come up through a proxy.
        https = self._base_url.scheme == "https"
        self._tls = (
            tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")) if https else True
        )
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
        try:
            return await self._exchange(request)
        except Exception:
            with httpx_errors():  # entered on failure only: ~2 µs a row otherwise
                raise

    async def _exchange(self, request: httpx2.Request) -> httpx2.Response:
        session = self._session or self._open()
        response = await session.request(
            request.method,
            self._url(request.url),
            headers=CIMultiDict(request.headers.multi_items()),  # as aiohttp keeps them: ~2 µs less
            data=await request.aread() or None,
            allow_redirects=False,
        )
        if response.content_type == "text/event-stream":
            stream = CappedStream(AiohttpStream(response), self._max_bytes, response.status)
            return httpx2.Response(
                response.status, headers=response.raw_headers, stream=stream, request=request
            )
        try:
            body = await self._read(response)
        finally:
            response.release()
        return whole_response(response.status, response.raw_headers, body, request)

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body, at most max_bytes: at once when its length is known and fits."""
        length = response.content_length
        if length is not None and length <= self._max_bytes:
            return await response.read()
        if length is not None:
            raise too_large(self._max_bytes, response.status)
        body = bytearray()
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > self._max_bytes:
                raise too_large(self._max_bytes, response.status)
        return bytes(body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


# aiohttp's failures as httpx2's, the most specific that applies (as httpx-aiohttp maps them)
AIOHTTP_ERRORS: dict[type[Exception], type[httpx2.HTTPError]] = {
    aiohttp.ServerTimeoutError: httpx2.TimeoutException,
    aiohttp.SocketTimeoutError: httpx2.ReadTimeout,
    aiohttp.ClientConnectionError: httpx2.ConnectTimeout,
    aiohttp.ClientConnectorError: httpx2.ConnectError,
    aiohttp.ClientPayloadError: httpx2.ReadError,
    aiohttp.ClientProxyConnectionError: httpx2.ProxyError,
    aiohttp.ClientHttpProxyError: httpx2.ProxyError,
    aiohttp.NonHttpUrlClientError: httpx2.UnsupportedProtocol,
    aiohttp.InvalidUrlClientError: httpx2.UnsupportedProtocol,
}


@contextlib.contextmanager
def httpx_errors() -> Iterator[None]:
    """Raise an aiohttp failure as httpx2's exception for it, caused by it; others unchanged."""
    try:
        yield
    except Exception as exc:
        mapped: type[httpx2.HTTPError] | None = None
        for aiohttp_error, httpx_error in AIOHTTP_ERRORS.items():
            if isinstance(exc, aiohttp_error) and (mapped is None or issubclass(httpx_error, mapped)):
                mapped = httpx_error
        if mapped is None:
            raise
        raise mapped(str(exc)) from exc


class AiohttpStream(httpx2.AsyncByteStream):
    """An aiohttp response's body as httpx2's stream, read as it arrives (an event stream)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with httpx_errors():
            async for chunk in self._response.content.iter_chunked(16 * 1024):
                yield chunk

    async def aclose(self) -> None:
        with httpx_errors():
            self._response.release()


def whole_response(
    status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes, request: httpx2.Request
) -> httpx2.Response:
    """A response read whole, as `httpx2.Response(content=body)` makes it at a tenth of its CPU
    (~25 µs per row): a body not content-encoded is its own content, so httpx's decoding pass over
    it is skipped. An encoded one is decoded by httpx, as for any transport."""
    response = httpx2.Response(status, headers=headers, stream=httpx2.ByteStream(body), request=request)
    if "content-encoding" in response.headers:
        response.read()
    else:
        response._content = body  # what `read()` sets; nothing in the body to decode
    return response


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
