"""The simulator over real HTTP: answers, usage, streaming, validation and injected faults."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import aiohttp
import httpx
import pytest
from openai import OpenAI

from batchrun.answers import server_budget
from batchrun.simulator import RunningSimulator, SimulatorConfig, latencies, serve_forever, serve_in_thread
from batchrun.simulator.endpoint import SYSTEM_FINGERPRINT
from batchrun.simulator.ratelimits import go_duration
from tests.conftest import article_rows, invoke, read_output, write_job

ARTICLE = "The cat sat on the mat. It purred loudly! Then it left the room."
LEAD = "The cat sat on the mat. It purred loudly!"


def chat_body(user: str, model: str = "grok-4.3", **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "You summarise."}, {"role": "user", "content": user}]
    return {"model": model, "messages": messages, **extra}


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with serve_in_thread() as running:
        yield running


@pytest.fixture
def client(sim: RunningSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, timeout=5) as http:
        yield http


def post(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post("/chat/completions", json=body)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.text.split("\n\n") if line]


def test_answer_is_the_lead_sentences_with_openai_shape_and_usage(client: httpx.Client) -> None:
    response = post(client, chat_body(ARTICLE))

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{16}", data["id"])
    assert abs(data["created"] - time.time()) < 60
    assert data == {
        "id": data["id"],
        "object": "chat.completion",
        "created": data["created"],
        "model": "grok-4.3",
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": LEAD, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        # system: 3 tokens + 4; user: 17 tokens + 4; answer: 11 tokens
        "usage": {"prompt_tokens": 28, "completion_tokens": 11, "total_tokens": 39},
    }


def test_id_is_a_hash_of_the_body(client: httpx.Client) -> None:
    first, again = post(client, chat_body(ARTICLE)), post(client, chat_body(ARTICLE))
    other = post(client, chat_body(ARTICLE + " More."))

    assert first.json()["id"] == again.json()["id"]
    assert first.json()["id"] != other.json()["id"]


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_cuts_after_the_last_kept_token(client: httpx.Client, param: str) -> None:
    cut = post(client, chat_body(ARTICLE, **{param: 8})).json()
    exact = post(client, chat_body(ARTICLE, **{param: 11})).json()

    assert cut["choices"][0]["message"]["content"] == "The cat sat on the mat. It"
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 8
    assert exact["choices"][0]["message"]["content"] == LEAD
    assert exact["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("stop", "content"),
    [(["purred", "mat"], "The cat sat on the "), ("sat", "The cat "), (["absent"], LEAD)],
)
def test_stop_cuts_before_the_first_stop_string(
    client: httpx.Client, stop: str | list[str], content: str
) -> None:
    data = post(client, chat_body(ARTICLE, stop=stop)).json()

    assert data["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": content, "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[]", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "grok-3", "messages": []}', "messages"),
        (b'{"model": "grok-3", "messages": [{"content": "hi"}]}', "messages[0]"),
        (b'{"model": "grok-3", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (
            b'{"model": "grok-3", "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}',
            "max_tokens",
        ),
        (b'{"model": "grok-3", "messages": [{"role": "user", "content": "a"}], "stop": 3}', "stop"),
    ],
)
def test_invalid_bodies_get_400(client: httpx.Client, body: bytes, param: str | None) -> None:
    response = client.post("/chat/completions", content=body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_unknown_model_gets_404_model_not_found(client: httpx.Client) -> None:
    response = post(client, chat_body(ARTICLE, model="gpt-nope"))

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_models_lists_the_configured_models() -> None:
    with serve_in_thread(SimulatorConfig(models=("a", "b"))) as sim:
        data = httpx.get(f"{sim.base_url}/models").json()

    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["a", "b"]
    assert all(m["object"] == "model" and m["owned_by"] == "xai" for m in data["data"])


def test_extra_models_are_listed_and_answered() -> None:
    with serve_in_thread(SimulatorConfig(models=("a", "b"), extra_models=("b", "my-org/llama"))) as sim:
        listed = httpx.get(f"{sim.base_url}/models").json()
        answer = httpx.post(f"{sim.base_url}/chat/completions", json=chat_body(ARTICLE, model="my-org/llama"))

    assert [m["id"] for m in listed["data"]] == ["a", "b", "my-org/llama"]
    assert answer.status_code == 200
    assert answer.json()["model"] == "my-org/llama"


def test_simulate_offers_the_jobs_own_model(tmp_path: Path) -> None:
    """Issue #10 item 1: --simulate exists so that any job can be tried offline."""
    model = "my-org/llama-3-8b"
    job = write_job(tmp_path, article_rows(5), "https://example.invalid/v1", model=model)

    run = invoke(str(job), "--simulate")
    listed = invoke("models", "--simulate", "--job", str(job))
    estimated = invoke("estimate", str(job), "--sample", "2", "--yes", "--simulate")

    assert run.exit_code == 0, run.output
    assert read_output(job)["status"].to_list() == ["ok"] * 5
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines() == sorted(["grok-3", "grok-4.3", "grok-4.3-mini", model])
    assert estimated.exit_code == 0, estimated.output
    assert invoke("models", "--simulate").output.splitlines() == ["grok-3", "grok-4.3", "grok-4.3-mini"]


def test_api_key_is_checked_on_every_route() -> None:
    with serve_in_thread(SimulatorConfig(api_key="sekret")) as sim:
        url = f"{sim.base_url}/chat/completions"
        missing = httpx.post(url, json=chat_body(ARTICLE))
        wrong = httpx.post(url, json=chat_body(ARTICLE), headers={"Authorization": "Bearer x"})
        right = httpx.post(url, json=chat_body(ARTICLE), headers={"Authorization": "Bearer sekret"})
        models = httpx.get(f"{sim.base_url}/models")

    assert [missing.status_code, wrong.status_code, right.status_code] == [401, 401, 200]
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert models.status_code == 401


@pytest.mark.parametrize("code", [400, 402, 403, 422, 500, 502])
def test_fail_marker_always_answers_that_status(client: httpx.Client, code: int) -> None:
    statuses = [post(client, chat_body(f"{ARTICLE} [[fail:{code}]]")).status_code for _ in range(3)]

    assert statuses == [code] * 3
    assert post(client, chat_body(ARTICLE)).status_code == 200


@pytest.mark.parametrize("code", [429, 503])
def test_429_and_503_carry_retry_after(code: int) -> None:
    with serve_in_thread(SimulatorConfig(retry_after_s=1.5)) as sim:
        response = httpx.post(
            f"{sim.base_url}/chat/completions", json=chat_body(f"[[fail:{code}]] {ARTICLE}")
        )

    assert response.status_code == code
    assert response.headers["retry-after"] == "2"
    assert response.headers["retry-after-ms"] == "1500"
    assert response.json()["error"]["type"] in {"rate_limit_error", "server_error"}


def test_fail_times_counts_per_exact_body_then_answers_without_the_marker(
    sim: RunningSimulator, client: httpx.Client
) -> None:
    row = "[[sleep:1]]The cat sat on the mat. [[fail:500x2]]It purred loudly! Then it left."
    statuses = [post(client, chat_body(row)).status_code for _ in range(2)]
    other_body = post(client, chat_body(row, max_tokens=50))
    final = post(client, chat_body(row))

    assert statuses == [500, 500]
    assert other_body.status_code == 500
    assert final.status_code == 200
    assert final.json()["choices"][0]["message"]["content"] == LEAD
    assert sim.stats.requests == 4
    assert sim.stats.by_status == {500: 3, 200: 1}
    assert sim.stats.ok_by_user_message == {row: 1}


def test_badjson_answers_200_with_a_broken_body(sim: RunningSimulator, client: httpx.Client) -> None:
    row = f"{ARTICLE} [[fail:badjsonx1]]"
    broken, fixed = post(client, chat_body(row)), post(client, chat_body(row))
    streamed = post(client, chat_body(f"{ARTICLE} [[fail:badjson]]", stream=True))

    assert broken.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.content)
    assert fixed.json()["choices"][0]["message"]["content"] == LEAD
    assert streamed.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        [json.loads(event) for event in sse_events(streamed)]
    assert sim.stats.ok_by_user_message == {row: 1}
    assert sim.stats.by_status == {200: 3}


def test_reset_drops_the_connection(sim: RunningSimulator, client: httpx.Client) -> None:
    row = f"{ARTICLE} [[fail:resetx1]]"
    with pytest.raises(httpx.RemoteProtocolError):
        post(client, chat_body(row))
    after = post(client, chat_body(row))

    assert after.json()["choices"][0]["message"]["content"] == LEAD
    assert sim.stats.requests == 2
    assert sim.stats.by_status == {200: 1}


def test_sleep_marker_outlasts_a_client_timeout_and_does_not_delay_shutdown() -> None:
    with serve_in_thread() as sim:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{sim.base_url}/chat/completions",
                json=chat_body(f"[[sleep:30000]]{ARTICLE}"),
                timeout=0.2,
            )
        stopping = time.monotonic()

    assert time.monotonic() - stopping < 2


def test_latency_delays_every_answer() -> None:
    with serve_in_thread(SimulatorConfig(latency_ms=150)) as sim, httpx.Client() as http:
        started = time.monotonic()
        response = http.post(f"{sim.base_url}/chat/completions", json=chat_body(ARTICLE))
        elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert elapsed >= 0.15


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_sends_role_pieces_finish_usage_and_done(client: httpx.Client, include_usage: bool) -> None:
    plain = post(client, chat_body(ARTICLE)).json()
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    response = post(client, chat_body(ARTICLE, stream=True, **options))

    assert response.headers["content-type"] == "text/event-stream"
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {(c["object"], c["model"]) for c in chunks} == {("chat.completion.chunk", "grok-4.3")}
    assert len({c["id"] for c in chunks}) == 1
    usage_chunks = [c for c in chunks if not c["choices"]]
    assert [c["usage"] for c in usage_chunks] == ([plain["usage"]] if include_usage else [])
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[0]["delta"]["role"] == "assistant"
    pieces = [ch["delta"].get("content", "") for ch in choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == LEAD
    assert [ch["finish_reason"] for ch in choices] == [None] * (len(choices) - 1) + ["stop"]
    assert chunks[-1]["choices"] == [] if include_usage else chunks[-1]["choices"][0]["delta"] == {}


# Required fields per OpenAI's API reference (issue #10 item 7). A key maps to None (present,
# any value), to the value it must have, to the fields required inside it, or to [fields] for a
# list whose every item needs them.
Required = dict[str, Any]
COMPLETION: Required = {
    "id": None,
    "object": "chat.completion",
    "created": None,
    "model": None,
    "choices": [
        {
            "index": None,
            "message": {"role": "assistant", "content": None, "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ],
}
CHUNK: Required = {
    "id": None,
    "object": "chat.completion.chunk",
    "created": None,
    "model": None,
    "choices": [{"index": None, "delta": {}, "finish_reason": None}],
}
MODEL_LIST: Required = {
    "object": "list",
    "data": [{"id": None, "object": "model", "created": None, "owned_by": None}],
}
ERROR: Required = {"error": {"message": None, "type": None, "param": None, "code": None}}


def unmet(value: Any, required: Any, where: str = "") -> list[str]:
    """Where `value` lacks a required field or has the wrong fixed value; [] when it conforms."""
    if required is None:
        return []
    if isinstance(required, str):
        return [] if value == required else [f"{where} = {value!r}, not {required!r}"]
    if isinstance(required, list):
        if not isinstance(value, list):
            return [f"{where} is not a list"]
        return [gap for i, item in enumerate(value) for gap in unmet(item, required[0], f"{where}[{i}]")]
    if not isinstance(value, dict):
        return [f"{where} is not an object"]
    gaps = [f"{where}.{key} missing" for key in required if key not in value]
    return gaps + [
        gap
        for key, sub in required.items()
        if key in value
        for gap in unmet(value[key], sub, f"{where}.{key}")
    ]


def test_every_object_sent_has_the_fields_openais_reference_requires() -> None:
    tool = {"type": "function", "function": {"name": "label", "parameters": {"type": "object"}}}
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    bodies = {
        "plain": chat_body(ARTICLE),
        "tool call": chat_body(ARTICLE, tools=[tool]),
        "json schema": chat_body(ARTICLE, response_format=schema),
        "bad output": chat_body(f"{ARTICLE} [[fail:badoutput]]", tools=[tool]),
    }
    streams = {
        f"{name}, streamed": {**body, "stream": True, "stream_options": {"include_usage": True}}
        for name, body in bodies.items()
    }
    with (
        serve_in_thread(SimulatorConfig(api_key="k")) as sim,
        httpx.Client(base_url=sim.base_url, headers={"Authorization": "Bearer k"}, timeout=5) as http,
    ):
        sent = {name: (post(http, body).json(), COMPLETION) for name, body in bodies.items()}
        for name, body in streams.items():
            chunks = [json.loads(event) for event in sse_events(post(http, body))[:-1]]
            sent |= {f"{name} chunk {i}": (chunk, CHUNK) for i, chunk in enumerate(chunks)}
        sent["model list"] = (http.get("/models").json(), MODEL_LIST)
        errors = {
            "400": http.post("/chat/completions", content=b"{not json"),
            "401": httpx.post(f"{sim.base_url}/chat/completions", json=chat_body(ARTICLE)),
            "404 model": post(http, chat_body(ARTICLE, model="gpt-nope")),
            "404 route": http.get("/nowhere"),
            "405": http.get("/chat/completions"),
            "429": post(http, chat_body(f"{ARTICLE} [[fail:429]]")),
            "503": post(http, chat_body(f"{ARTICLE} [[fail:503]]")),
        }
        sent |= {f"error {name}": (response.json(), ERROR) for name, response in errors.items()}

    assert [name for name, response in errors.items() if str(response.status_code) != name[:3]] == []
    assert sent["tool call"][0]["choices"][0]["message"]["tool_calls"]  # the tool-call shape was walked
    assert len([name for name in sent if "streamed chunk" in name]) > 4 * 3
    assert {name: gaps for name, (value, required) in sent.items() if (gaps := unmet(value, required))} == {}


class ManualClock:
    """The simulator's rpm window clock, moved by the test: the window is the subject, not the wall."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rpm_limits_each_one_second_window() -> None:
    clock = ManualClock()
    config = SimulatorConfig(rpm=600, window="fixed", retry_after_s=5, clock=clock)  # 5: injected 429s only
    with serve_in_thread(config) as sim, httpx.Client(base_url=sim.base_url) as http:
        statuses = [post(http, chat_body(ARTICLE)).status_code for _ in range(11)]
        clock.now += 0.25
        limited = post(http, chat_body(ARTICLE))
        clock.now += float(limited.headers["x-ratelimit-reset-requests"].removesuffix("s"))
        after_reset = post(http, chat_body(ARTICLE))

    assert statuses == [200] * 10 + [429]
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert limited.headers["x-ratelimit-reset-requests"] == "0.750s"
    assert limited.headers["retry-after"] == "1"
    assert limited.headers["retry-after-ms"] == "750"
    assert limited.headers["x-ratelimit-limit-requests"] == "600"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert after_reset.status_code == 200
    assert after_reset.headers["x-ratelimit-remaining-requests"] == "9"


@pytest.mark.parametrize(("window", "admitted_late"), [("sliding", 5), ("fixed", 6)])
def test_a_sliding_window_counts_the_last_second_before_each_request(
    window: Literal["sliding", "fixed"], admitted_late: int
) -> None:
    """5 requests, 5 more 0.6 s later, 6 more once the first 5 are over 1 s old: a fixed slice
    has started afresh and admits all 6; a sliding log still holds the second 5."""
    clock = ManualClock()
    config = SimulatorConfig(rpm=600, window=window, clock=clock)  # 10 a second
    with serve_in_thread(config) as sim, httpx.Client(base_url=sim.base_url) as http:
        first = [post(http, chat_body(ARTICLE)).status_code for _ in range(5)]
        clock.now += 0.6
        second = [post(http, chat_body(ARTICLE)).status_code for _ in range(5)]
        clock.now += 0.45
        late = [post(http, chat_body(ARTICLE)) for _ in range(6)]

    assert first + second == [200] * 10
    assert [r.status_code for r in late] == [200] * admitted_late + [429] * (6 - admitted_late)
    if window == "sliding":  # admitted again when the second group leaves the log, 0.55 s on
        assert late[-1].headers["retry-after-ms"] == "550"
        assert late[-2].headers["x-ratelimit-remaining-requests"] == "0"


def test_per_minute_headers_count_the_minute_while_the_second_is_enforced() -> None:
    """OpenAI's headers: what is left of 600 a minute, refilled at 10 a second, and the time until
    it is full again; the 429 comes from the 1 s slice all the same, with plenty said to be left."""
    clock = ManualClock()
    config = SimulatorConfig(rpm=600, headers="per-minute", clock=clock)  # 10 a second
    with serve_in_thread(config) as sim, httpx.Client(base_url=sim.base_url) as http:
        first = [post(http, chat_body(ARTICLE)) for _ in range(11)]
        clock.now += 0.5
        half = post(http, chat_body(ARTICLE))
        clock.now += 0.5
        later = post(http, chat_body(ARTICLE))

    assert [r.status_code for r in first] == [200] * 10 + [429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in first[8:]] == ["591", "590", "590"]
    assert first[9].headers["x-ratelimit-reset-requests"] == "1s"  # 10 used, refilled at 10 a second
    assert first[9].headers["x-ratelimit-limit-requests"] == "600"
    assert first[10].headers["retry-after-ms"] == "1000"  # the second, not the minute
    assert half.status_code == 429  # the minute has 595 left; the sliding second has none
    assert half.headers["x-ratelimit-remaining-requests"] == "595"
    assert half.headers["x-ratelimit-reset-requests"] == "500ms"
    assert later.status_code == 200
    assert later.headers["x-ratelimit-remaining-requests"] == "599"
    assert later.headers["x-ratelimit-reset-requests"] == "100ms"


@pytest.mark.parametrize("headers", ["window", "per-minute"])
def test_tpm_counts_each_answers_tokens_in_the_second(headers: Literal["window", "per-minute"]) -> None:
    """A second's budget of 2.5 answers' tokens admits two; the third is refused for tokens."""
    with serve_in_thread() as sim, httpx.Client(base_url=sim.base_url) as http:
        tokens = post(http, chat_body(ARTICLE)).json()["usage"]["total_tokens"]
    per_s = 2 * tokens + tokens // 2
    clock = ManualClock()
    config = SimulatorConfig(tpm=60 * per_s, headers=headers, clock=clock)
    with serve_in_thread(config) as sim, httpx.Client(base_url=sim.base_url) as http:
        answers = [post(http, chat_body(ARTICLE)) for _ in range(3)]
        clock.now += 1.0
        after = post(http, chat_body(ARTICLE))

    assert [r.status_code for r in answers] == [200, 200, 429]
    assert "tokens per minute" in answers[2].json()["error"]["message"]
    assert "x-ratelimit-remaining-requests" not in answers[2].headers  # no rpm set
    remaining = answers[1].headers["x-ratelimit-remaining-tokens"]
    assert int(remaining) == (60 * per_s - 2 * tokens if headers == "per-minute" else per_s - 2 * tokens)
    assert answers[2].headers["x-ratelimit-limit-tokens"] == str(60 * per_s)
    assert after.status_code == 200
    assert sim.stats.tokens == 3 * tokens


@pytest.mark.parametrize(
    ("seconds", "said"), [(0.0, "0ms"), (0.0121, "13ms"), (8.64, "8.64s"), (360.0, "6m0s"), (61.5, "1m1.5s")]
)
def test_per_minute_resets_are_written_as_openai_writes_them(seconds: float, said: str) -> None:
    assert go_duration(seconds) == said
    budget = server_budget({"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": said})
    assert budget is not None and budget.reset_requests_s == pytest.approx(seconds, abs=0.001)


def run_statuses(config: SimulatorConfig, n: int) -> list[int]:
    with serve_in_thread(config) as sim, httpx.Client(base_url=sim.base_url) as http:
        return [post(http, chat_body(ARTICLE)).status_code for _ in range(n)]


def test_error_rate_is_seeded_and_roughly_that_fraction() -> None:
    config = SimulatorConfig(error_rate=0.3, seed=7)
    statuses = run_statuses(config, 200)

    errors = [s for s in statuses if s != 200]
    assert set(errors) <= {500, 502, 503}
    assert 30 <= len(errors) <= 90
    assert run_statuses(config, 200) == statuses
    assert run_statuses(SimulatorConfig(error_rate=0.3, seed=8), 200) != statuses


def test_openai_sdk_parses_plain_and_streamed_answers(sim: RunningSimulator, client: httpx.Client) -> None:
    raw = post(client, chat_body(ARTICLE, max_tokens=9)).json()
    with OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as openai:
        completion = openai.chat.completions.create(
            model="grok-4.3",
            messages=[
                {"role": "system", "content": "You summarise."},
                {"role": "user", "content": ARTICLE},
            ],
            max_tokens=9,
        )
        stream = openai.chat.completions.create(
            model="grok-4.3",
            messages=[{"role": "user", "content": ARTICLE}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)

    assert completion.id == raw["id"]
    assert completion.choices[0].message.content == raw["choices"][0]["message"]["content"]
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    usage = completion.usage
    assert [usage.prompt_tokens, usage.completion_tokens, usage.total_tokens] == [
        raw["usage"]["prompt_tokens"],
        raw["usage"]["completion_tokens"],
        raw["usage"]["total_tokens"],
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == LEAD
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 11


def test_serve_forever_reports_its_url_and_stops_when_cancelled() -> None:
    async def scenario() -> tuple[int, bool]:
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        server = asyncio.create_task(serve_forever(SimulatorConfig(), "127.0.0.1", 0, ready=ready.set_result))
        await asyncio.wait({ready, server}, return_when=asyncio.FIRST_COMPLETED)
        base_url = ready.result()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base_url}/models") as response:
                status = response.status
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
            try:
                async with session.get(f"{base_url}/models"):
                    pass
            except aiohttp.ClientConnectionError:
                return status, True
            return status, False

    assert asyncio.run(scenario()) == (200, True)


def test_serve_in_thread_stops_on_exit_and_reports_a_busy_port() -> None:
    with serve_in_thread() as sim:
        assert httpx.get(f"{sim.base_url}/models").status_code == 200
        with pytest.raises(OSError), serve_in_thread(port=sim.port):
            pass

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{sim.base_url}/models")


def test_latencies_are_seeded_lognormal_with_the_given_mean() -> None:
    first = list(itertools.islice(latencies(200, 1.0, seed=7), 20_000))
    again = list(itertools.islice(latencies(200, 1.0, seed=7), 20_000))

    assert first == again
    assert statistics.fmean(first) == pytest.approx(0.2, rel=0.05)
    assert max(first) > 5 * 0.2  # a long tail, unlike a fixed delay
    assert list(itertools.islice(latencies(50, 0.0, seed=7), 3)) == [0.05] * 3


def test_stats_count_answers_and_reset_starts_them_afresh() -> None:
    config = SimulatorConfig(latency_ms=5, latency_sigma=1.0)
    with serve_in_thread(config) as sim, httpx.Client(base_url=sim.base_url) as http:
        post(http, chat_body(ARTICLE))
        root = sim.base_url.removesuffix("/v1")
        assert http.get(f"{root}/simulator/stats").json()["by_status"] == {"200": 1}
        assert http.post(f"{root}/simulator/reset").json()["requests"] == 0
        sent_at = time.monotonic()
        post(http, chat_body(ARTICLE))
        answered_at = time.monotonic()
        stats = http.get(f"{root}/simulator/stats").json()

    assert stats["requests"] == 1
    assert stats["span_s"] > 0
    # On the clock every process shares, so another process can time its first request.
    assert sent_at <= stats["first_arrival_monotonic"] <= stats["last_answer_monotonic"] <= answered_at


def raw_exchange(sim: RunningSimulator, sent: bytes) -> bytes:
    """Send raw bytes on one connection; everything the server answers until it closes it."""
    with socket.create_connection((sim.host, sim.port), timeout=5) as conn:
        conn.sendall(sent)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def raw_post(body: bytes, *, last: bool = False) -> bytes:
    close = b"Connection: close\r\n" if last else b""
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s" % (
        close,
        len(body),
        body,
    )


def test_pipelined_requests_are_answered_in_order_even_when_the_first_waits(sim: RunningSimulator) -> None:
    slow, fast = "[[sleep:100]]Slow one. Yes.", "Fast one. Yes."
    bodies = [json.dumps(chat_body(slow)).encode(), json.dumps(chat_body(fast)).encode()]

    received = raw_exchange(sim, raw_post(bodies[0]) + raw_post(bodies[1], last=True))

    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert received.index(b"Slow one.") < received.index(b"Fast one.")
    assert received.count(b"Connection: close") == 1  # the server closed after the request asking it to


def test_chunked_request_body_after_expect_100_continue(sim: RunningSimulator) -> None:
    body = json.dumps(chat_body(ARTICLE)).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
    head += b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    with socket.create_connection((sim.host, sim.port), timeout=5) as conn:
        conn.sendall(head)
        interim = conn.recv(65536)
        conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["choices"][0]["message"]["content"] == LEAD


def test_unknown_route_wrong_method_and_broken_http_get_errors(
    client: httpx.Client, sim: RunningSimulator
) -> None:
    unknown = client.get("/nope")
    wrong_method = client.get("/chat/completions")
    broken = raw_exchange(sim, b"NOT HTTP AT ALL\r\n\r\n")
    upgrade = raw_exchange(
        sim, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    )

    assert [unknown.status_code, wrong_method.status_code] == [404, 405]
    assert unknown.json()["error"]["message"] == "Unknown request URL: GET /v1/nope."
    assert broken.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in broken
    assert upgrade.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert upgrade.endswith(b"Upgrade: h2c is not supported; send plain HTTP/1.1")
