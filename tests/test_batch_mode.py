"""Provider batch mode: the simulator's Batch API (checked with the openai SDK, whose models are
OpenAI's shapes), and jobs run through it end to end against the simulator on loopback."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
import yaml
from openai import BadRequestError, NotFoundError, OpenAI

from batchrun.cost import batch_price, job_price
from batchrun.job import JobSpec, job_from_mapping, load_job
from batchrun.ledger import custom_id
from batchrun.plan import prepare
from batchrun.simulator import RunningSimulator, SimulatorConfig, serve_in_thread
from tests.conftest import (
    TEST_KEY,
    TEST_KEY_ENV,
    article_rows,
    checkpoint_path,
    invoke,
    read_output,
    write_job,
)
from tests.test_faults import StderrLines, child


def chat_line(custom_id: str, user: str, model: str = "grok-4.3") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": user}], "max_tokens": 40}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[dict[str, Any]]) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())


@pytest.fixture
def batch_sim() -> Iterator[RunningSimulator]:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        yield sim


@pytest.fixture
def sdk(batch_sim: RunningSimulator) -> Iterator[OpenAI]:
    with OpenAI(base_url=batch_sim.base_url, api_key=TEST_KEY, max_retries=0) as client:
        yield client


def until(sdk: OpenAI, batch_id: str, *statuses: str) -> Any:
    """Poll a batch until its status is one of `statuses` (the simulator's time is short)."""
    deadline = time.monotonic() + 10
    while (batch := sdk.batches.retrieve(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, f"batch stayed {batch.status}"
    return batch


def submit(sdk: OpenAI, lines: list[dict[str, Any]]) -> Any:
    uploaded = sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def result_lines(sdk: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    text = sdk.files.content(file_id).text
    return {line["custom_id"]: line for line in map(json.loads, text.splitlines())}


def test_simulator_batch_answers_each_line_as_the_chat_endpoint_does(
    sdk: OpenAI, batch_sim: RunningSimulator
) -> None:
    lines = [
        chat_line("a", "First sentence. Second one. Third."),
        chat_line("b", "Fails once. [[fail:500x1]]"),
        chat_line("c", "Bad request. [[fail:400]]"),
    ]
    created = submit(sdk, lines)
    assert created.status == "validating"
    done = until(sdk, created.id, "completed")

    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 1, 2)
    output, errors = result_lines(sdk, done.output_file_id), result_lines(sdk, done.error_file_id)
    online = sdk.chat.completions.create(**lines[0]["body"])
    answer = output["a"]["response"]
    assert answer["status_code"] == 200
    assert answer["body"]["choices"][0]["message"]["content"] == online.choices[0].message.content
    assert answer["body"]["usage"]["prompt_tokens"] == online.usage.prompt_tokens
    assert {k: v["response"]["status_code"] for k, v in errors.items()} == {"b": 500, "c": 400}
    assert errors["c"]["response"]["body"]["error"]["message"] == "Simulated HTTP 400 error."
    assert batch_sim.stats.batch_lines == 3 and batch_sim.stats.uploads == 1

    again = until(sdk, submit(sdk, [lines[1]]).id, "completed")  # [[fail:500x1]] is spent
    assert result_lines(sdk, again.output_file_id)["b"]["response"]["status_code"] == 200
    for file_id in (done.input_file_id, done.output_file_id):
        assert file_id is not None and sdk.files.delete(file_id).deleted
    with pytest.raises(NotFoundError):
        sdk.files.content(done.input_file_id)


def test_simulator_batch_takes_its_time_and_passes_through_every_status() -> None:
    with (
        serve_in_thread(SimulatorConfig(batch_s=0.3)) as sim,
        OpenAI(base_url=sim.base_url, api_key="k") as sdk,
    ):
        created = submit(sdk, [chat_line(str(i), f"Row {i}.") for i in range(30)])
        seen = [created.status]
        while seen[-1] != "completed":
            batch = sdk.batches.retrieve(created.id)
            assert batch.request_counts is not None
            if batch.status != seen[-1]:
                seen.append(batch.status)
            assert batch.request_counts.completed <= 30
        assert seen == ["validating", "in_progress", "finalizing", "completed"]
        assert [b.id for b in sdk.batches.list().data] == [created.id]


def test_simulator_batch_cancel_keeps_what_was_answered() -> None:
    with (
        serve_in_thread(SimulatorConfig(batch_s=60)) as sim,
        OpenAI(base_url=sim.base_url, api_key="k") as slow,
    ):
        created = submit(slow, [chat_line(str(i), f"Row {i}.") for i in range(5)])
        assert slow.batches.cancel(created.id).status == "cancelling"
        cancelled = until(slow, created.id, "cancelled")
        assert cancelled.output_file_id is None and cancelled.request_counts is not None
        assert cancelled.request_counts.completed == 0
        with pytest.raises(Exception, match="409"):
            slow.batches.cancel(created.id)


def test_simulator_batch_expiry_and_validation_failure(sdk: OpenAI) -> None:
    expiring = [chat_line("a", "Answered."), chat_line("b", "Too late. [[batch:expirex1]]")]
    expired = until(sdk, submit(sdk, expiring).id, "expired")
    errors = result_lines(sdk, expired.error_file_id)
    assert errors["b"]["error"]["code"] == "batch_expired" and errors["b"]["response"] is None
    assert set(result_lines(sdk, expired.output_file_id)) == {"a"}
    assert until(sdk, submit(sdk, expiring[1:]).id, "completed", "expired").status == "completed"

    mixed = [chat_line("a", "One."), chat_line("b", "Two.", model="grok-3"), chat_line("a", "Dup.")]
    failed = until(sdk, submit(sdk, mixed).id, "failed")
    assert failed.errors is not None and failed.errors.data is not None
    assert [(e.code, e.line) for e in failed.errors.data] == [
        ("invalid_custom_id", 3),
        ("mismatched_model", None),
    ]
    with pytest.raises(BadRequestError, match="completion_window"):
        window: Any = "1h"
        sdk.batches.create(
            input_file_id=failed.input_file_id, endpoint="/v1/chat/completions", completion_window=window
        )


def test_simulator_without_a_batch_api_answers_404() -> None:
    with (
        serve_in_thread(SimulatorConfig(batch_api="none")) as sim,
        OpenAI(base_url=sim.base_url, api_key="k") as sdk,
        pytest.raises(NotFoundError),
    ):
        sdk.batches.list()


# Jobs in batch mode, end to end; those marked `protocol` in both protocols, the endpoint's found by
# endpoint.batch_api's default, auto.

FIRST_BATCH = {"openai": "batch_sim00000001", "xai": "batch_xsim00000001"}


@pytest.fixture(params=["openai", "xai"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def any_sim(protocol: str) -> Iterator[RunningSimulator]:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, batch_api=protocol)) as sim:  # type: ignore[arg-type]
        yield sim


def serve(protocol: str, **config: Any) -> contextlib.AbstractContextManager[RunningSimulator]:
    return serve_in_thread(SimulatorConfig(api_key=TEST_KEY, batch_api=protocol, **config))


def sent(sim: RunningSimulator, protocol: str) -> int:
    """Files uploaded (OpenAI's protocol) or calls adding requests (xAI's)."""
    return sim.stats.uploads if protocol == "openai" else sim.stats.batch_adds


def batch_job(tmp_path: Path, sim: RunningSimulator, rows: list[dict[str, Any]], **overrides: Any) -> Path:
    """A job over `rows` against `sim`, looking at its batches every 20 ms."""
    return write_job(tmp_path, rows, sim.base_url, **{"batches": {"poll_s": 0.02}, **overrides})


def first_request(job: Path) -> dict[str, Any]:
    return prepare(load_job(job), write=False).first_request()


def sql(job: Path, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(checkpoint_path(job)) as db:
        return db.execute(query).fetchall()


def test_batch_submits_waits_and_collects_every_row(
    tmp_path: Path, any_sim: RunningSimulator, protocol: str
) -> None:
    rows = article_rows(12)
    job = batch_job(tmp_path, any_sim, rows)

    result = invoke(str(job), "--batch")

    assert result.exit_code == 0, result.output
    assert f"submitted batch {FIRST_BATCH[protocol]}: 12 rows" in result.output
    out = read_output(job).sort("id")
    assert out["status"].to_list() == ["ok"] * 12
    assert out["content"][0] == "Story 0 Lead sentence of story 0. A second sentence follows."
    assert any_sim.stats.requests == 0  # no chat request: every row went in the batch
    assert any_sim.stats.batch_lines == 12 and sent(any_sim, protocol) == 1
    assert sql(job, "SELECT api, state, lines FROM batches") == [(protocol, "collected", 12)]
    assert sql(job, "SELECT driver, outcome FROM runs") == [("batch", "finished")]
    assert invoke(str(job), "--batch").output.count("submitted") == 0  # nothing left to do


def test_no_wait_leaves_the_batch_running_and_a_rerun_reattaches_and_collects(
    tmp_path: Path, protocol: str
) -> None:
    rows = article_rows(10)
    with serve(protocol, batch_s=0.2) as sim:
        job = batch_job(tmp_path, sim, rows)

        submitted = invoke(str(job), "--batch", "--no-wait")
        assert submitted.exit_code == 1, submitted.output
        assert "1 batch(es) of 10 rows still at the provider" in submitted.output
        assert read_output(job)["status"].to_list() == ["pending"] * 10
        status = invoke("status", str(job)).output
        assert f"batch {FIRST_BATCH[protocol]}: validating, 0 of 10 rows done (as last seen)" in status
        assert f"to collect them: batchrun {job} --batch" in status

        online = invoke(str(job))
        assert online.exit_code == 2
        assert online.output == (
            "Error: 1 provider batch(es) of this job (10 rows) are still live at the provider; collect "
            "them first, or cancel them; pass --batch to collect them\n"
        )

        collected = invoke(str(job), "--batch")
        assert collected.exit_code == 0, collected.output
        assert "reattached to 1 batch(es) of 10 rows submitted earlier" in collected.output
        assert read_output(job)["status"].to_list() == ["ok"] * 10
        assert sent(sim, protocol) == 1 and sim.stats.batch_lines == 10 and sim.stats.requests == 0
        assert "batch " not in invoke("status", str(job)).output


def test_one_checkpoint_serves_online_and_batch_rows(tmp_path: Path, any_sim: RunningSimulator) -> None:
    rows = article_rows(12)
    job = batch_job(tmp_path, any_sim, rows)

    assert invoke(str(job), "--limit", "5").exit_code == 0  # rows 0-4 online
    assert any_sim.stats.requests == 5
    assert invoke(str(job), "--batch").exit_code == 0  # the other 7 in a batch
    assert any_sim.stats.batch_lines == 7
    online_again = invoke(str(job))  # every row done, however it was answered
    assert online_again.exit_code == 0 and any_sim.stats.requests == 5

    out = read_output(job).sort("id")
    assert out["status"].to_list() == ["ok"] * 12
    by_mode = sql(job, "SELECT b.state, COUNT(*) FROM batch_rows r JOIN batches b USING (submission)")
    assert by_mode == [("collected", 7)]
    # An answer is the same whichever way its request went.
    assert out["content"][5] == "Story 5 Lead sentence of story 5. A second sentence follows."
    assert out["prompt_tokens"][0] == out["prompt_tokens"][5]


def test_failed_and_expired_lines_go_back_to_pending_and_are_resubmitted_alone(
    tmp_path: Path, any_sim: RunningSimulator, protocol: str
) -> None:
    rows = article_rows(8)
    rows[1]["text"] += " [[fail:500x1]]"
    rows[2]["text"] += " [[fail:400]]"
    rows[3]["text"] += " [[batch:expirex1]]"
    rows[4]["text"] += " [[fail:resetx1]]"
    job = batch_job(tmp_path, any_sim, rows)
    # a dropped line: OpenAI's error line says server_error; xAI's gRPC UNAVAILABLE reads as a 503
    kinds = "batch_expired: 1, http_500: 1, " + ("server_error: 1" if protocol == "openai" else "http_503: 1")

    first = invoke(str(job), "--batch")
    assert first.exit_code == 1, first.output
    assert f"batch {FIRST_BATCH[protocol]} expired: 3 rows back to pending ({kinds})" in first.output
    out = read_output(job).sort("id")
    assert out["status"].to_list() == ["ok", "pending", "failed", "pending", "pending", "ok", "ok", "ok"]
    assert out["error_kind"][2] == "http_400"
    status = invoke("status", str(job)).output
    assert f"pending: 3 (back from batches: {kinds})" in status

    second = invoke(str(job), "--batch")
    assert second.exit_code == 1  # the 400 stays failed
    assert sent(any_sim, protocol) == 2 and any_sim.stats.batch_lines == 7 + 3
    assert sql(job, "SELECT lines FROM batches ORDER BY submission") == [(8,), (3,)]
    out = read_output(job).sort("id")
    assert out["status"].to_list() == ["ok", "ok", "failed", "ok", "ok", "ok", "ok", "ok"]
    assert out["attempts"].to_list() == [1, 2, 1, 1, 2, 1, 1, 1]  # an expiry is not the row's attempt


def test_cancel_puts_unanswered_rows_back_to_pending(tmp_path: Path, protocol: str) -> None:
    with serve(protocol, batch_s=600) as sim:
        job = batch_job(tmp_path, sim, article_rows(6))
        assert invoke(str(job), "--batch", "--no-wait").exit_code == 1

        cancelled = invoke("cancel", str(job))

        assert cancelled.exit_code == 1, cancelled.output
        assert "cancelling 1 batch(es)" in cancelled.output
        said = f"batch {FIRST_BATCH[protocol]} cancelled: 6 rows back to pending (batch_cancelled: 6)"
        assert said in cancelled.output
        assert read_output(job)["status"].to_list() == ["pending"] * 6
        assert sql(job, "SELECT state, status FROM batches") == [("collected", "cancelled")]
        assert "no live batches to cancel" in invoke("cancel", str(job)).output
        assert invoke(str(job)).exit_code == 0  # online again: nothing is live
        assert sim.stats.requests == 6


def test_an_endpoint_without_a_batch_api_stops_before_anything_is_sent(tmp_path: Path) -> None:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, batch_api="none")) as sim:
        job = batch_job(tmp_path, sim, article_rows(3))

        result = invoke(str(job), "--batch")

        assert result.exit_code == 2
        assert result.output == (
            f"Error: {sim.base_url} has no Batch API (GET /batches answered 404); nothing was sent: run "
            "the job without batch mode\n"
        )
        assert sim.stats.requests == 0 and sim.stats.uploads == 0
        assert not (job.parent / "out" / "result.parquet").exists()


def test_ctrl_c_while_waiting_leaves_the_batch_running_and_says_how_to_collect(tmp_path: Path) -> None:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, batch_s=600)) as sim:
        job = batch_job(tmp_path, sim, article_rows(4))
        with child(str(job), "--batch") as proc:
            stderr = StderrLines(proc)
            stderr.wait_for("submitted batch batch_sim00000001: 4 rows")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
            said = stderr.rest()
        assert (
            "batchrun: SIGINT received: submitting no more batches; those submitted keep running at the "
            "provider, and a rerun in batch mode collects them (press Ctrl-C again to stop at once)" in said
        )
        assert "in-flight" not in said
        assert "1 batch(es) of 4 rows still at the provider: run the job again in batch mode" in said
        assert f"interrupted: rerun `batchrun {job}` to resume" in said
        assert sql(job, "SELECT state, batch_id FROM batches") == [("submitted", "batch_sim00000001")]
        assert sim.stats.uploads == 1


def batch_states(job: Path, columns: str = "state, status") -> list[tuple[Any, ...]]:
    try:
        return sql(job, f"SELECT {columns} FROM batches ORDER BY submission")
    except sqlite3.OperationalError:  # no checkpoint, or no table yet
        return []


@pytest.mark.parametrize(
    ("step", "seen"),
    [
        ("upload", ("uploading", None)),
        ("create", ("uploaded", None)),
        ("wait", ("submitted", "validating")),
        ("collect", ("submitted", "completed")),
    ],
)
def test_kill_9_at_each_remote_step_then_a_rerun_collects_from_one_batch(
    tmp_path: Path, step: str, seen: tuple[str, str | None]
) -> None:
    """Each Batch API answer comes 0.4 s after the simulator acted on it: the process is killed
    while it waits for one, its step recorded as begun and not as done."""
    config = SimulatorConfig(api_key=TEST_KEY, batch_delay_ms=400, batch_s=0.5 if step == "wait" else 0)
    with serve_in_thread(config) as sim, OpenAI(base_url=sim.base_url, api_key=TEST_KEY) as sdk:
        job = batch_job(tmp_path, sim, article_rows(6))
        with child(str(job), "--batch") as proc:
            deadline = time.monotonic() + 30
            # an upload is killed once the simulator has the file, before the answer says its id
            while batch_states(job) != [seen] or (step == "upload" and not sim.stats.uploads):
                assert time.monotonic() < deadline and proc.poll() is None, batch_states(job)
            proc.kill()
            assert proc.wait(timeout=10) == -9

        rerun = invoke(str(job), "--batch")

        assert rerun.exit_code == 0, rerun.output
        assert read_output(job)["status"].to_list() == ["ok"] * 6
        assert len(sdk.batches.list().data) == 1  # the rerun never made a second batch
        assert sim.stats.uploads == (2 if step == "upload" else 1)  # a file uploaded unrecorded, then again
        assert sim.stats.batch_lines == 6
        assert sdk.files.list().data == []  # the one uploaded unrecorded too: nothing left behind


def test_a_batch_that_fails_validation_is_reported_with_the_providers_messages(
    tmp_path: Path, any_sim: RunningSimulator, protocol: str
) -> None:
    rows = article_rows(3)
    rows[2]["text"] += " [[batch:invalid]]"
    job = batch_job(tmp_path, any_sim, rows)

    result = invoke(str(job), "--batch")

    assert result.exit_code == 1
    said = re.search(r"warning: batch (\S+) failed: (.*); its 3 rows are pending", result.output)
    assert said is not None and said[1] == FIRST_BATCH[protocol], result.output
    ((key, occurrence),) = sql(job, "SELECT request_key, occurrence FROM batch_rows WHERE row = 2")
    assert said[2] == (
        "line 3: Simulated validation failure ([[batch:invalid]])."  # the batch's errors, by line
        if protocol == "openai"  # xAI's cancel_by_xai_message
        else f"Simulated validation failure ([[batch:invalid]]) in request {custom_id(key, occurrence)}."
    )
    assert read_output(job)["status"].to_list() == ["pending"] * 3
    assert sql(job, "SELECT DISTINCT error_kind FROM batch_rows") == [("batch_failed",)]


def test_batch_rows_cost_the_batch_rate_and_keep_it_when_prices_change(
    tmp_path: Path, batch_sim: RunningSimulator
) -> None:
    rows = [{**row, "text": "Same length text. Twice."} for row in article_rows(8)]
    rows = [{**row, "title": "Story"} for row in rows]  # every request of the same size
    job = batch_job(tmp_path, batch_sim, rows, pricing={"input_per_million": 1.0, "output_per_million": 2.0})
    assert invoke(str(job), "--limit", "4").exit_code == 0
    assert invoke(str(job), "--batch").exit_code == 0

    out = read_output(job).sort("id")
    online, batch = out["cost_usd"][0], out["cost_usd"][7]
    assert batch == pytest.approx(online * 0.5)  # pricing.batch_discount's default
    assert out["batch_id"].to_list() == [None] * 4 + ["batch_sim00000001"] * 4

    edited = yaml.safe_load(job.read_text())
    edited["pricing"] = {"input_per_million": 3.0, "output_per_million": 6.0, "batch_discount": 0.2}
    job.write_text(yaml.safe_dump(edited))
    repriced = invoke(str(job))
    assert "repriced 8 rows" in repriced.output
    out = read_output(job).sort("id")
    assert out["cost_usd"][0] == pytest.approx(online * 3)
    assert out["cost_usd"][7] == pytest.approx(online * 3 * 0.8)


def test_the_batch_rate_is_the_price_tables_where_it_has_one() -> None:
    def spec(model: str, **pricing: Any) -> JobSpec:
        keys: dict[str, Any] = {"input": {"path": "in.csv"}, "output": {"path": "out.csv"}, "model": model}
        return job_from_mapping(
            {**keys, "prompt": {"user": "{x}"}, **({"pricing": pricing} if pricing else {})}, Path()
        )

    listed = batch_price(spec("grok-4.3"))
    assert listed is not None and listed.source.startswith("list batch price, genai-prices")
    online = job_price(spec("grok-4.3"))
    assert online is not None and listed.tiers[0][1].input < online.tiers[0][1].input
    discounted = batch_price(spec("grok-4.3", discount=0.3))
    assert discounted is not None and discounted.tiers[0][1].input == pytest.approx(
        listed.tiers[0][1].input * 0.7
    )

    unlisted = batch_price(spec("grok-3", batch_discount=0.4))  # no batch rate in the table
    grok3 = job_price(spec("grok-3"))
    assert unlisted is not None and grok3 is not None
    assert unlisted.tiers[0][1].output == pytest.approx(grok3.tiers[0][1].output * 0.6)
    assert unlisted.source.endswith("less 40% (batch)")


def test_the_budget_reserves_each_batch_at_its_worst_and_stops_submitting_at_the_cap(
    tmp_path: Path, any_sim: RunningSimulator
) -> None:
    rows = article_rows(10)
    job = batch_job(tmp_path, any_sim, rows, pricing={"input_per_million": 1.0, "output_per_million": 2.0})
    body_bytes = len(json.dumps(first_request(job), separators=(",", ":")))
    worst = (body_bytes * 1.0 + 40 * 2.0) / 1e6 * 0.5  # a line's ceiling at the batch rate
    cap = worst * 3.5  # room for three lines' worst cases

    stopped = invoke(str(job), "--batch", "--max-cost", f"{cap:.8f}")

    assert stopped.exit_code == 3, stopped.output
    assert "submitting no more" in stopped.output
    assert sql(job, "SELECT lines FROM batches") == [(3,)]
    out = read_output(job)
    assert out["status"].value_counts().sort("status").rows() == [("ok", 3), ("pending", 7)]
    assert out["cost_usd"].sum() <= cap  # paid: well under the worst cases reserved
    resumed = invoke(str(job), "--batch", "--max-cost", "1")
    assert resumed.exit_code == 0 and any_sim.stats.batch_lines == 10


def test_rows_are_split_into_batches_by_lines_and_by_bytes(
    tmp_path: Path, any_sim: RunningSimulator, protocol: str
) -> None:
    rows = article_rows(10)
    rows[9]["text"] += " Long." * 400  # alone past a 2 kB file
    by_lines = batch_job(tmp_path, any_sim, rows, batches={"poll_s": 0.02, "max_lines": 4, "max_mb": 0.002})

    result = invoke(str(by_lines), "--batch")

    assert result.exit_code == 1, result.output
    sizes = sql(by_lines, "SELECT lines, bytes FROM batches ORDER BY submission")
    assert [lines for lines, _ in sizes] == [4, 4, 1]  # the 9th row: its 2 kB file was full
    assert all(size <= 2000 for _, size in sizes)
    out = read_output(by_lines).sort("id")
    assert out["status"].to_list() == ["ok"] * 9 + ["failed"]
    assert out["error_kind"][9] == "request_too_large"
    assert sent(any_sim, protocol) == 3


# xAI's protocol: batches made, then added to in parts.


@pytest.fixture
def xai_sim() -> Iterator[RunningSimulator]:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, batch_api="xai")) as sim:
        yield sim


def xai_call(sim: RunningSimulator, method: str, path: str, body: Any = None) -> Any:
    """One call to the simulator's xAI Batch API, its JSON answer (raising on a status not 2xx)."""
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    response = httpx.request(method, sim.base_url + path, json=body, headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()


def xai_request(request_id: str, user: str) -> dict[str, Any]:
    body = chat_line(request_id, user)["body"]
    return {"batch_request_id": request_id, "batch_request": {"chat_get_completion": body}}


def test_simulator_xai_batch_answers_each_request_as_the_chat_endpoint_does(
    xai_sim: RunningSimulator,
) -> None:
    created = xai_call(xai_sim, "POST", "/batches", {"name": "b1"})
    batch_id = created["batch_id"]
    assert created["state"] == dict.fromkeys(
        ("num_requests", "num_pending", "num_success", "num_error", "num_cancelled"), 0
    )
    first = [
        xai_request("a", "First sentence. Second one. Third."),
        xai_request("b", "Fails. [[fail:500x1]]"),
    ]
    assert xai_call(xai_sim, "POST", f"/batches/{batch_id}/requests", {"batch_requests": first}) == {}
    again = {"batch_requests": [xai_request("c", "Bad request. [[fail:400]]")]}
    xai_call(xai_sim, "POST", f"/batches/{batch_id}/requests", again)
    with pytest.raises(httpx.HTTPStatusError, match="400"):  # an id once in a batch
        xai_call(xai_sim, "POST", f"/batches/{batch_id}/requests", again)

    state = xai_call(xai_sim, "GET", f"/batches/{batch_id}")["state"]
    assert (state["num_requests"], state["num_pending"], state["num_success"], state["num_error"]) == (
        3,
        0,
        1,
        2,
    )
    page = xai_call(xai_sim, "GET", f"/batches/{batch_id}/results?limit=2")
    rest = xai_call(
        xai_sim, "GET", f"/batches/{batch_id}/results?limit=2&pagination_token={page['pagination_token']}"
    )
    assert rest["pagination_token"] is None
    results = {r["batch_request_id"]: r["batch_result"] for r in page["results"] + rest["results"]}
    answer = results["a"]["response"]["chat_get_completion"]
    assert answer["choices"][0]["message"]["content"] == "First sentence. Second one."
    assert results["b"]["error"]["code"] == 13 and results["c"]["error"]["code"] == 3
    assert results["c"]["error"]["message"] == "Simulated HTTP 400 error."
    listed = xai_call(xai_sim, "GET", "/batches?limit=1")
    assert [b["name"] for b in listed["batches"]] == ["b1"] and listed["pagination_token"] is None
    assert xai_sim.stats.batch_adds == 2 and xai_sim.stats.batch_lines == 3


def test_simulator_xai_batch_cancel_expiry_and_rejection() -> None:
    with serve_in_thread(SimulatorConfig(batch_api="xai", batch_s=60)) as sim:
        batch_id = xai_call(sim, "POST", "/batches", {"name": "slow"})["batch_id"]
        xai_call(sim, "POST", f"/batches/{batch_id}/requests", {"batch_requests": [xai_request("a", "A.")]})
        cancelled = xai_call(sim, "POST", f"/batches/{batch_id}:cancel")
        assert cancelled["cancel_time"] is not None
        assert (cancelled["state"]["num_pending"], cancelled["state"]["num_cancelled"]) == (0, 1)
    with serve_in_thread(SimulatorConfig(batch_api="xai")) as sim:
        batch_id = xai_call(sim, "POST", "/batches", {"name": "late"})["batch_id"]
        late = {"batch_requests": [xai_request("a", "A."), xai_request("b", "Late. [[batch:expire]]")]}
        xai_call(sim, "POST", f"/batches/{batch_id}/requests", late)
        expired = xai_call(sim, "GET", f"/batches/{batch_id}")
        assert (expired["state"]["num_success"], expired["state"]["num_pending"]) == (1, 1)
        made, expires = (datetime.datetime.fromisoformat(expired[k]) for k in ("create_time", "expire_time"))
        assert expires - made < datetime.timedelta(seconds=1)  # batch_s (0) after the add

        batch_id = xai_call(sim, "POST", "/batches", {"name": "bad"})["batch_id"]
        bad = {"batch_requests": [xai_request("a", "A."), xai_request("b", "B. [[batch:invalid]]")]}
        xai_call(sim, "POST", f"/batches/{batch_id}/requests", bad)
        rejected = xai_call(sim, "GET", f"/batches/{batch_id}")
        assert rejected["cancel_by_xai_message"].startswith("Simulated validation failure")
        assert rejected["state"]["num_cancelled"] == 2
        with pytest.raises(httpx.HTTPStatusError, match="404"):
            xai_call(sim, "GET", "/files")


def xai_job(tmp_path: Path, sim: RunningSimulator, rows: list[dict[str, Any]], **overrides: Any) -> Path:
    """A job over `rows` against `sim`, in xAI's protocol, adding at most 1 kB a call (a part
    holds two or three rows of article_rows)."""
    endpoint = {"base_url": sim.base_url, "api_key_env": TEST_KEY_ENV, "timeout_s": 10, "batch_api": "xai"}
    batches = {"poll_s": 0.02, "add_mb": 0.001}
    return write_job(tmp_path, rows, sim.base_url, **{"endpoint": endpoint, "batches": batches, **overrides})


def test_xai_batch_submits_in_parts_waits_and_collects_every_row(
    tmp_path: Path, xai_sim: RunningSimulator
) -> None:
    rows = article_rows(12)
    job = batch_job(tmp_path, xai_sim, rows, batches={"poll_s": 0.02, "add_mb": 0.001})  # batch_api: auto

    result = invoke(str(job), "--batch")

    assert result.exit_code == 0, result.output
    assert "submitted batch batch_xsim00000001: 12 rows" in result.output
    out = read_output(job).sort("id")
    assert out["status"].to_list() == ["ok"] * 12
    assert out["batch_id"].to_list() == ["batch_xsim00000001"] * 12
    assert out["content"][0] == "Story 0 Lead sentence of story 0. A second sentence follows."
    assert xai_sim.stats.requests == 0 and xai_sim.stats.batch_lines == 12
    parts = sql(job, "SELECT part, COUNT(*) FROM batch_rows GROUP BY part")
    assert len(parts) == xai_sim.stats.batch_adds > 2  # a part per add, each under 1 kB
    assert sql(job, "SELECT api, state, lines, added FROM batches") == [("xai", "collected", 12, len(parts))]


@pytest.mark.parametrize(
    ("step", "seen", "calls", "batches"),
    [
        ("create", ("creating", None, 0), 2, 2),  # the probe and the batch's making
        ("first add", ("adding", None, 0), 3, 2),
        ("between adds", ("adding", None, 1), 4, 2),
        ("wait", ("submitted", "validating", 3), 6, 1),
        ("collect", ("submitted", "completed", 3), 7, 1),
    ],
)
def test_kill_9_at_each_remote_step_of_xais_protocol_then_every_row_is_answered_once(
    tmp_path: Path, step: str, seen: tuple[Any, ...], calls: int, batches: int
) -> None:
    """Each Batch API answer comes 0.4 s after the simulator acted on it: the process is killed
    while it waits for one (its `calls`-th), the step recorded as begun and not as done. A rerun
    keeps the parts the batch holds and sends the others in a new batch."""
    config = SimulatorConfig(
        api_key=TEST_KEY, batch_api="xai", batch_delay_ms=400, batch_s=0.5 if step == "wait" else 0
    )
    with serve_in_thread(config) as sim:
        job = xai_job(tmp_path, sim, article_rows(8))  # in three parts: 3, 3 and 2 rows
        with child(str(job), "--batch") as proc:
            deadline = time.monotonic() + 30
            while batch_states(job, "state, status, added") != [seen] or sim.stats.batch_requests < calls:
                assert time.monotonic() < deadline and proc.poll() is None, batch_states(job)
            proc.kill()
            assert proc.wait(timeout=10) == -9

        rerun = invoke(str(job), "--batch")

        assert rerun.exit_code == 0, rerun.output
        assert read_output(job)["status"].to_list() == ["ok"] * 8
        made = xai_call(sim, "GET", "/batches?limit=10")["batches"]
        assert len(made) == batches
        assert sum(b["state"]["num_requests"] for b in made) == 8  # each row added once
        if step == "create":  # the batch made unheard of holds nothing: cancelled
            assert made[-1]["state"]["num_requests"] == 0 and made[-1]["cancel_time"] is not None
        assert sim.stats.batch_lines == 8


@pytest.mark.parametrize(("offered", "asked"), [("openai", "xai"), ("xai", "openai")])
def test_a_batch_api_other_than_the_jobs_stops_before_anything_is_sent(
    tmp_path: Path, offered: str, asked: str
) -> None:
    with serve(offered) as sim:
        endpoint = {"base_url": sim.base_url, "api_key_env": TEST_KEY_ENV, "batch_api": asked}
        job = batch_job(tmp_path, sim, article_rows(3), endpoint=endpoint)

        result = invoke(str(job), "--batch")

        shape = {"openai": "OpenAI's", "xai": "xAI's"}[offered]
        assert result.exit_code == 2
        assert result.output == (
            f"Error: endpoint.batch_api is {asked}, but {sim.base_url} answers GET /batches in {shape} "
            f"shape; nothing was sent: set endpoint.batch_api to {offered} or auto\n"
        )
        assert sim.stats.batch_requests == 1 and sim.stats.requests == 0


def test_the_report_shows_online_and_batch_rows_side_by_side(tmp_path: Path) -> None:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, batch_s=0.3)) as sim:
        job = batch_job(tmp_path, sim, article_rows(12))
        assert invoke(str(job), "--limit", "5").exit_code == 0  # rows 0-4 online
        assert invoke(str(job), "--batch").exit_code == 0  # the other 7 in a batch of 0.3 s

    report = json.loads((job.parent / "out" / "result.parquet.report.json").read_text())
    online, batch = report["by_mode"]["online"], report["by_mode"]["batch"]
    assert (online["ok"], online["failed"], batch["ok"], batch["failed"]) == (5, 0, 7, 0)
    out = read_output(job)
    assert online["cost_usd"] == pytest.approx(
        out.filter(pl.col("batch_id").is_null())["cost_usd"].sum(), abs=1e-6
    )
    assert batch["cost_usd"] == pytest.approx(
        out.filter(pl.col("batch_id").is_not_null())["cost_usd"].sum(), abs=1e-6
    )
    assert batch["submit_to_answer_s"]["p50"] >= 0.3  # from the submission to the collection
    # the job's latency is the online rows' alone: no batch's turnaround in it
    assert report["latency_ms"] == online["latency_ms"]
    assert report["latency_ms"]["p99"] < 300

    assert invoke("report", str(job)).exit_code == 0
    html = (job.parent / "out" / "result.parquet.report.html").read_text()
    shown = dict(re.findall(r'<td id="([\w-]+)"[^>]*>([^<]*)</td>', html))
    assert (shown["online-ok"], shown["batch-ok"], shown["batch-failed"]) == ("5", "7", "0")
    assert shown["batch-p50"] == f"{batch['submit_to_answer_s']['p50']:,.1f} s"
    assert "Of each row sent online" in html
