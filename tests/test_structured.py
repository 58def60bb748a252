"""Tool calls, structured output.fields, conversations and the model check, end to end through
the real CLI against the simulator (issue #3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
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
    one_answer = count_tokens("Summarize.") + count_tokens(f"{rows[1]['title']}\n\n{rows[1]['text']}") + 8
    assert out["prompt_tokens"][1] == 2 * one_answer  # both answers were billed
    assert "retries: 1" in result.stderr


@pytest.mark.parametrize("tools", [False, True])
def test_an_answer_that_never_fits_fails_with_the_reason_and_keeps_the_raw_answer(
    tmp_path: Path, simulator: RunningSimulator, tools: bool
) -> None:
    rows = article_rows(3)
    rows[2]["text"] += " [[fail:badoutput]]"
    params = {**PARAMS, "tools": [FACTS_TOOL]} if tools else PARAMS
    fields = FACT_FIELDS if tools else LABEL_FIELDS
    job = write_job(
        tmp_path,
        rows,
        simulator.base_url,
        params=params,
        output=output_spec(fields=fields),
        retry={"max_attempts": 2, "max_parse_attempts": 4, "initial_backoff_s": 0.01},
    )

    result = invoke("run", str(job))

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
        assert failed["content"] == "I would rather answer in prose."
    assert all(failed[name] is None for name in fields)


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
        f"job.yaml:8: model 'grok4.3-mini' not offered by {simulator.base_url}; "
        "did you mean 'grok-4.3-mini'? (to skip this check where a gateway serves models it does not "
        "list: endpoint.check_model: false or --no-check-model)\n"
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
