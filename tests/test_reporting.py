"""What a run tells its user: the progress bar on a terminal, the summary, `status`, the run report."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from batchrun.events import RunStarted
from batchrun.output import ERRORS_KEPT, Tally
from batchrun.progress import Progress
from batchrun.results import RowResult, RowTally
from batchrun.simulator import RunningSimulator, SimulatorConfig, serve_in_thread
from tests.conftest import TEST_KEY, article_rows, invoke, write_job
from tests.stub_server import Handler, Reply, Request, completion, serve_stub

BAR = re.compile(r"(\d+)/(\d+) \[.*ok=(\d+) failed=(\d+)(?: skipped=(\d+))?")


def run_in_terminal(*args: str, timeout: float = 60) -> tuple[int, str]:
    """The real CLI with its stderr on a pseudo-terminal (so tqdm draws its bar); all it wrote."""
    main_fd, terminal_fd = pty.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrun", *args],
        stdin=subprocess.DEVNULL,
        stdout=terminal_fd,
        stderr=terminal_fd,
    )
    os.close(terminal_fd)
    written = b""
    while True:
        try:
            data = os.read(main_fd, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        written += data
    os.close(main_fd)
    return process.wait(timeout), written.decode(errors="replace")


def bar_frames(screen: str) -> list[tuple[int, int, int, int]]:
    """(count, ok, failed, skipped) of every bar line drawn, in order."""
    frames = []
    for line in re.split(r"[\r\n]", screen):
        if "row/s" in line or "s/row" in line or "?row" in line:  # below 1 row/s tqdm shows s/row
            found = BAR.search(line)
            assert found, f"a bar line without its counts: {line!r}"
            count, _, ok, failed, skipped = (int(g or 0) for g in found.groups())
            frames.append((count, ok, failed, skipped))
    return frames


def test_bar_count_is_ok_plus_failed_plus_skipped_in_every_frame(tmp_path: Path) -> None:
    """Resumed, skipped and failed rows all in one run, slow enough for many frames."""
    rows = article_rows(150)
    for i in (3, 70, 140):
        rows[i]["text"] = None  # skipped (input.on_null: skip)
    for i in (10, 90, 120):
        rows[i]["text"] += " [[fail:400]]"
    config = SimulatorConfig(api_key=TEST_KEY, latency_ms=60)
    with serve_in_thread(config) as sim:
        job = write_job(
            tmp_path,
            rows,
            sim.base_url,
            input={"path": "input.csv", "id_column": "id", "on_null": "skip"},
        )
        assert invoke("run", str(job), "--limit", "30").exit_code == 1  # 1 failed, 1 skipped
        code, screen = run_in_terminal("run", str(job))

    assert code == 1, screen
    frames = bar_frames(screen)
    assert len(frames) >= 5, screen  # two at the start, then one per 0.2 s over >= 0.9 s of sending
    for count, ok, failed, skipped in frames:
        assert count == ok + failed + skipped, frames
    assert frames[0] == (30, 28, 1, 1)  # the resumed rows, counted from the first frame
    assert frames[-1] == (150, 144, 3, 3)
    assert "rows: 144 ok, 3 failed (http_400: 3), 3 skipped of 150" in screen


def test_a_resumed_bar_counts_tokens_as_it_counts_cost_the_whole_jobs(tmp_path: Path) -> None:
    """A rerun of a finished job sends nothing: its bar still shows the job's tokens beside the
    job's cost, not 0 beside what earlier runs spent."""
    tokens = re.compile(r"tokens=([\d,]+) cost=\$(\d+\.\d+)")
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        job = write_job(tmp_path, article_rows(12), sim.base_url)
        first_code, first = run_in_terminal("run", str(job), "--limit", "8")
        code, again = run_in_terminal("run", str(job))
        _, finished = run_in_terminal("run", str(job))

    assert (first_code, code) == (0, 0), again
    at_8 = tokens.findall(first)[-1]
    at_12 = tokens.findall(again)[-1]
    assert int(at_8[0].replace(",", "")) > 0 and float(at_8[1]) > 0
    assert int(at_12[0].replace(",", "")) > int(at_8[0].replace(",", ""))  # the first 8 rows' too
    assert tokens.findall(again)[0][0] != "0"  # counted from the start of the resume
    assert tokens.findall(finished)[-1] == at_12  # nothing sent: the job's figures, both


def test_retry_failed_bar_counts_the_resent_rows_once(tmp_path: Path) -> None:
    rows = article_rows(20)
    rows[5]["text"] += " [[fail:500x4]]"
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        job = write_job(tmp_path, rows, sim.base_url)
        assert invoke("run", str(job)).exit_code == 1
        code, screen = run_in_terminal("run", str(job), "--retry-failed")

    assert code == 0, screen
    frames = bar_frames(screen)
    assert frames[0] == (19, 19, 0, 0)
    assert frames[-1] == (20, 20, 0, 0)
    assert "/20 [" in screen


def read_report(job: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((job.parent / "out" / "result.parquet.report.json").read_text())
    return report


# --- usage the endpoint did not report (#11 item 10)


def stub_without_usage(with_usage: frozenset[str] = frozenset()) -> Handler:
    """Answers like llama.cpp's server: no `usage`, except for prompts naming a title in `with_usage`."""

    def handle(request: Request) -> Reply:
        if request.path.endswith("/models"):
            return Reply(body={"object": "list", "data": [{"id": "grok-4.3", "object": "model"}]})
        body = completion("An answer.", prompt_tokens=10, completion_tokens=3, total_tokens=13)
        prompt = request.json()["messages"][-1]["content"]
        if not any(title in prompt for title in with_usage):
            del body["usage"]
        return Reply(body=body)

    return handle


def test_no_usage_is_unknown_in_summary_status_cost_and_report(tmp_path: Path) -> None:
    with serve_stub(stub_without_usage()) as stub:
        job = write_job(tmp_path, article_rows(5), stub.base_url)
        result = invoke("run", str(job))
    status = invoke("status", str(job))
    cost = invoke("cost", str(job), "--format", "json")

    assert result.exit_code == 0, result.output
    assert "tokens: unknown (the endpoint reported no usage for 5 rows)" in result.stderr
    assert "cost: unknown (no usage reported)" in result.stderr
    assert "tokens: unknown (the endpoint reported no usage for 5 rows)" in status.stdout
    assert "cost: unknown" in status.stdout
    total = json.loads(cost.stdout)[-1]
    assert total["rows"] == 5
    assert total["prompt_tokens"] is None and total["completion_tokens"] is None
    report = read_report(job)
    assert report["tokens"] == {
        "prompt": None,
        "cached": None,
        "completion": None,
        "reasoning": None,
        "rows_without_usage": 5,
    }
    assert report["this_run"]["tokens_per_min"] is None
    assert report["cost_usd"]["actual"] is None


def test_some_rows_without_usage_are_counted_beside_the_known_sums(tmp_path: Path) -> None:
    with serve_stub(stub_without_usage(frozenset({"Story 0\n", "Story 1\n"}))) as stub:
        job = write_job(tmp_path, article_rows(5), stub.base_url)
        result = invoke("run", str(job))
    status = invoke("status", str(job))

    line = "tokens: 20 prompt + 6 completion, and 3 rows without usage (the endpoint reported none)"
    assert line in result.stderr
    assert line in status.stdout
    report = read_report(job)
    assert report["tokens"]["prompt"] == 20
    assert report["tokens"]["rows_without_usage"] == 3
    assert report["this_run"]["tokens_per_min"] > 0


def test_progress_shows_tokens_unknown_until_an_answer_reports_usage() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress(quiet=False, stream=screen)
    progress.started(RunStarted(3, {}))
    progress.row_finished(RowResult(row=0, id="a", status="ok", content="x"))
    progress.row_finished(
        RowResult(row=1, id="b", status="failed", error_kind="http_400")
    )  # no answer: no usage due
    progress.close()
    assert progress.run_tokens is None
    assert screen.getvalue().rstrip().endswith("ok=1 failed=1 tokens=unknown]")

    progress = Progress(quiet=False, stream=screen)
    progress.started(RunStarted(3, {}))
    progress.row_finished(RowResult(row=0, id="a", status="ok", content="x"))
    progress.row_finished(
        RowResult(row=1, id="b", status="ok", prompt_tokens=7, completion_tokens=2, total_tokens=9)
    )
    assert progress.run_tokens == 9
    progress.close()
    assert screen.getvalue().rstrip().endswith("ok=2 failed=0 tokens=9+]")


# --- why rows failed (#11 item 11)

FAILURES = {  # marker in a row's text -> the answer every attempt gets
    "[[json_schema]]": Reply(500, {"error": {"message": "Input should be 'text' or 'json_object'"}}),
    "[[too_long]]": Reply(400, {"error": {"message": "This prompt is too long.", "type": "invalid"}}),
    "[[teapot]]": Reply(418, {"error": {"message": "I'm a teapot"}}),
    "[[gone]]": Reply(410, {"detail": "Gone"}),
}


def failing_stub(request: Request) -> Reply:
    if request.path.endswith("/models"):
        return Reply(body={"object": "list", "data": [{"id": "grok-4.3", "object": "model"}]})
    prompt = request.json()["messages"][-1]["content"]
    return next((reply for marker, reply in FAILURES.items() if marker in prompt), Reply(body=completion()))


def test_summary_status_and_report_name_the_commonest_errors(tmp_path: Path) -> None:
    rows = article_rows(16)
    for i, marker in enumerate(["[[json_schema]]"] * 5 + ["[[too_long]]"] * 3 + ["[[teapot]]", "[[gone]]"]):
        rows[1 + i]["text"] += " " + marker
    with serve_stub(failing_stub) as stub:
        job = write_job(tmp_path, rows, stub.base_url)
        result = invoke("run", str(job))
    status = invoke("status", str(job))

    assert result.exit_code == 1, result.output
    report = read_report(job)
    errors = [(e["error"], e["rows"]) for e in report["rows"]["top_errors"]]
    assert len(errors) == 3
    assert errors[:2] == [
        ("http_500: HTTP 500: Input should be 'text' or 'json_object'", 5),
        ("http_400: HTTP 400: This prompt is too long.", 3),
    ]
    assert errors[2][1] == 1
    lines = [f"  {n} rows: {error}" for error, n in errors[:2]] + [f"  1 row: {errors[2][0]}"]
    lines.append("  1 more row with other errors")
    for output in (result.stderr, status.stdout):
        assert "\n".join(lines) in output, output


def test_the_output_tally_counts_messages_until_too_many_differ() -> None:
    """The summary's top errors come from the output's pass; past ERRORS_KEPT distinct messages
    it stops counting them (memory) and says so, and the runner asks the checkpoint instead."""
    from batchrun.results import OUTPUT_RESULT_COLUMNS, RESULT_SCHEMA

    def part(errors: list[str]) -> pl.DataFrame:
        columns = {c: pl.Series(c, [None] * len(errors), RESULT_SCHEMA[c]) for c in OUTPUT_RESULT_COLUMNS}
        columns |= {"status": pl.Series(["failed"] * len(errors)), "error": pl.Series(errors)}
        return pl.DataFrame(columns)

    tally = Tally()
    tally.add(part(["gone"] * 3 + ["teapot"] * 2 + ["late"]))
    tally.add(part(["teapot"] * 2))
    assert tally.top_errors(2) == [("teapot", 4), ("gone", 3)]
    assert tally.kinds() == {"unknown": 8} and tally.by_status["failed"] == 8
    assert tally.usage()["prompt_tokens"] == 0 and tally.tokens("prompt_tokens") == 0  # no answer: none due
    tally.add(part([f"row {i} failed" for i in range(ERRORS_KEPT)]))
    assert tally.top_errors() is None and tally.by_status["failed"] == 8 + ERRORS_KEPT


def test_rows_done_before_counted_after_the_start_join_the_bar_at_once() -> None:
    """A resume of a large checkpoint counts its done rows while the first rows go out: the
    bar takes them when they are in, as done before this run (not in its rate)."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    loop = asyncio.new_event_loop()
    try:
        counted: asyncio.Future[RowTally] = loop.create_future()
        screen = Terminal()
        progress = Progress(quiet=False, stream=screen)
        progress.started(RunStarted(10, {}, cost_usd=0.0, counted=counted))
        progress.row_finished(RowResult(row=8, id="i", status="ok", content="x", cost_usd=0.5))
        assert (progress.done, progress.ok) == (1, 1)
        counted.set_result(RowTally(Counter({"ok": 6, "failed": 1}), tokens=50, cost_usd=2.0))
        progress.row_finished(RowResult(row=9, id="j", status="ok", content="x", cost_usd=0.5))
        progress.close()
    finally:
        loop.close()
    assert (progress.done, progress.ok, progress.failed, progress.cost_usd) == (9, 8, 1, 3.0)
    last = screen.getvalue().rsplit("\r", 1)[-1]
    # tokens as cost: the job's (the two rows of this run reported no usage: 50 and more)
    assert "9/10 [" in last and "ok=8 failed=1 tokens=50+ cost=$3.0000]" in last, last


class _Recorder:
    """Events that note, when the run says no more rows finish, whether the output exists yet."""

    def __init__(self, output: Path):
        self.output = output
        self.rows = 0
        self.output_existed_when_finished: list[bool] = []

    def started(self, run: RunStarted) -> None:
        pass

    def row_finished(self, result: RowResult) -> None:
        self.rows += 1

    def say(self, message: str, level: str = "info") -> None:
        pass

    def status_changed(self) -> None:
        pass

    def finished(self) -> None:
        self.output_existed_when_finished.append(self.output.exists())


def test_the_progress_clock_stops_before_the_output_and_reports_are_written(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    """Building the output (and the report page) is not time the rows took: the bar's rate and
    its elapsed time end when the last row does."""
    from batchrun.job import load_job
    from batchrun.runner import RunOptions, run_job

    job = write_job(tmp_path, article_rows(6), simulator.base_url)
    recorder = _Recorder(job.parent / "out" / "result.parquet")
    asyncio.run(run_job(load_job(job), RunOptions(quiet=True), recorder))
    assert recorder.rows == 6
    assert recorder.output_existed_when_finished == [False]
    assert recorder.output.exists()
