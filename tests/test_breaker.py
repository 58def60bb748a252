"""The circuit breaker and the job-wide failure checks: the state machine on a fake clock, then
the real CLI against the simulator and stub servers on loopback."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from pathlib import Path

import polars as pl

from batchrun.breaker import Breaker, SameFailure
from batchrun.simulator import SimulatorConfig, serve_in_thread
from tests.conftest import (
    TEST_KEY,
    article_rows,
    checkpoint_path,
    checkpoint_rows,
    invoke,
    read_output,
    write_job,
)
from tests.stub_server import Reply, Request, StubServer, completion, serve_stub
from tests.test_faults import StderrLines, child, free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: FakeClock, threshold: int = 3) -> Breaker:
    return Breaker(
        threshold, first_probe_s=1.0, max_outage_s=60.0, max_probe_s=4.0, clock=clock, wall=lambda: 0.0
    )


def test_opens_after_threshold_failures_in_a_row_and_an_answer_resets_the_count() -> None:
    clock = FakeClock()
    b = breaker(clock)
    assert [b.failed(), b.failed()] == [False, False]
    b.answered()
    assert (b.failures, b.is_open) == (0, False)
    assert [b.failed(), b.failed(), b.failed()] == [False, False, True]
    assert b.is_open
    assert b.failed() is False  # already open: opened once


def test_probes_one_at_a_time_at_doubling_intervals_capped() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        b.failed()
    assert b.try_probe() is False
    assert b.wait_s() == 1.0
    assert b.describe().endswith("next probe in 1 s")
    gaps = []
    for _ in range(5):
        clock.now += b.wait_s()
        assert b.try_probe() is True
        assert b.try_probe() is False  # one probe in flight at a time
        assert b.describe().endswith("probing")
        assert b.wait_s() == 100.0 + 60.0 - clock.now  # while probing, only the deadline is due
        b.failed(probe=True)
        gaps.append(b.wait_s())
    assert gaps == [2.0, 4.0, 4.0, 4.0, 4.0]


def test_an_answer_closes_it_and_the_next_outage_starts_from_the_first_interval() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        b.failed()
    clock.now += 1.0
    assert b.try_probe()
    b.failed(probe=True)
    assert b.answered() is True
    assert (b.is_open, b.probing, b.failures) == (False, False, 0)
    assert b.answered() is False
    for _ in range(3):
        b.failed()
    assert b.wait_s() == 1.0


def test_expires_max_outage_s_after_the_first_failure() -> None:
    clock = FakeClock()
    b = breaker(clock)
    b.failed()
    clock.now += 10
    b.failed()
    b.failed()
    clock.now += 49.9
    assert not b.expired
    assert b.wait_s() == 0.0  # the first probe (due at 111) is overdue
    clock.now += 0.1
    assert b.expired
    b.answered()
    assert not b.expired


def test_describe_names_the_wall_clock_time_the_outage_began() -> None:
    clock = FakeClock()
    began = time.mktime((2026, 1, 1, 3, 12, 5, 0, 0, -1))
    b = Breaker(1, 30.0, 1800.0, clock=clock, wall=lambda: began)
    b.failed()
    assert b.describe() == "endpoint down since 03:12:05; next probe in 30 s"


def test_same_failure_dooms_only_when_the_first_answers_all_fail_alike() -> None:
    doomed = SameFailure(3)
    assert [doomed.answer((400, "x")) for _ in range(3)] == [False, False, True]
    mixed = SameFailure(3)
    assert [mixed.answer((400, "x")), mixed.answer((400, "y")), mixed.answer((400, "x"))] == [False] * 3
    assert not mixed.undecided
    cleared = SameFailure(3)
    assert [cleared.answer(None), cleared.answer((400, "x")), cleared.answer((400, "x"))] == [False] * 3
    assert cleared.answer((400, "x")) is False


def test_outage_longer_than_the_retry_schedule_ends_with_every_row_ok(tmp_path: Path) -> None:
    rows = article_rows(120)
    port = free_port()
    max_attempts = 3
    config = SimulatorConfig(api_key=TEST_KEY, latency_ms=100)
    job = write_job(
        tmp_path,
        rows,
        f"http://127.0.0.1:{port}/v1",
        concurrency=12,
        retry={"max_attempts": max_attempts, "initial_backoff_s": 0.02, "max_backoff_s": 0.1},
    )
    with contextlib.ExitStack() as first_server, child(str(job)) as proc:
        first = first_server.enter_context(serve_in_thread(config, port=port))
        stderr = StderrLines(proc)
        # Answers first: the outage is then mid-run, not an endpoint unreachable from the start.
        deadline = time.monotonic() + 30
        while len(first.stats.ok_by_user_message) < 24:
            assert time.monotonic() < deadline, "the simulator never answered"
            time.sleep(0.01)
        first_server.close()
        # In its place, a listener that hangs up on every request (no answer at all, like a
        # dead upstream), so that the test can count the probes.
        with serve_stub(lambda request: Reply(raw=b""), port=port) as dead:
            stderr.wait_for("endpoint down since")
            at_open = len(dead.requests)
            deadline = time.monotonic() + 30
            while len(dead.requests) < at_open + max_attempts + 1:  # past a row's whole schedule
                assert time.monotonic() < deadline, f"no probes: {''.join(stderr.lines)}"
                time.sleep(0.01)
        with serve_in_thread(config, port=port) as second:
            proc.wait(timeout=60)
            text = stderr.rest()

    assert proc.returncode == 0, text
    out = read_output(job)
    assert out["id"].to_list() == [r["id"] for r in rows]
    assert set(out["status"]) == {"ok"}
    assert f"rows: {len(rows)} ok, 0 failed" in text
    assert re.search(r"endpoint answered again after [\d.]+ s; resuming", text)
    assert len(dead.requests) - at_open > max_attempts  # probes, none counted against a row
    # Every request a server took was some row's attempt (more went to no listener at all).
    assert out["attempts"].sum() >= first.stats.requests + len(dead.requests) + second.stats.requests
    assert len(second.stats.ok_by_user_message) > 0


def _hang_up_on_chat(request: Request) -> Reply:
    """No model list (404), and no answer at all to a chat request."""
    return Reply(404, {"detail": "Not Found"}) if request.path.endswith("/models") else Reply(raw=b"")


def test_unreachable_endpoint_stops_at_the_first_request_with_exit_4(tmp_path: Path) -> None:
    rows = article_rows(50)
    retry = {"max_attempts": 6, "initial_backoff_s": 0.2, "max_backoff_s": 1.0}
    port = free_port()  # nothing listens here
    with serve_stub(_hang_up_on_chat) as stub:
        for base_url, reason in (
            (f"http://127.0.0.1:{port}/v1", "connection refused"),
            (stub.base_url, "connection closed by the server before it answered"),
        ):
            job = write_job(tmp_path, rows, base_url, retry=retry)
            started = time.monotonic()
            result = invoke("run", str(job), "--fresh")
            wall_s = time.monotonic() - started

            assert result.exit_code == 4, result.output
            assert result.stderr.strip().splitlines()[-1] == f"Error: cannot reach {base_url}: {reason}"
            assert wall_s < 3  # retrying 50 rows 6 times each would take minutes
            assert checkpoint_rows(job) == 0
            if base_url == stub.base_url:  # the model check passed: the run's output, every row pending
                assert set(read_output(job)["status"]) == {"pending"}
            else:  # refused: the model check stops it before a checkpoint or an output
                assert not (job.parent / "out" / "result.parquet").exists()
        # The breaker's 10 failures in a row open it (nothing has answered: unreachable), and at
        # most the 7 other workers' requests were in flight then.
        assert len(stub.chat_requests()) <= 10 + 7


LITELLM_NO_DB = Reply(400, {"error": {"type": "no_db_connection", "message": "No connected db."}})
LLAMA_CPP_FORMAT = Reply(500, {"error": {"code": 500, "message": "Input should be 'text' or 'json_object'"}})


def _replay(chat: Reply) -> contextlib.AbstractContextManager[StubServer]:
    def handle(request: Request) -> Reply:
        if request.path.endswith("/models"):
            return Reply(404, {"detail": "Not Found"})
        return chat

    return serve_stub(handle)


def test_every_row_failing_alike_stops_the_job_after_the_first_answers(tmp_path: Path) -> None:
    for chat, concurrency in ((LITELLM_NO_DB, 4), (LLAMA_CPP_FORMAT, 8)):
        rows = article_rows(300)
        with _replay(chat) as stub:
            job = write_job(
                tmp_path,
                rows,
                stub.base_url,
                concurrency=concurrency,
                retry={"max_attempts": 6, "initial_backoff_s": 0.001, "max_backoff_s": 0.01},
            )
            result = invoke("run", str(job), "--fresh")
            sent = len(stub.chat_requests())

        assert result.exit_code == 2, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.stderr
        message = chat.body["error"]["message"]  # type: ignore[index,call-overload]
        assert errors[0].startswith("Error: the first 20 answers were all the same error")
        assert message in errors[0]
        assert result.stderr.count(message) == 1
        assert 20 <= sent <= 20 + concurrency
        out = read_output(job)
        assert set(out["status"]) == {"pending"}  # no row was the problem: none recorded failed
        with sqlite3.connect(checkpoint_path(job)) as db:
            assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0


def test_a_few_rows_failing_alike_among_good_answers_fail_as_rows(tmp_path: Path) -> None:
    def handle(request: Request) -> Reply:
        if request.path.endswith("/models"):
            return Reply(404, {"detail": "Not Found"})
        if "story 3." in request.body.decode():
            return LITELLM_NO_DB
        return Reply(200, completion())

    rows = article_rows(30)
    with serve_stub(handle) as stub:
        job = write_job(tmp_path, rows, stub.base_url, concurrency=2)
        result = invoke("run", str(job))

    assert result.exit_code == 1, result.output
    out = read_output(job)
    assert out.filter(pl.col("status") == "failed")["id"].to_list() == [rows[3]["id"]]


def test_a_daily_quota_429_stops_the_job_at_once_with_exit_4(tmp_path: Path) -> None:
    def handle(request: Request) -> Reply:
        if request.path.endswith("/models"):
            return Reply(404, {"detail": "Not Found"})
        return Reply(429, {"error": {"message": "Daily quota exceeded"}}, headers={"Retry-After": "86400"})

    rows = article_rows(40)
    with serve_stub(handle) as stub:
        job = write_job(tmp_path, rows, stub.base_url, concurrency=2)
        result = invoke("run", str(job))
        sent = len(stub.chat_requests())

    assert result.exit_code == 4, result.output
    assert "asks to wait 86,400 s" in result.stderr
    assert "rerun later" in result.stderr
    assert sent <= 2
    out = read_output(job)
    assert set(out["status"]) == {"pending"}
