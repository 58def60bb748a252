"""Streamed answers: assembled from SSE, timed to the first token, retried when cut short."""

from __future__ import annotations

from pathlib import Path

import httpx2
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun.answers import Bounds, Redactor, StreamAssembler
from batchrun.errors import RetryableError
from batchrun.simulator import RunningSimulator, SimulatorConfig, serve_in_thread
from tests.conftest import TEST_KEY, article_rows, invoke, read_output, write_job

PARAMS = {"temperature": 0.2, "max_tokens": 40}


def test_streamed_rows_match_plain_rows_and_record_ttft(tmp_path: Path) -> None:
    rows = article_rows(40)
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, latency_ms=30)) as sim:
        plain_dir, streamed_dir = tmp_path / "plain", tmp_path / "streamed"
        plain_dir.mkdir()
        streamed_dir.mkdir()
        plain = write_job(plain_dir, rows, sim.base_url)
        streamed = write_job(streamed_dir, rows, sim.base_url, params={**PARAMS, "stream": True})
        assert invoke("run", str(plain)).exit_code == 0
        assert invoke("run", str(streamed)).exit_code == 0

    a, b = read_output(plain), read_output(streamed)
    for column in (
        "id",
        "content",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "system_fingerprint",
    ):
        assert a[column].to_list() == b[column].to_list(), column
    assert a["system_fingerprint"].null_count() == 0
    assert a["ttft_ms"].null_count() == 40
    assert b["ttft_ms"].null_count() == 0
    assert (b["ttft_ms"] >= 30).all()
    assert (b["ttft_ms"] <= b["latency_ms"]).all()


@pytest.mark.parametrize("fault", ["truncatex1", "badjsonx1", "truncatex2"])
def test_cut_or_broken_streams_are_retried(tmp_path: Path, fault: str) -> None:
    rows = article_rows(6)
    rows[1]["text"] += f" [[fail:{fault}]]"
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        job = write_job(tmp_path, rows, sim.base_url, params={**PARAMS, "stream": True})
        result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    out = read_output(job)
    assert set(out["status"]) == {"ok"}
    assert out["attempts"][1] == 1 + int(fault[-1])
    assert out["content"][1].startswith("Story 1 Lead sentence of story 1.")


def test_stream_without_usage_leaves_tokens_null_and_warns_once(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    params = {**PARAMS, "stream": True, "stream_options": {"include_usage": False}}
    job = write_job(tmp_path, article_rows(12), simulator.base_url, params=params)

    result = invoke("run", str(job))

    assert result.exit_code == 0
    out = read_output(job)
    assert out["total_tokens"].null_count() == 12
    assert out["content"].null_count() == 0
    assert result.stderr.count("warning: the endpoint sent no token usage") == 1
    assert "tokens: unknown (the endpoint reported no usage for 12 rows)" in result.stderr


def sse_body(pieces: list[str], usage: bool, noise: list[str]) -> list[str]:
    """The events an OpenAI-style server sends for `pieces` (one string each, ending in its blank
    line), with comments and other fields mixed in."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m"}
    chunks = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{**head, "choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        chunks.append({**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    events = []
    for i, chunk in enumerate(chunks):
        extra = noise[i % len(noise)] + "\n" if noise else ""
        events.append(extra + "data: " + orjson.dumps(chunk).decode() + "\n\n")
    return [*events, "data: [DONE]\n\n"]


def assemble(events: list[str]) -> tuple[StreamAssembler, list[bool]]:
    """The events parsed as the client parses them (httpx2's EventSource), fed to an assembler."""
    body = httpx2.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content="".join(events),
        request=httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions"),
    )
    stream = StreamAssembler(Bounds(Redactor(TEST_KEY), output_tokens=None))
    return stream, [stream.feed(event.data) for event in httpx2.EventSource(body)]


@given(
    pieces=st.lists(st.text(min_size=1), max_size=20),
    usage=st.booleans(),
    noise=st.lists(
        st.sampled_from([": keep-alive", "event: message", "id: 7", ":", "retry: 1000"]), max_size=4
    ),
)
def test_assembler_rebuilds_any_stream(pieces: list[str], usage: bool, noise: list[str]) -> None:
    stream, firsts = assemble(sse_body(pieces, usage, noise))

    assert stream.finish().content == "".join(pieces)
    assert stream.finish_reason == "stop"
    assert (stream.usage is not None) == usage
    assert sum(firsts) == (1 if "".join(pieces) else 0)


@given(pieces=st.lists(st.text(min_size=1), max_size=10), cut=st.integers(min_value=0))
def test_assembler_rejects_any_stream_cut_before_done(pieces: list[str], cut: int) -> None:
    events = sse_body(pieces, usage=True, noise=[])
    stream, _ = assemble(events[: cut % len(events)])  # always drops the [DONE] event
    with pytest.raises(RetryableError, match="before data: \\[DONE\\]"):
        stream.finish()


@given(pieces=st.lists(st.text(min_size=1), max_size=10))
def test_assembler_rejects_a_done_that_came_before_any_finish_reason(pieces: list[str]) -> None:
    """llama.cpp's server sends `[DONE]` mid-answer when another request waits (issue #11 item 6)."""
    events = [event for event in sse_body(pieces, usage=True, noise=[]) if "finish_reason" not in event]
    stream, _ = assemble(events)

    assert stream.done
    with pytest.raises(RetryableError) as caught:
        stream.finish()
    assert caught.value.kind == "truncated_stream"
