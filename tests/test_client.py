"""The HTTP client against what real servers send: a LiteLLM gateway's prefixed headers, llama.cpp's
early `[DONE]`, error bodies in other shapes, and every way a connection can fail, on real sockets.

Unit tests read headers and bodies; the rest run the real CLI (or the real client) against stub
servers on 127.0.0.1 that replay the answers quoted in issue #11.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import polars as pl
import pytest
import trustme

from batchrun.answers import Redactor, classify_status, retry_after, server_budget
from batchrun.client import AiohttpPool, ChatClient
from batchrun.errors import EndpointDown, PermanentError, RequestFailed, RetryableError
from batchrun.limits import RateLimitHeaders
from batchrun.simulator import SimulatorConfig, serve_in_thread
from tests.conftest import TEST_KEY, article_rows, invoke, read_output, write_job
from tests.stub_server import Reply, Request, completion, serve_stub

MODELS = Reply(200, {"object": "list", "data": [{"id": "grok-4.3", "object": "model"}]})
RETRY = {"max_attempts": 4, "initial_backoff_s": 0.01, "max_backoff_s": 5}


def gateway(chat: Callable[[Request], Reply]) -> Callable[[Request], Reply]:
    """A handler that lists the job's model and answers chat requests with `chat`."""
    return lambda request: MODELS if request.path.endswith("/models") else chat(request)


def user_prompt(request: Request) -> str:
    return str(request.json()["messages"][-1]["content"])


# --- #11 item 4: rate-limit headers forwarded by LiteLLM with a prefix ---

LITELLM_429 = Reply(
    429,
    {"error": {"message": "Rate limit exceeded", "type": "None", "param": "None", "code": "429"}},
    {"llm_provider-retry-after": "1", "llm_provider-retry-after-ms": "1000"},
)


def test_a_429_through_litellm_carries_its_prefixed_wait() -> None:
    error = classify_status(
        429, LITELLM_429.headers, json.dumps(LITELLM_429.body).encode(), Redactor(TEST_KEY)
    )

    assert isinstance(error, RetryableError)
    assert (error.kind, error.retry_after_s) == ("rate_limited", 1.0)
    assert retry_after({"llm_provider-retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "2", "llm_provider-retry-after": "3"}) == 2.0  # the server's own first


def test_prefixed_rate_limit_headers_are_read() -> None:
    headers = {
        "llm_provider-x-ratelimit-remaining-requests": "0",
        "llm_provider-x-ratelimit-reset-requests": "1.5s",
        "llm_provider-x-ratelimit-remaining-tokens": "9000",
        "llm_provider-x-ratelimit-reset-tokens": "6m0s",
    }

    assert server_budget(headers) == RateLimitHeaders(0, 1.5, 9000, 360.0)


def test_a_gateway_429_holds_for_the_prefixed_retry_after(tmp_path: Path) -> None:
    """A 2 s wait, not the quoted 1 s: without the header the limiter holds 1 s of its own."""
    arrivals: list[float] = []

    def chat(request: Request) -> Reply:
        arrivals.append(time.monotonic())
        if len(arrivals) == 1:
            return Reply(429, LITELLM_429.body, {"llm_provider-retry-after": "2"})
        return Reply(200, completion())

    with serve_stub(gateway(chat)) as stub:
        job = write_job(tmp_path, article_rows(1), stub.base_url, retry=RETRY)
        result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    assert read_output(job)["status"].to_list() == ["ok"]
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 1.9


def test_a_prefixed_empty_budget_holds_until_its_reset(tmp_path: Path) -> None:
    arrivals: list[float] = []

    def chat(request: Request) -> Reply:
        arrivals.append(time.monotonic())
        headers = {
            "llm_provider-x-ratelimit-remaining-requests": "0" if len(arrivals) == 1 else "100",
            "llm_provider-x-ratelimit-reset-requests": "1.5s",
        }
        return Reply(200, completion(), headers)

    with serve_stub(gateway(chat)) as stub:
        job = write_job(tmp_path, article_rows(2), stub.base_url, retry=RETRY, concurrency=1)
        result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    assert arrivals[1] - arrivals[0] >= 1.4


# --- #11 item 6: llama.cpp's `data: [DONE]` before any finish_reason ---


def sse(pieces: list[str], finish_reason: str | None) -> bytes:
    """An SSE body as llama.cpp's server sends it, ending in `data: [DONE]`."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "tiny"}
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces
    ]
    if finish_reason:
        chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
    return b"".join(f"data: {json.dumps(c)}\r\n\r\n".encode() for c in chunks) + b"data: [DONE]\r\n\r\n"


def sse_reply(body: bytes) -> Reply:
    """A whole body (content-length exact) and then the connection closed: the transport sees no fault.

    `connection: close` keeps the client from reusing the closed connection, which would cost a row
    an attempt (`closed by the server before it answered`) whenever it lost that race.
    """
    head = (
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return Reply(raw=head.encode() + body)


def test_a_done_without_finish_reason_is_retried_until_whole(tmp_path: Path) -> None:
    seen: dict[str, int] = {}

    def chat(request: Request) -> Reply:
        prompt = user_prompt(request)
        seen[prompt] = seen.get(prompt, 0) + 1
        if seen[prompt] == 1:
            return sse_reply(sse(["The answer", " was cut"], None))
        return sse_reply(sse(["The answer", " is whole."], "stop"))

    with serve_stub(gateway(chat)) as stub:
        params = {"temperature": 0, "max_tokens": 40, "stream": True}
        job = write_job(tmp_path, article_rows(3), stub.base_url, params=params)
        result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    out = read_output(job)
    assert out["status"].to_list() == ["ok"] * 3
    assert out["content"].to_list() == ["The answer is whole."] * 3
    assert out["attempts"].to_list() == [2] * 3


# --- #11 item 7: error bodies in other shapes ---


CONTEXT_TOO_LONG = {
    "error": {
        "message": "This model's maximum context length is 8192 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
FASTAPI_422 = {"detail": [{"type": "missing", "loc": ["body", "messages"], "msg": "Field required"}]}
LITELLM_400 = {"error": {"message": "bad", "type": "None", "param": "None", "code": "400"}}
VLLM_400 = {"object": "error", "message": "no", "type": "BadRequestError", "param": None, "code": 400}


@pytest.mark.parametrize(
    ("status", "body", "error_type", "kind", "text"),
    [
        (400, {"detail": "Invalid model"}, PermanentError, "http_400", "HTTP 400: Invalid model"),
        (422, FASTAPI_422, PermanentError, "http_422", "HTTP 422: body.messages: Field required"),
        (
            400,
            CONTEXT_TOO_LONG,
            PermanentError,
            "context_length_exceeded",
            "maximum context length is 8192 tokens.",
        ),
        (
            500,
            {"error": {"message": "busy", "code": "model_overloaded"}},
            RetryableError,
            "model_overloaded",
            "busy",
        ),
        (503, {"error": {"message": "away", "code": "upstream_down"}}, EndpointDown, "upstream_down", "away"),
        (
            429,
            {"error": {"message": "slow", "code": "rate_limit_exceeded"}},
            RetryableError,
            "rate_limited",
            "slow",
        ),
        # LiteLLM's codes are the status as text and its types "None"; a type is no code.
        (400, LITELLM_400, PermanentError, "http_400", "HTTP 400: bad"),
        (
            400,
            {"error": {"message": "bad", "type": "invalid_request_error"}},
            PermanentError,
            "http_400",
            "bad",
        ),
        (400, VLLM_400, PermanentError, "http_400", "HTTP 400: no"),
        (400, "<html>Bad Request</html>", PermanentError, "http_400", "HTTP 400"),
    ],
)
def test_error_bodies_give_their_message_and_code(
    status: int, body: Any, error_type: type[RequestFailed], kind: str, text: str
) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()

    error = classify_status(status, {}, raw, Redactor(TEST_KEY))

    assert type(error) is error_type
    assert isinstance(error, RequestFailed)
    assert error.kind == kind
    assert str(error).startswith(f"{kind}: ")
    assert str(error).endswith(text)


def test_a_fastapi_detail_names_why_the_key_was_rejected(tmp_path: Path) -> None:
    with serve_stub(lambda request: Reply(401, {"detail": "Invalid API key"})) as stub:
        job = write_job(tmp_path, article_rows(3), stub.base_url)
        result = invoke("run", str(job))

    assert result.exit_code == 2
    assert "HTTP 401: Invalid API key" in result.stderr
    assert stub.chat_requests() == []


def test_the_servers_error_code_is_the_rows_error_kind(tmp_path: Path) -> None:
    too_long = Reply(400, CONTEXT_TOO_LONG)
    rows = article_rows(4)
    rows[2]["text"] *= 50
    with serve_stub(
        gateway(lambda r: too_long if len(user_prompt(r)) > 1000 else Reply(200, completion()))
    ) as stub:
        job = write_job(tmp_path, rows, stub.base_url)
        result = invoke("run", str(job))

    assert result.exit_code == 1
    failed = read_output(job).filter(pl.col("status") == "failed")
    assert failed["id"].to_list() == [rows[2]["id"]]
    assert failed["error_kind"].to_list() == ["context_length_exceeded"]
    assert failed["error"].to_list() == [
        "context_length_exceeded: HTTP 400: This model's maximum context length is 8192 tokens."
    ]
    assert failed["attempts"].to_list() == [1]
    assert "1 failed (context_length_exceeded: 1)" in result.stderr


# --- #10 item 4: which answers are an outage, and which of those a configuration problem ---


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (500, RetryableError),
        (502, EndpointDown),
        (503, EndpointDown),
        (504, EndpointDown),
        (400, PermanentError),
    ],
)
def test_only_gateway_statuses_are_an_outage(status: int, error_type: type[RequestFailed]) -> None:
    error = classify_status(status, {}, b"", Redactor(TEST_KEY))

    assert type(error) is error_type
    assert not isinstance(error, EndpointDown) or not error.config_problem


# --- #11 item 8 (and #10 item 4): transport failures in words, on real sockets ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def listener(on_connection: Callable[[socket.socket], None] | None) -> Iterator[str]:
    """A raw TCP listener's base URL; without `on_connection` it never accepts (the kernel does, silently)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        if on_connection is not None:

            def serve() -> None:
                connection, _ = server.accept()
                with connection:
                    on_connection(connection)

            threading.Thread(target=serve, daemon=True).start()
        yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"


def reset_after_request(connection: socket.socket) -> None:
    connection.recv(65536)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST


def complete(base_url: str, timeout_s: float = 5, stream: bool = False) -> EndpointDown:
    """One request through the real client; the EndpointDown it raised."""

    async def attempt() -> None:
        async with ChatClient(base_url, TEST_KEY, timeout_s, max_connections=1, max_response_mb=32) as client:
            await client.complete(
                {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            )

    with pytest.raises(EndpointDown) as caught:
        asyncio.run(attempt())
    return caught.value


FIRST_CHUNK = sse(["The answer"], None).split(b"data: [DONE]")[0]
CUT_CHUNKED = (  # one whole chunk of a chunked body, then the connection closed without the last `0` chunk
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + f"{len(FIRST_CHUNK):x}\r\n".encode()
    + FIRST_CHUNK
    + b"\r\n"
)
CUT_LENGTH = (
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n{"id": "chatcmpl'
)


@pytest.mark.parametrize(
    ("reply", "stream", "text"),
    [
        (Reply(raw=CUT_CHUNKED), True, "connection: closed before the answer ended"),
        (Reply(raw=CUT_LENGTH), False, "connection: closed before the answer ended"),
        (Reply(raw=b""), False, "connection: closed by the server before it answered"),
        (
            Reply(raw=b"HTTP/1.1 200 OK\r\ncontent-le"),
            False,
            "connection: closed by the server before it answered",
        ),
    ],
)
def test_a_connection_closed_early_says_so(reply: Reply, stream: bool, text: str) -> None:
    with serve_stub(lambda request: reply) as stub:
        error = complete(stub.base_url, stream=stream)

    assert (str(error), error.config_problem) == (text, False)


def test_a_refused_connection_says_so() -> None:
    error = complete(f"http://127.0.0.1:{free_port()}/v1")

    assert (str(error), error.config_problem) == ("connection: refused", False)


@pytest.mark.parametrize(
    ("reply", "raised", "cause"),
    [
        (None, httpx2.ConnectTimeout, aiohttp.ClientConnectorError),  # refused: as httpx-aiohttp maps it
        (Reply(raw=CUT_CHUNKED), httpx2.ReadError, aiohttp.ClientPayloadError),
    ],
)
def test_our_pool_fails_with_httpxs_exceptions_caused_by_aiohttps(
    reply: Reply | None, raised: type[httpx2.HTTPError], cause: type[aiohttp.ClientError]
) -> None:
    """What a user of the httpx API sees from our pool: httpx2's exception, aiohttp's its cause."""

    async def stream(base_url: str) -> None:
        pool = AiohttpPool(base_url, max_connections=1, connect_timeout_s=5, max_bytes=1 << 20)
        async with (
            httpx2.AsyncClient(transport=pool) as client,
            client.stream("POST", f"{base_url}/chat/completions", content=b"{}") as response,
        ):
            async for _ in response.aiter_bytes():
                pass

    with contextlib.ExitStack() as stack:
        base_url = f"http://127.0.0.1:{free_port()}/v1"
        if reply is not None:
            base_url = stack.enter_context(serve_stub(lambda request: reply)).base_url
        with pytest.raises(httpx2.HTTPError) as caught:
            asyncio.run(stream(base_url))

    assert type(caught.value) is raised
    assert isinstance(caught.value.__cause__, cause)


def test_a_reset_connection_says_so() -> None:
    with listener(reset_after_request) as base_url:
        error = complete(base_url)

    assert (str(error), error.config_problem) == ("connection: reset by the server", False)


def test_a_server_that_never_answers_times_out() -> None:
    with listener(None) as base_url:
        started = time.monotonic()
        error = complete(base_url, timeout_s=0.5)

    assert time.monotonic() - started >= 0.5
    assert (str(error), error.config_problem) == ("timeout: no answer within 0.5 s", False)


def test_a_host_name_that_does_not_resolve_is_a_configuration_problem() -> None:
    error = complete("http://api.example.invalid/v1")

    assert error.kind == "dns"
    assert str(error).startswith("dns: the host name does not resolve (")
    assert "Error" not in str(error)
    assert error.config_problem


def test_tls_to_a_plain_http_server_is_a_configuration_problem() -> None:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        error = complete(sim.base_url.replace("http://", "https://"))

    # OpenSSL's words vary with its version ("wrong version number", "record layer failure").
    assert str(error).startswith("tls: the handshake failed (")
    assert not any(noise in str(error) for noise in ("SSL", "_ssl.c", "Error"))
    assert error.config_problem


def test_a_certificate_the_client_does_not_trust_is_a_configuration_problem() -> None:
    """A server whose certificate no trusted CA signed (a local server's own, a company proxy's)."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_tls)

    async def attempt() -> None:
        server = await asyncio.start_server(lambda _r, writer: writer.close(), "127.0.0.1", 0, ssl=server_tls)
        base_url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        async with server, ChatClient(base_url, TEST_KEY, 5, max_connections=1, max_response_mb=32) as client:
            await client.complete({"model": "m", "messages": []})

    with pytest.raises(EndpointDown) as caught:
        asyncio.run(attempt())

    assert str(caught.value).startswith("tls: the handshake failed (certificate verify failed: ")
    assert "_ssl.c" not in str(caught.value)
    assert caught.value.config_problem


def test_a_row_cut_mid_stream_every_time_fails_in_words(tmp_path: Path) -> None:
    """The issue's `connection: ClientPayloadError ... TransferEncodingError: 400`, as the table shows it."""
    rows = article_rows(4)
    rows[1]["text"] += " [[cut]]"

    def chat(request: Request) -> Reply:
        return (
            Reply(raw=CUT_CHUNKED) if "[[cut]]" in user_prompt(request) else sse_reply(sse(["Fine."], "stop"))
        )

    with serve_stub(gateway(chat)) as stub:
        params = {"temperature": 0, "max_tokens": 40, "stream": True}
        retry = {**RETRY, "max_attempts": 2}
        job = write_job(tmp_path, rows, stub.base_url, params=params, retry=retry)
        result = invoke("run", str(job))

    assert result.exit_code == 1
    out = read_output(job)
    assert out["status"].to_list() == ["ok", "failed", "ok", "ok"]
    assert out["error_kind"][1] == "connection"
    assert out["error"][1] == "connection: closed before the answer ended"


def test_an_answer_read_whole_is_decoded_when_compressed_and_the_request_framed() -> None:
    """Our pool skips httpx's decoding pass over a body that is not content-encoded; a gzip one is
    still decoded. The request carries its length and host, which aiohttp adds (not httpx)."""
    plain = completion("Plain.", prompt_tokens=4, completion_tokens=1, total_tokens=5)
    packed = gzip.compress(json.dumps(completion("Packed.")).encode())

    def chat(request: Request) -> Reply:
        if user_prompt(request) == "gzip":
            return Reply(200, packed, {"content-encoding": "gzip"})
        return Reply(200, plain)

    async def ask(base_url: str) -> list[str | None]:
        async with ChatClient(base_url, TEST_KEY, 5, max_connections=1, max_response_mb=1) as client:
            answers = [
                await client.complete({"model": "m", "messages": [{"role": "user", "content": text}]})
                for text in ("gzip", "plain")
            ]
        return [answer.content for answer in answers]

    with serve_stub(chat) as stub:
        assert asyncio.run(ask(stub.base_url)) == ["Packed.", "Plain."]

    sent = stub.chat_requests()[0]
    assert sent.headers["content-length"] == str(len(sent.body))
    assert sent.headers["host"] == f"127.0.0.1:{stub.port}"
    assert sent.headers["authorization"] == f"Bearer {TEST_KEY}"
    assert sent.json()["messages"][0]["content"] == "gzip"
