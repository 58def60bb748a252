"""The HTTP client against what real servers send: a LiteLLM gateway's prefixed headers, llama.cpp's
early `[DONE]`, error bodies in other shapes, and every way a connection can fail, on real sockets.

Unit tests read headers and bodies; the rest run the real CLI (or the real client) against stub
servers on 127.0.0.1 that replay the answers quoted in issue #11.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from batchrun.client import classify_status, retry_after, server_budget
from batchrun.errors import RetryableError
from batchrun.limits import ServerBudget
from tests.conftest import article_rows, invoke, read_output, write_job
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
    error = classify_status(429, LITELLM_429.headers, json.dumps(LITELLM_429.body).encode())

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

    assert server_budget(headers) == ServerBudget(0, 1.5, 9000, 360.0)


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
    """A whole body (content-length exact) and then the connection closed: the transport sees no fault."""
    head = f"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {len(body)}\r\n\r\n"
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
