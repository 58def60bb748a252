"""Tool calls, structured output.fields, conversations and the model check, end to end through
the real CLI against the simulator (issue #3)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from click.testing import Result
from openai import OpenAI

from batchrun.errors import InvalidOutput
from batchrun.job import EnumField
from batchrun.simulator import (
    RunningSimulator,
    SimulatorConfig,
    compose_answer,
    count_tokens,
    serve_in_thread,
)
from batchrun.structured import parse_fields
from tests.conftest import TEST_KEY, TEST_KEY_ENV, article_rows, invoke, read_output, write_job
from tests.stub_server import Reply, Request, StubServer, completion, serve_stub

PARAMS = {"temperature": 0, "max_tokens": 80}
FACTS_TOOL = {
    "type": "function",
    "function": {
        "name": "record_facts",
        "parameters": {
            "type": "object",
            "properties": {
                "place": {"type": "string"},
                "people": {"type": "array", "items": {"type": "string"}},
                "count": {"type": "integer"},
                "disputed": {"type": "boolean"},
            },
            "required": ["place", "people", "count", "disputed"],
        },
    },
}
OTHER_TOOL = {"type": "function", "function": {"name": "do_nothing", "parameters": {"type": "object"}}}
FACT_FIELDS = {"place": "string", "people": "list", "count": "integer", "disputed": "boolean"}
LABEL_FIELDS = {"sentiment": {"enum": ["positive", "neutral", "negative"]}, "score": "number"}


def output_spec(**extra: Any) -> dict[str, Any]:
    return {"path": "out/result.parquet", "include_columns": ["title"], **extra}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_is_recorded_and_tool_choice_passes_through(
    tmp_path: Path, simulator: RunningSimulator, stream: bool
) -> None:
    params = {**PARAMS, "stream": stream, "tools": [OTHER_TOOL, FACTS_TOOL]}
    params["tool_choice"] = {"type": "function", "function": {"name": "record_facts"}}
    job = write_job(tmp_path, article_rows(12), simulator.base_url, params=params)

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.stderr
    out = read_output(job)
    assert set(out["status"]) == {"ok"}
    assert set(out["finish_reason"]) == {"tool_calls"}  # a tool call is a success
    assert out["content"].null_count() == 12
    calls = [json.loads(text) for text in out["tool_calls"]]
    assert all(len(c) == 1 and set(c[0]) == {"id", "name", "arguments"} for c in calls)
    assert {c[0]["name"] for c in calls} == {"record_facts"}  # tool_choice reached the server
    arguments = calls[0][0]["arguments"]
    assert isinstance(arguments["people"], list) and isinstance(arguments["count"], int)
    assert out["completion_tokens"].to_list() == [
        count_tokens(orjson.dumps(c[0]["arguments"]).decode()) for c in calls
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_fields_from_a_tool_call_become_typed_columns(
    tmp_path: Path, simulator: RunningSimulator, stream: bool
) -> None:
    params = {**PARAMS, "stream": stream, "tools": [FACTS_TOOL]}
    job = write_job(
        tmp_path, article_rows(10), simulator.base_url, params=params, output=output_spec(fields=FACT_FIELDS)
    )

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.stderr
    out = read_output(job)
    assert out.schema["place"] == pl.String
    assert out.schema["people"] == pl.List(pl.String)
    assert out.schema["count"] == pl.Int64
    assert out.schema["disputed"] == pl.Boolean
    first = json.loads(out["tool_calls"][0])[0]["arguments"]
    assert out.row(0, named=True) | first == out.row(0, named=True)  # columns hold the call's values
    assert out.columns[:6] == ["id", "title", "place", "people", "count", "disputed"]


def test_fields_from_json_content_with_a_derived_response_format(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = write_job(
        tmp_path, article_rows(30), simulator.base_url, params=PARAMS, output=output_spec(fields=LABEL_FIELDS)
    )

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.stderr
    out = read_output(job)
    # The simulator answers JSON only when sent a json_schema response_format: batchrun sent one.
    assert [json.loads(c) for c in out["content"]] == out.select("sentiment", "score").to_dicts()
    assert set(out["sentiment"]) <= {"positive", "neutral", "negative"}
    assert len(set(out["sentiment"])) > 1
    assert out.schema["score"] == pl.Float64
    assert out["tool_calls"].null_count() == 30


def test_an_answer_that_does_not_fit_is_asked_again_and_both_are_counted(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = article_rows(3)
    rows[1]["text"] += " [[fail:badoutputx1]]"
    job = write_job(
        tmp_path, rows, simulator.base_url, params=PARAMS, output=output_spec(fields=LABEL_FIELDS)
    )

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.stderr
    out = read_output(job)
    assert out["status"].to_list() == ["ok"] * 3
    assert out["attempts"].to_list() == [1, 2, 1]
    assert out["sentiment"].null_count() == 0
    question = count_tokens("Summarize.") + count_tokens(f"{rows[1]['title']}\n\n{rows[1]['text']}") + 8
    prose = "I would rather answer in prose."
    correction = (
        f"Your answer did not fit: the answer is not valid JSON: {prose!r}. "
        "Answer again with only the JSON object."
    )
    reask = question + count_tokens(prose) + 4 + count_tokens(correction) + 4
    assert out["prompt_tokens"][1] == question + reask  # both answers were billed
    assert "retries: 1" in result.stderr


GOOD_LABELS = '{"sentiment": "neutral", "score": 0.5}'
GOOD_FACTS = '{"place": "Paris", "people": ["Ann"], "count": 2, "disputed": false}'
PROSE = "I would rather answer in prose."


def tool_completion(arguments: str, finish_reason: str = "tool_calls", **usage: int) -> dict[str, Any]:
    """A chat.completion whose answer is one call of record_facts, as llama.cpp's server sends it."""
    body = completion("", finish_reason, **usage)
    call = {"id": "call_0", "type": "function", "function": {"name": "record_facts", "arguments": arguments}}
    body["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
    return body


def chat(answer: Callable[[Request], Reply]) -> Callable[[Request], Reply]:
    """A stub handler: `answer` for chat requests; an endpoint without a model list."""
    return lambda request: answer(request) if request.method == "POST" else Reply(404)


def run_on_stub(
    tmp_path: Path,
    answer: Callable[[Request], Reply],
    rows: list[dict[str, Any]],
    fields: dict[str, Any],
    **job: Any,
) -> tuple[StubServer, Path, Result]:
    """`batchrun run` of a job over `rows` with output.fields, against a stub that answers its
    chat requests with `answer`; `job` replaces top-level job keys."""
    with serve_stub(chat(answer)) as stub:
        path = write_job(tmp_path, rows, stub.base_url, output=output_spec(fields=fields), **job)
        return stub, path, invoke("run", str(path))


def question_of(request: Request) -> str:
    """The row's own user message (a re-ask adds messages after it)."""
    return str(request.json()["messages"][1]["content"])


@pytest.mark.parametrize("tools", [False, True])
def test_an_answer_that_never_fits_fails_with_the_reason_and_keeps_the_raw_answer(
    tmp_path: Path, tools: bool
) -> None:
    """A stub that never fits row 2 (the simulator's markers live in the last user message,
    which a re-ask replaces by its correction)."""

    def answer(request: Request) -> Reply:
        never = "[[never]]" in question_of(request)
        if tools:
            return Reply(body=tool_completion('{"unexpected": true}' if never else GOOD_FACTS))
        return Reply(body=completion(PROSE if never else GOOD_LABELS))

    rows = article_rows(3)
    rows[2]["text"] += " [[never]]"
    params = {**PARAMS, "tools": [FACTS_TOOL]} if tools else PARAMS
    fields = FACT_FIELDS if tools else LABEL_FIELDS
    stub, job, result = run_on_stub(
        tmp_path,
        answer,
        rows,
        fields,
        params=params,
        retry={"max_attempts": 2, "max_parse_attempts": 4, "initial_backoff_s": 0.01},
    )

    assert result.exit_code == 1
    assert "failed (invalid_output: 1)" in result.stderr
    failed = read_output(job).row(2, named=True)
    assert failed["status"] == "failed"
    assert failed["error_kind"] == "invalid_output"
    assert failed["attempts"] == 4
    if tools:
        assert failed["error"] == "invalid_output: field 'place' is missing"
        assert json.loads(failed["tool_calls"])[0]["arguments"] == {"unexpected": True}
    else:
        assert failed["error"].startswith("invalid_output: the answer is not valid JSON")
        assert failed["content"] == PROSE
    assert all(failed[name] is None for name in fields)
    asked = [r.json()["messages"] for r in stub.chat_requests() if "[[never]]" in question_of(r)]
    assert len(asked) == 4
    assert all(m[:2] == asked[0] for m in asked)  # the same question each time...
    if tools:  # ...then the call, its tool answer and the correction; only the last answer's
        call = tool_completion('{"unexpected": true}')["choices"][0]["message"]["tool_calls"]
        correction = [
            {"role": "assistant", "content": None, "tool_calls": call},
            {
                "role": "tool",
                "tool_call_id": "call_0",
                "content": "Not run: the arguments did not fit: field 'place' is missing.",
            },
            {"role": "user", "content": "Call the tool again with arguments that fit."},
        ]
    else:
        correction = [
            {"role": "assistant", "content": PROSE},
            {
                "role": "user",
                "content": f"Your answer did not fit: the answer is not valid JSON: {PROSE!r}. "
                "Answer again with only the JSON object.",
            },
        ]
    assert [m[2:] for m in asked] == [[], correction, correction, correction]


@pytest.mark.parametrize("tools", [False, True])
def test_an_answer_cut_at_max_tokens_says_raise_max_tokens(tmp_path: Path, tools: bool) -> None:
    """llama.cpp's server ends a call cut at max_tokens with finish_reason tool_calls; the
    content answer is cut with finish_reason length."""

    def answer(request: Request) -> Reply:
        if tools:
            cut = tool_completion('{"place": "Par', "tool_calls", completion_tokens=80)
        else:
            cut = completion('{"sentiment": "neu', "length", completion_tokens=80)
        return Reply(body=cut)

    params = {**PARAMS, "tools": [FACTS_TOOL]} if tools else PARAMS
    stub, job, result = run_on_stub(
        tmp_path,
        answer,
        article_rows(1),
        FACT_FIELDS if tools else LABEL_FIELDS,
        params=params,
        retry={"max_parse_attempts": 2},
    )

    assert result.exit_code == 1
    failed = read_output(job).row(0, named=True)
    assert (
        failed["error"]
        == "invalid_output: the answer was cut at params.max_tokens (80); raise params.max_tokens"
    )
    reask = stub.chat_requests()[1].json()["messages"][-2 if tools else -1]["content"]  # a tool's says why
    assert "it was cut off at the length limit; answer more briefly" in reask


def llama_cpp_conversation_error(messages: list[dict[str, Any]]) -> str | None:
    """What llama.cpp's server says (HTTP 500) of a conversation that breaks the tool protocol:
    an assistant message whose tool_calls, each {id, type: function, function: {name,
    arguments}}, are not followed by one tool message per call id; None when it follows it."""
    for at, message in enumerate(messages):
        calls = message.get("tool_calls") or []
        if message["role"] != "assistant" or not calls:
            continue
        ids = [call.get("id") for call in calls]
        shaped = all(
            isinstance(call.get("id"), str)
            and call["id"]
            and call.get("type") == "function"
            and isinstance(call["function"].get("name"), str)
            and isinstance(call["function"].get("arguments"), str)
            for call in calls
        )
        if not shaped:
            return "tool_calls: each needs an id, type function and string arguments"
        after = messages[at + 1 : at + 1 + len(calls)]
        answered = sorted(m.get("tool_call_id") for m in after if m["role"] == "tool")
        if len(after) != len(calls) or answered != sorted(ids):
            return "an assistant message with tool_calls must be followed by a tool message per call id"
    return None


def unnamed_calls(arguments: list[str], stream: bool) -> Reply:
    """An answer of record_facts calls without ids, whole or streamed, as some servers send them."""
    calls = [{"type": "function", "function": {"name": "record_facts", "arguments": a}} for a in arguments]
    if not stream:
        body = completion("", "tool_calls")
        body["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
        return Reply(body=body)
    chunks = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": i, **c}]}, "finish_reason": None}]}
        for i, c in enumerate(calls)
    ]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    events = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return Reply(body=events, headers={"content-type": "text/event-stream"})


@pytest.mark.parametrize("stream", [False, True])
def test_a_reask_after_tool_calls_answers_each_call_with_a_tool_message(tmp_path: Path, stream: bool) -> None:
    """#20 item 11: jobs/extract.yaml's forced tool_choice against llama.cpp's server. The first
    answer makes two calls without ids, the first with arguments that do not fit; the re-ask
    must quote both calls with made-up ids and answer each with a tool message, or the server
    answers HTTP 500 to every re-ask."""

    def answer(request: Request) -> Reply:
        messages = request.json()["messages"]
        if (wrong := llama_cpp_conversation_error(messages)) is not None:
            return Reply(500, {"error": {"code": 500, "message": wrong, "type": "server_error"}})
        if len(messages) == 2:  # the question alone
            return unnamed_calls(['{"place": "Paris"}', GOOD_FACTS], stream)
        return unnamed_calls([GOOD_FACTS], stream)

    params = {
        **PARAMS,
        "stream": stream,
        "tools": [FACTS_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "record_facts"}},
    }
    stub, job, result = run_on_stub(
        tmp_path,
        answer,
        article_rows(3),
        FACT_FIELDS,
        params=params,
        retry={"max_attempts": 2, "initial_backoff_s": 0.01},
    )

    assert result.exit_code == 0, result.stderr
    out = read_output(job)
    assert out["status"].to_list() == ["ok"] * 3
    assert out["place"].to_list() == ["Paris"] * 3
    reask = next(r.json()["messages"][2:] for r in stub.chat_requests() if len(r.json()["messages"]) > 2)
    assert [m["role"] for m in reask] == ["assistant", "tool", "tool", "user"]
    assert [c["id"] for c in reask[0]["tool_calls"]] == ["call_0", "call_1"]
    assert [m["tool_call_id"] for m in reask[1:3]] == ["call_0", "call_1"]
    assert "field 'people' is missing" in reask[1]["content"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '{"n": 3, "tags": ["a"], "ok": true, "mood": "up"}',
            {"n": 3, "tags": ["a"], "ok": True, "mood": "up"},
        ),
        ('Sure:\n```json\n{"n": 3.0, "tags": [], "ok": false, "mood": "down"}\n```\nDone.', None),
        ('```\n{"n": 1, "tags": ["x", "y"], "ok": true, "mood": "up", "extra": 1}\n```', None),
    ],
)
def test_fields_parse_from_plain_or_fenced_json(content: str, expected: dict[str, Any] | None) -> None:
    fields = {"n": "integer", "tags": "list", "ok": "boolean", "mood": EnumField(enum=("up", "down"))}

    parsed = parse_fields(fields, content, None)

    assert set(parsed) == set(fields)
    assert type(parsed["n"]) is int
    if expected is not None:
        assert parsed == expected


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "the answer was empty"),
        ("no json here", "the answer is not valid JSON"),
        ("[1, 2]", "expected a JSON object with the fields, got list"),
        ('{"n": "3", "mood": "up"}', "field 'n' is '3', not a integer"),
        ('{"n": true, "mood": "up"}', "field 'n' is True, not a integer"),
        ('{"n": 2, "mood": "sideways"}', "field 'mood' is 'sideways', not one of up, down"),
        ('{"mood": "up"}', "field 'n' is missing"),
    ],
)
def test_fields_that_do_not_fit_say_why(content: str, reason: str) -> None:
    fields = {"n": "integer", "mood": EnumField(enum=("up", "down"))}

    with pytest.raises(InvalidOutput, match=r"^invalid_output: ") as caught:
        parse_fields(fields, content, None)

    assert reason in str(caught.value)


def test_list_fields_are_json_text_in_csv_output(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(
        tmp_path,
        article_rows(4),
        simulator.base_url,
        params={**PARAMS, "tools": [FACTS_TOOL]},
        output={"path": "out/result.csv", "fields": FACT_FIELDS},
    )

    assert invoke("run", str(job)).exit_code == 0

    out = pl.read_csv(tmp_path / "out" / "result.csv")
    assert all(isinstance(json.loads(v), list) for v in out["people"])


def test_messages_templates_send_the_whole_conversation(tmp_path: Path, simulator: RunningSimulator) -> None:
    messages = [
        {"role": "system", "content": "Label {title}."},
        {"role": "user", "content": "An example story. It ends well."},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "{text}"},
    ]
    rows = article_rows(5)
    job = write_job(tmp_path, rows, simulator.base_url, prompt={"messages": messages})

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.stderr
    out = read_output(job)
    for row, answer, prompt_tokens in zip(rows, out["content"], out["prompt_tokens"], strict=True):
        sent = [m["content"].format(**row) for m in messages]
        assert answer == compose_answer(sent[-1], 40, [])[0]  # the last user message is answered
        assert prompt_tokens == sum(count_tokens(text) + 4 for text in sent)  # all four were sent


@pytest.mark.parametrize("table", ["csv", "jsonl"])
def test_messages_column_holds_each_rows_conversation(
    tmp_path: Path, simulator: RunningSimulator, table: str
) -> None:
    conversations = [
        [
            {"role": "user", "content": f"Question {i}. Be brief."},
            {"role": "assistant", "content": "OK."},
            {"role": "user", "content": f"Now answer {i}. Thanks."},
        ]
        for i in range(6)
    ]
    frame = pl.DataFrame({"id": range(6), "title": [f"t{i}" for i in range(6)]})
    if table == "csv":  # JSON text in a column
        frame = frame.with_columns(chat=pl.Series([json.dumps(c) for c in conversations]))
        frame.write_csv(tmp_path / "chats.csv")
    else:  # a native list of {role, content} objects
        frame.with_columns(chat=pl.Series(conversations)).write_ndjson(tmp_path / "chats.jsonl")
    job = write_job(
        tmp_path,
        article_rows(1),
        simulator.base_url,
        input={"path": f"chats.{table}", "id_column": "id", "messages_column": "chat"},
        prompt={"system": "You are terse."},
    )

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.stderr
    out = read_output(job)
    assert out["content"].to_list() == [f"Now answer {i}. Thanks." for i in range(6)]
    texts = [["You are terse."] + [m["content"] for m in c] for c in conversations]
    assert out["prompt_tokens"].to_list() == [sum(count_tokens(t) + 4 for t in ts) for ts in texts]


def test_models_lists_the_endpoint_models_and_validate_checks_the_job_model(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    good = write_job(tmp_path, article_rows(2), simulator.base_url)
    listed = invoke("models", "--job", str(good))
    assert listed.exit_code == 0, listed.stderr
    assert listed.stdout.split() == ["grok-3", "grok-4.3", "grok-4.3-mini"]
    assert invoke("validate", str(good)).stderr.startswith("ok: ")

    typo = write_job(tmp_path, article_rows(2), simulator.base_url, model="grok4.3-mini")
    result = invoke("validate", str(typo))

    assert result.exit_code == 2
    assert result.stderr.endswith(
        f"job.yaml:8: model 'grok4.3-mini' not offered by {simulator.base_url} "
        "(did you mean 'grok-4.3-mini'?); pass --no-check-model to skip this check "
        "(endpoint.check_model: false in the job), as for a gateway that serves models it does not list\n"
    )
    assert simulator.stats.requests == 0


def test_validate_without_a_key_skips_the_model_check(
    tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TEST_KEY_ENV)
    job = write_job(tmp_path, article_rows(2), simulator.base_url, model="no-such-model")

    result = invoke("validate", str(job))

    assert result.exit_code == 0
    assert result.stderr.startswith(f"note: {TEST_KEY_ENV} is not set; model name not checked\nok: ")


def test_an_endpoint_that_lists_no_models_is_not_checked(tmp_path: Path) -> None:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, models=())) as sim:
        job = write_job(tmp_path, article_rows(2), sim.base_url, model="grok-4.3")
        result = invoke("validate", str(job))

    assert result.exit_code == 0, result.stderr
    assert "model name not checked" in result.stderr


def test_openai_sdk_reads_the_simulators_tool_calls_like_batchrun(tmp_path: Path) -> None:
    rows = article_rows(1)
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        plain_dir, streamed_dir = tmp_path / "plain", tmp_path / "streamed"
        for folder, stream in ((plain_dir, False), (streamed_dir, True)):
            folder.mkdir()
            job = write_job(
                folder, rows, sim.base_url, params={**PARAMS, "stream": stream, "tools": [FACTS_TOOL]}
            )
            assert invoke("run", str(job)).exit_code == 0
        with OpenAI(base_url=sim.base_url, api_key=TEST_KEY, max_retries=0) as openai:
            messages: Any = [
                {"role": "system", "content": "Summarize."},
                {"role": "user", "content": f"{rows[0]['title']}\n\n{rows[0]['text']}"},
            ]
            completion = openai.chat.completions.create(
                model="grok-4.3",
                messages=messages,
                tools=[FACTS_TOOL],
                **PARAMS,  # type: ignore[list-item]
            )
            chunks = list(
                openai.chat.completions.create(
                    model="grok-4.3",
                    messages=messages,
                    tools=[FACTS_TOOL],  # type: ignore[list-item]
                    stream=True,
                    stream_options={"include_usage": True},
                    **PARAMS,
                )
            )

    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    streamed_arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""  # type: ignore[index, union-attr]
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    )
    for folder in (plain_dir, streamed_dir):
        out = read_output(folder / "job.yaml")
        ours = json.loads(out["tool_calls"][0])[0]
        assert ours["name"] == call.function.name == "record_facts"  # type: ignore[union-attr]
        assert ours["arguments"] == json.loads(call.function.arguments)  # type: ignore[union-attr]
        assert ours["arguments"] == json.loads(streamed_arguments)
        assert out["completion_tokens"][0] == completion.usage.completion_tokens  # type: ignore[union-attr]
        assert out["completion_tokens"][0] == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("job", "types"),
    [
        ("classify", {"sentiment": pl.String, "topic": pl.String, "confident": pl.Boolean}),
        ("extract", {"place": pl.String, "people": pl.List(pl.String), "amount_millions": pl.Float64}),
    ],
)
def test_sample_jobs_give_typed_columns_offline(tmp_path: Path, job: str, types: dict[str, Any]) -> None:
    output = tmp_path / f"{job}.parquet"
    job_file = Path(__file__).parent.parent / "jobs" / f"{job}.yaml"

    result = invoke("run", str(job_file), "--simulate", "--limit", "25", "--output", str(output))

    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(output)
    assert out.height == 25 and set(out["status"]) == {"ok"}
    for name, dtype in types.items():
        assert out.schema[name] == dtype
        assert out[name].null_count() == 0


# llama.cpp's server (llama-cpp-python 0.3.36) on a json_schema response_format, verbatim.
LLAMA_CPP_500 = Reply(
    500,
    {"error": {"code": 500, "message": "Input should be 'text' or 'json_object'", "type": "server_error"}},
)


def sent_format(request: Request) -> str | None:
    response_format = request.json().get("response_format")
    return None if response_format is None else str(response_format["type"])


@pytest.mark.parametrize(
    ("refused", "kept", "concurrency"),
    [
        ({"json_schema"}, "json_object", 4),
        ({"json_schema", "json_object"}, None, 4),
        # More refusals in flight at once than the every-row-fails-alike check's 20: those the
        # fallback cures must not count towards stopping the job.
        ({"json_schema"}, "json_object", 32),
    ],
)
def test_a_response_format_the_endpoint_refuses_is_dropped_for_the_job(
    tmp_path: Path, refused: set[str], kept: str | None, concurrency: int
) -> None:
    """llama.cpp's server answers the json_schema format batchrun adds with a 500; batchrun
    falls back to JSON mode (and, when that is refused too, to none) with one warning a step."""

    def answer(request: Request) -> Reply:
        return LLAMA_CPP_500 if sent_format(request) in refused else Reply(body=completion(GOOD_LABELS))

    rows = max(20, 2 * concurrency)
    stub, job, result = run_on_stub(
        tmp_path,
        answer,
        article_rows(rows),
        LABEL_FIELDS,
        params=PARAMS,
        concurrency=concurrency,
        retry={"max_attempts": 6, "initial_backoff_s": 0.01, "max_backoff_s": 0.05},
    )

    assert result.exit_code == 0, result.stderr
    out = read_output(job)
    assert set(out["status"]) == {"ok"}
    assert out.select("sentiment", "score").unique().to_dicts() == [json.loads(GOOD_LABELS)]
    sent = [sent_format(r) for r in stub.chat_requests()]
    assert sent.count(kept) == rows  # every row answered once, with the format that is kept
    # The requests that met a refusal: those in flight before the fallback was known, each
    # sent once more, plus the probes; nowhere near rows x max_attempts.
    steps_refused = 1 if kept else 3  # json_schema; or it and JSON mode with and without the schema
    assert len(sent) <= rows + (1 + steps_refused) * concurrency
    warnings = [line for line in result.stderr.splitlines() if "refused the response_format" in line]
    assert len(warnings) == 1
    instead = (
        """response_format {"type":"json_object"} with the fields' schema""" if kept else "no response_format"
    )
    assert warnings[0] == (
        "warning: the endpoint refused the response_format batchrun adds for output.fields (http_500: "
        f"HTTP 500: Input should be 'text' or 'json_object'); sending {instead} instead for the rest of "
        "the job (the fields are still read from each answer and checked)"
    )


def llama_cpp_formats(request: Request) -> Reply:
    """llama.cpp's server: json_schema refused (HTTP 500); JSON mode kept to the schema sent
    with it, and without one a JSON object of the model's own choosing."""
    response_format = request.json().get("response_format") or {}
    if response_format.get("type") == "json_schema":
        return LLAMA_CPP_500
    return Reply(body=completion(GOOD_LABELS if "schema" in response_format else '{"label": "neutral"}'))


def test_json_mode_with_the_schema_comes_before_plain_json_mode_and_the_next_run_starts_there(
    tmp_path: Path,
) -> None:
    """#20 item 12: plain JSON mode lost the schema (no row had the fields); llama.cpp's server
    takes {"type": "json_object", "schema": ...}. A later run of the job against the same
    endpoint starts from the form it took, paying no refusal again."""
    with serve_stub(chat(llama_cpp_formats)) as stub:
        job = write_job(
            tmp_path,
            article_rows(6),
            stub.base_url,
            params=PARAMS,
            output=output_spec(fields=LABEL_FIELDS),
            concurrency=1,
        )
        first = invoke("run", str(job), "--limit", "3")
        sent_first = len(stub.chat_requests())
        second = invoke("run", str(job))

    assert first.exit_code == 0, first.stderr
    assert second.exit_code == 0, second.stderr
    out = read_output(job)
    assert out["status"].to_list() == ["ok"] * 6
    assert out.select("sentiment", "score").unique().to_dicts() == [json.loads(GOOD_LABELS)]
    formats = [r.json().get("response_format") for r in stub.chat_requests()]
    assert formats[0]["type"] == "json_schema"  # refused: the same schema in JSON mode, then kept
    with_schema = {"type": "json_object", "schema": formats[0]["json_schema"]["schema"]}
    assert formats[1:sent_first] == [with_schema] * 3
    assert formats[sent_first:] == [with_schema] * 3
    assert "refused the response_format" not in second.stderr
    assert (
        """note: sending response_format {"type":"json_object"} with the fields' schema for output.fields, """
        "as this endpoint took in an earlier run" in second.stderr
    )


def test_the_jobs_own_response_format_is_never_dropped(tmp_path: Path) -> None:
    own = {"type": "json_schema", "json_schema": {"name": "mine", "schema": {"type": "object"}}}
    stub, job, result = run_on_stub(
        tmp_path,
        lambda request: LLAMA_CPP_500,
        article_rows(2),
        LABEL_FIELDS,
        params={**PARAMS, "response_format": own},
        concurrency=1,
        retry={"max_attempts": 2, "initial_backoff_s": 0.01},
    )

    assert result.exit_code == 1
    assert set(read_output(job)["error_kind"]) == {"http_500"}
    assert [r.json()["response_format"] for r in stub.chat_requests()] == [own] * 4
    assert "refused the response_format" not in result.stderr


def test_a_refusal_that_is_not_the_formats_costs_a_bounded_number_of_probes(tmp_path: Path) -> None:
    """Rows refused without any response_format too keep the format; after three such rows
    batchrun stops suspecting it, so each later one costs one request, not three."""
    too_long = Reply(400, {"error": {"message": "the prompt is too long", "type": "invalid_request_error"}})

    def answer(request: Request) -> Reply:
        return too_long if "[[long]]" in question_of(request) else Reply(body=completion(GOOD_LABELS))

    rows = article_rows(8)
    for row in rows[:6]:
        row["text"] += " [[long]]"
    stub, job, result = run_on_stub(tmp_path, answer, rows, LABEL_FIELDS, params=PARAMS, concurrency=1)

    assert result.exit_code == 1
    assert read_output(job)["status"].to_list() == ["failed"] * 6 + ["ok"] * 2
    assert set(read_output(job)["error"][:6]) == {"http_400: HTTP 400: the prompt is too long"}
    sent = [sent_format(r) for r in stub.chat_requests()]
    assert sent == ["json_schema", "json_object", "json_object", None] * 3 + ["json_schema"] * 5
    assert "refused the response_format" not in result.stderr
