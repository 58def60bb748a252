"""The simulator's HTTP/1.1 server: an asyncio protocol over httptools' C parser.

The simulator must outrun any client it benchmarks; aiohttp's app layer (request and response
objects, router, header preparation) capped it near the client's rate. This serves only what the
simulator needs: keep-alive, pipelined requests answered in order, Content-Length or chunked
request bodies, answers with a Content-Length or chunked (server-sent events), and dropping a
connection on purpose. A handler answers at once, or returns a coroutine when it must wait.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import http
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import httptools

_REASONS = {status.value: status.phrase for status in http.HTTPStatus}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # names in lower case
    body: bytes
    query: str = ""  # after the `?`, as sent


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    chunks: list[bytes] | None = None  # sent with chunked encoding instead of body (a stream)

    def encode(self, keep_alive: bool) -> bytes:
        """The whole answer on the wire: written at once, it costs one send."""
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, '')}",
            f"Content-Type: {self.content_type}",
        ]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        lines.append(
            "Transfer-Encoding: chunked" if self.chunks is not None else f"Content-Length: {len(self.body)}"
        )
        if not keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.chunks is None:
            return head + self.body
        return head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in self.chunks) + b"0\r\n\r\n"


# None drops the connection without an answer (the simulated reset).
Outcome: TypeAlias = Response | None
Handler: TypeAlias = Callable[[Request], Outcome | Coroutine[Any, Any, Outcome]]


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and writes their answers in order of arrival."""

    def __init__(
        self,
        handler: Handler,
        connections: set[_Connection],
        waiting: set[asyncio.Task[Outcome]],
        serving: Callable[[], bool],
    ) -> None:
        self._handler = handler
        self._serving = serving
        self._connections = connections
        self._all_waiting = waiting
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        # Requests in order of arrival, or an answer the connection gives itself; and keep-alive.
        self._queue: collections.deque[tuple[Request | Response, bool]] = collections.deque()
        self._waiting: asyncio.Task[Outcome] | None = None  # a handler still working on its answer
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if not self._serving():
            # Accepted as the server closed (a client retrying through an outage): a handler
            # started now would outlive the loop, a coroutine never awaited.
            self._transport.abort()
            return
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # A waiting handler goes on (its answer still counts in the stats, as at a real provider).
        self._connections.discard(self)

    def close(self) -> None:
        """Drop the connection: the server is shutting down."""
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._queue.clear()
            self._write(_bad_request(f"Bad HTTP request: {exc}"), False)
        except httptools.HttpParserUpgrade:
            pass  # answered in on_message_complete; the connection closes after it

    # httptools' callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it on big bodies

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("latin-1")
        path, _, query = (part.decode("latin-1") for part in self._url.partition(b"?"))
        if self._parser.should_upgrade():  # e.g. curl --http2; llhttp stops reading at its headers
            refusal = f"Upgrade: {self._headers.get('upgrade', '')} is not supported; send plain HTTP/1.1"
            self._queue.append((_bad_request(refusal), False))
        else:
            request = Request(method, path, self._headers, b"".join(self._body), query)
            self._queue.append((request, self._parser.should_keep_alive()))
        if self._waiting is None:
            self._answer_queued()

    def _answer_queued(self) -> None:
        while self._queue and self._waiting is None:
            request, keep_alive = self._queue.popleft()
            outcome = request if isinstance(request, Response) else self._handler(request)
            if isinstance(outcome, Coroutine):
                self._waiting = asyncio.ensure_future(outcome)
                self._all_waiting.add(self._waiting)
                self._waiting.add_done_callback(self._all_waiting.discard)
                self._waiting.add_done_callback(functools.partial(self._answered, keep_alive=keep_alive))
            else:
                self._write(outcome, keep_alive)

    def _answered(self, task: asyncio.Task[Outcome], keep_alive: bool) -> None:
        self._waiting = None
        if task.cancelled():  # the server is shutting down
            return
        self._write(task.result(), keep_alive)
        self._answer_queued()

    def _write(self, outcome: Outcome, keep_alive: bool) -> None:
        assert self._transport is not None
        if self._transport.is_closing():  # the client hung up while the handler waited
            return
        if outcome is None:
            self._transport.abort()
            return
        self._transport.write(outcome.encode(keep_alive))
        if not keep_alive:
            self._transport.close()


def _bad_request(message: str) -> Response:
    return Response(400, message.encode(), content_type="text/plain")


class HttpServer:
    """Serves `handler` on host:port until closed; closing drops open connections at once."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._connections: set[_Connection] = set()
        self._waiting: set[asyncio.Task[Outcome]] = set()  # handlers still working on an answer
        self._server: asyncio.Server | None = None
        self._closing = False

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port`` 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self._handler, self._connections, self._waiting, self._is_serving),
            host,
            port,
        )
        return int(self._server.sockets[0].getsockname()[1])

    def _is_serving(self) -> bool:
        return not self._closing

    async def close(self) -> None:
        assert self._server is not None
        self._closing = True
        self._server.close()
        for task in list(self._waiting):  # in-flight answers (e.g. a long [[sleep]]) must not delay stopping
            task.cancel()
        for connection in list(self._connections):
            connection.close()
        await self._server.wait_closed()
