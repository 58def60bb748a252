"""Answers a hostile or merely unusual server sends: each is one row's problem, never the job's.

Each test replays crafted bodies from a stub server on loopback and drives the real CLI; the
property test beside them (test_any_answer.py) serves generated ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.conftest import TEST_KEY, article_rows, checkpoint_path, invoke, read_output, write_job
from tests.stub_server import Reply, Request, completion, serve_stub

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
RETRY = {"max_attempts": 3, "initial_backoff_s": 0.001, "max_backoff_s": 0.01, "max_outage_s": 5}


def no_model_list(chat: Callable[[Request], Reply]) -> Callable[[Request], Reply]:
    """A server without `GET /models` (404: the model check is skipped) answering chat with `chat`."""

    def handle(request: Request) -> Reply:
        return Reply(404, {"detail": "Not Found"}) if request.path.endswith("/models") else chat(request)

    return handle


def row_number(request: Request) -> int:
    """The row a request was rendered from (article_rows' titles are `Story N`)."""
    found = re.search(r"Story (\d+)", request.json()["messages"][-1]["content"])
    assert found is not None
    return int(found.group(1))


def with_message(**message: Any) -> dict[str, Any]:
    body = completion()
    body["choices"][0]["message"].update(message)
    return body


def everything_written(job: Path) -> str:
    """Every text batchrun kept for the job: the output's cells, the checkpoint's rows, the
    report; lower-cased, for a search in any letter case."""
    out = read_output(job)
    cells = [str(v) for column in out.columns for v in out[column].to_list()]
    with sqlite3.connect(checkpoint_path(job)) as db:
        dump = "\n".join(db.iterdump())
    report = (job.parent / "out" / "result.parquet.report.json").read_text()
    return "\n".join([*cells, dump, report]).lower()


# --- 1: the key, echoed back, is never printed or kept ---

LITELLM_KEY_ECHO = Reply(
    400,
    {
        "error": {
            "message": "Authentication Error, Invalid proxy server token passed. "
            f"Received API Key = {TEST_KEY}",
            "type": "auth_error",
            "code": "400",
        }
    },
)


@pytest.mark.parametrize(
    "command", [("run",), ("validate",), ("estimate",), ("models", "--job")], ids=lambda c: c[0]
)
def test_a_key_echoed_in_the_model_lists_error_is_not_printed(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    with serve_stub(lambda request: LITELLM_KEY_ECHO) as stub:
        job = write_job(tmp_path, article_rows(3), stub.base_url)
        result = invoke(*command, str(job))

    assert result.exit_code == 2, result.output
    assert "Received API Key = [redacted]" in result.stderr
    assert TEST_KEY[:8].lower() not in result.output.lower()
    assert stub.chat_requests() == []


def test_a_key_quoted_back_in_any_case_is_kept_nowhere(tmp_path: Path) -> None:
    quoted = {0: TEST_KEY.lower(), 1: TEST_KEY.upper(), 2: TEST_KEY[:12]}

    def chat(request: Request) -> Reply:
        n = row_number(request)
        if n in quoted:
            return Reply(200, with_message(content=f"your key is {quoted[n]}"))
        return Reply(400, {"error": {"message": f"bad request from {TEST_KEY.swapcase()}", "code": "bad"}})

    with serve_stub(no_model_list(chat)) as stub:
        job = write_job(tmp_path, article_rows(5), stub.base_url, retry=RETRY)
        run = invoke("run", str(job))
        status = invoke("status", str(job))
        report = invoke("report", str(job))

    assert run.exit_code == 1, run.output
    assert status.exit_code == report.exit_code == 0
    out = read_output(job)
    assert out["content"].to_list()[:3] == ["your key is [redacted]"] * 3
    assert out["error"].to_list()[3:] == ["bad: HTTP 400: bad request from [redacted]"] * 2
    page = (job.parent / "out" / "result.parquet.report.html").read_text().lower()
    for text in (everything_written(job), page, run.output.lower(), status.output.lower()):
        assert TEST_KEY[:8].lower() not in text


# --- 2, 3: a field of an unexpected JSON type is one row's invalid_response ---

ODD_SHAPES: dict[int, dict[str, Any]] = {
    0: with_message(
        content=[{"type": "text", "text": "hel"}, {"type": "thinking"}, {"type": "text", "text": "lo"}]
    ),
    1: with_message(content={"text": "an object"}),
    2: {**completion(), "model": ["a", "list"]},
    3: {**completion(), "choices": [{**completion()["choices"][0], "finish_reason": {"an": "object"}}]},
    4: {**completion(), "usage": {"prompt_tokens": "10", "completion_tokens": "3", "total_tokens": "13"}},
    5: {**completion(), "usage": {"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": [1]}},
    6: {**completion(), "choices": []},
}


def test_fields_of_unexpected_types_fail_their_row_and_the_job_goes_on(tmp_path: Path) -> None:
    with serve_stub(no_model_list(lambda r: Reply(200, ODD_SHAPES.get(row_number(r), completion())))) as stub:
        job = write_job(tmp_path, article_rows(9), stub.base_url, retry=RETRY)
        first = invoke("run", str(job))
        again = invoke("run", str(job))

    assert first.exit_code == 1, first.output
    assert first.exception is None or isinstance(first.exception, SystemExit)
    out = read_output(job)
    assert out["status"].to_list() == ["ok", "failed", "failed", "failed", "ok", "ok", "failed", "ok", "ok"]
    assert out["content"][0] == "hello"  # text parts are text
    assert set(out.filter(pl.col("status") == "failed")["error_kind"]) == {"invalid_response"}
    assert out["error"][1] == "invalid_response: message.content is an object, not text"
    assert out["prompt_tokens"][4] is None and out["prompt_tokens"][5] is None  # usage set aside
    # Said once, for whichever of rows 4 and 5 finished first.
    reasons = ("(prompt_tokens is a string)", "(usage details are not objects)")
    assert any(f"token usage that no request could be billed {why}" in first.stderr for why in reasons)
    assert again.exit_code == 1 and read_output(job).height == 9


def sse_reply(*chunks: dict[str, Any] | str) -> Reply:
    events = "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks)
    return Reply(200, events, {"content-type": "text/event-stream"})


def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "c",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }


ODD_STREAMS: dict[int, Reply] = {
    0: sse_reply(chunk({"content": 5}), chunk({}, "stop"), "[DONE]"),
    1: sse_reply(
        chunk({"content": "ok"}),
        chunk({}, "stop"),
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "prompt_tokens_details": [2]}},
        "[DONE]",
    ),
    2: sse_reply(chunk({"content": [{"type": "text", "text": "parts"}]}), chunk({}, "stop"), "[DONE]"),
}


def test_streamed_chunks_of_unexpected_types_fail_their_row_only(tmp_path: Path) -> None:
    def chat(request: Request) -> Reply:
        return ODD_STREAMS.get(
            row_number(request), sse_reply(chunk({"content": "fine"}), chunk({}, "stop"), "[DONE]")
        )

    with serve_stub(no_model_list(chat)) as stub:
        params = {"max_tokens": 40, "stream": True}
        job = write_job(tmp_path, article_rows(4), stub.base_url, params=params, retry=RETRY)
        result = invoke("run", str(job))

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    out = read_output(job)
    assert out["status"].to_list() == ["failed", "ok", "ok", "ok"]
    assert out["error"][0] == "invalid_response: delta.content is a number, not text"
    assert out["content"].to_list()[1:] == ["ok", "parts", "fine"]
    assert out["prompt_tokens"][1] is None


# --- 4, 5: usage no request could be billed is unknown, never a lower spend ---


def test_absurd_counts_are_unknown_and_the_checkpoint_stays_readable(tmp_path: Path) -> None:
    absurd = [
        {"prompt_tokens": 1e300, "completion_tokens": 3},
        {"prompt_tokens": 10**23, "completion_tokens": 3},
    ]

    def chat(request: Request) -> Reply:
        n = row_number(request)
        return Reply(200, {**completion(), "usage": absurd[n]} if n < 2 else completion())

    with serve_stub(no_model_list(chat)) as stub:
        job = write_job(tmp_path, article_rows(4), stub.base_url, retry=RETRY)
        results = [
            invoke(*args, str(job)) for args in (("run",), ("run",), ("report",), ("cost",), ("status",))
        ]

    assert [r.exit_code for r in results] == [0] * 5, [r.output for r in results]
    out = read_output(job)
    assert out["prompt_tokens"].to_list() == [None, None, 10, 10]
    assert out["cost_usd"].null_count() == 2


def test_negative_usage_never_lowers_spending_nor_lifts_the_budget(tmp_path: Path) -> None:
    def chat(request: Request) -> Reply:
        if row_number(request) % 10 == 9:
            return Reply(200, completion(prompt_tokens=-1_000_000, completion_tokens=-1_000_000))
        return Reply(200, completion(prompt_tokens=300, completion_tokens=60, total_tokens=360))

    sent = {}
    for server in ("honest", "negative"):
        (tmp_path / server).mkdir()
        handler = (
            (lambda r: Reply(200, completion(prompt_tokens=300, completion_tokens=60)))
            if server == "honest"
            else chat
        )
        with serve_stub(no_model_list(handler)) as stub:
            job = write_job(tmp_path / server, article_rows(200), stub.base_url, retry=RETRY, concurrency=4)
            result = invoke("run", str(job), "--max-cost", "0.01")
            sent[server] = len(stub.chat_requests())
        assert result.exit_code == 3, result.output
        out = read_output(job)
        assert (out["cost_usd"].drop_nulls() >= 0).all()
        assert out["cost_usd"].sum() <= 0.01
        assert "$-" not in result.stderr

    assert sent["negative"] <= sent["honest"]  # set-aside usage counts at its worst case


# --- 7: terminal escapes are shown, not obeyed ---

ESCAPES = "\x1b]0;pwned\x07 \x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\ \x1b[2J\x1b[31mred\x00"


def test_control_characters_from_a_server_are_escaped_on_the_terminal(tmp_path: Path) -> None:
    error = Reply(400, {"error": {"message": f"refused {ESCAPES}", "code": "x\x1b[2Jy"}})
    with serve_stub(
        no_model_list(lambda r: error if row_number(r) == 1 else Reply(200, completion()))
    ) as stub:
        job = write_job(tmp_path, article_rows(3), stub.base_url, retry=RETRY)
        run = invoke("run", str(job))
        status = invoke("status", str(job))

    assert run.exit_code == 1
    for text in (run.output, status.output):
        assert not CONTROL.search(text)
    assert "refused \\u001b]0;pwned\\u0007" in run.stderr
    assert read_output(job)["error"][1] == f"http_400: HTTP 400: refused {ESCAPES}"  # files keep it verbatim


# --- 8: no answer is read past endpoint.max_response_mb ---


@contextlib.contextmanager
def endless_server(event_stream: bool) -> Iterator[tuple[str, list[int]]]:
    """A server whose chat answer never ends (1 MB chunks, up to 512 of them): yields its base
    URL and, per answer, the bytes it got into the socket before the client hung up."""
    written: list[int] = []
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    stop: list[asyncio.Future[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head.lower())
        await reader.readexactly(int(length.group(1)) if length else 0)
        if head.startswith(b"GET"):  # no model list
            writer.write(b"HTTP/1.1 404 X\r\ncontent-length: 0\r\n\r\n")
            writer.close()
            return
        kind = b"text/event-stream" if event_stream else b"application/json"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\ntransfer-encoding: chunked\r\n\r\n")
        piece = (b'data: {"choices":[{"delta":{"content":"' + b"x" * 1000 + b'"}}]}\n\n') * 1000
        sent = 0
        with contextlib.suppress(ConnectionError):
            for _ in range(512):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                sent += len(piece)
        written.append(sent)
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        stop.append(loop.create_future())
        ready.set()
        async with server:
            await stop[0]

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield f"http://127.0.0.1:{port[0]}/v1", written
    finally:
        loop.call_soon_threadsafe(stop[0].set_result, None)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("event_stream", [False, True], ids=["json", "sse"])
def test_an_endless_answer_fails_its_row_at_the_size_cap(tmp_path: Path, event_stream: bool) -> None:
    with endless_server(event_stream) as (base_url, written):
        endpoint = {"base_url": base_url, "api_key_env": "BATCHRUN_TEST_KEY", "max_response_mb": 2}
        job = write_job(tmp_path, article_rows(2), base_url, endpoint=endpoint, retry=RETRY)
        result = invoke("run", str(job))

    assert result.exit_code == 1, result.output
    out = read_output(job)
    assert out["status"].to_list() == ["failed", "failed"]
    assert set(out["error_kind"]) == {"response_too_large"}
    assert out["attempts"].to_list() == [1, 1]  # a permanent failure: not asked again
    # The client stopped reading at 2 MiB; what the server got into the socket before it saw the
    # hang-up is bounded by the kernel's buffers, far below the 512 MiB it would have sent.
    assert written and max(written) < 64 * 2**20


# --- 9: a transient fault among the first answers is retried; only silence ends the job ---


def test_a_reset_and_502s_among_the_first_answers_are_retried(tmp_path: Path) -> None:
    faults = iter(
        [Reply(raw=b""), Reply(502, "<html>Bad Gateway</html>"), Reply(502, "<html>Bad Gateway</html>")]
    )
    lock = threading.Lock()

    def chat(request: Request) -> Reply:
        with lock:
            return next(faults, None) or Reply(200, completion())

    with serve_stub(no_model_list(chat)) as stub:
        # One at a time, so that the reset surely comes before any answer.
        retry = {**RETRY, "max_attempts": 4}
        job = write_job(tmp_path, article_rows(20), stub.base_url, retry=retry, concurrency=1)
        result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    out = read_output(job)
    assert set(out["status"]) == {"ok"}
    assert out["attempts"][0] == 4


def test_an_outage_under_way_fails_no_row_before_the_breaker_decides(tmp_path: Path) -> None:
    """40 requests in a row get no answer, beside 4 workers allowed 3 attempts each: before the
    breaker's 10th failure a row could use up its attempts, and none may."""
    count = [0]
    lock = threading.Lock()

    def down_a_while(request: Request) -> Reply:  # the model list too, as a server that is down
        with lock:
            count[0] += 1
            silent = 40 < count[0] <= 80
        if silent:
            return Reply(raw=b"")
        return Reply(404, {}) if request.path.endswith("/models") else Reply(200, completion())

    with serve_stub(down_a_while) as stub:
        job = write_job(tmp_path, article_rows(150), stub.base_url, retry=RETRY, concurrency=4)
        result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    assert set(read_output(job)["status"]) == {"ok"}
    assert "endpoint down since" in result.stderr


def test_a_job_ending_with_exit_4_writes_its_output(tmp_path: Path) -> None:
    lock = threading.Lock()
    answered = [0]

    def down_after_five(request: Request) -> Reply:
        if request.path.endswith("/models"):
            return Reply(404, {}) if not answered[0] else Reply(raw=b"")
        with lock:
            answered[0] += 1
            return Reply(200, completion()) if answered[0] <= 5 else Reply(raw=b"")

    with serve_stub(down_after_five) as stub:
        retry = {**RETRY, "max_outage_s": 0.2}
        job = write_job(tmp_path, article_rows(30), stub.base_url, retry=retry, concurrency=1)
        result = invoke("run", str(job))

    assert result.exit_code == 4, result.output
    out = read_output(job)
    assert out.height == 30
    assert out["status"].to_list()[:5] == ["ok"] * 5
    assert set(out["status"].to_list()[5:]) == {"pending"}
