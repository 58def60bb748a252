"""One writer per checkpoint, keys that never leak, nulls handled as asked, stalls reported."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import traceback
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from batchrun.cli import main
from batchrun.errors import JobAborted
from batchrun.html_report import PAGE_SWITCH
from batchrun.simulator import SimulatorConfig, serve_in_thread
from tests.conftest import (
    TEST_KEY,
    article_rows,
    batchrun_process,
    checkpoint_path,
    invoke,
    read_output,
    run_batchrun,
    wait_for_rows,
    write_job,
)


def test_second_run_of_the_same_job_is_refused_and_a_dead_holder_does_not_block(
    tmp_path: Path,
) -> None:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, latency_ms=20)) as sim:
        job = write_job(tmp_path, article_rows(400), sim.base_url, concurrency=2)
        first = batchrun_process(str(job), "-q")
        wait_for_rows(job, at_least=5)

        second = run_batchrun(str(job))

        assert second.returncode == 2
        assert second.stderr.startswith(f"Error: another batchrun (pid {first.pid}) is running")
        first.kill()
        first.communicate(timeout=10)
        resumed = run_batchrun(str(job), "-q")
        assert resumed.returncode == 0, resumed.stderr
        assert read_output(job).height == 400


def test_api_key_never_reaches_output_checkpoint_or_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        rows = article_rows(20)
        rows[4]["text"] += " [[fail:400]]"
        job = write_job(tmp_path, rows, sim.base_url)
        ok = invoke("run", str(job))
        wrong_key = "sk-live-this-one-is-wrong-0042"
        monkeypatch.setenv("BATCHRUN_TEST_KEY", wrong_key)
        rejected = invoke("run", str(job), "--fresh")
        with pytest.raises(JobAborted, match=r"rejected the API key") as debug_trace:
            CliRunner().invoke(main, ["run", str(job), "--debug"], catch_exceptions=False)

    assert ok.exit_code == 1
    assert rejected.exit_code == 2
    assert "Incorrect API key provided: [redacted]" in rejected.stderr
    assert wrong_key not in rejected.stderr
    # --debug shows the whole traceback, chained exceptions included: the key is in none of it.
    shown = "".join(traceback.format_exception(debug_trace.value))
    assert "Incorrect API key provided: [redacted]" in shown
    for text in (shown, str(debug_trace.value), repr(debug_trace.value)):
        assert wrong_key not in text and TEST_KEY not in text
    for path in (tmp_path / "out").iterdir():
        data = path.read_bytes()
        assert TEST_KEY.encode() not in data, path
        assert wrong_key.encode() not in data, path
    assert TEST_KEY not in ok.output + ok.stderr


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_reports_and_checkpoint_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """#20 item 10: files written through a temp file (mkstemp: 0600) were 0600 whatever the umask."""
    job = write_job(tmp_path, article_rows(3), "http://127.0.0.1:1/v1")
    env = {k: v for k, v in os.environ.items() if k != PAGE_SWITCH}  # the page too
    ran = subprocess.run(
        [sys.executable, "-m", "batchrun", "run", str(job), "--simulate", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        umask=umask,
    )

    assert ran.returncode == 0, ran.stderr
    out = tmp_path / "out"
    names = ["result.parquet", "result.parquet.report.json", "result.parquet.report.html"]
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in names}
    assert modes == dict.fromkeys(names, 0o666 & ~umask)
    assert stat.S_IMODE(checkpoint_path(job).stat().st_mode) == 0o644 & ~umask  # SQLite's own


@pytest.mark.parametrize(("on_null", "status", "sent"), [("skip", "skipped", 8), ("empty", "ok", 10)])
def test_null_prompt_values_skip_or_render_empty(
    tmp_path: Path, on_null: str, status: str, sent: int
) -> None:
    rows = article_rows(10)
    rows[2]["text"] = None
    rows[6]["text"] = None
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        job = write_job(
            tmp_path, rows, sim.base_url, input={"path": "input.csv", "id_column": "id", "on_null": on_null}
        )
        result = invoke("run", str(job))
        rerun = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    out = read_output(job)
    assert out["status"][2] == out["status"][6] == status
    assert sim.stats.requests == sent  # the rerun sent nothing: skipped rows count as done
    assert rerun.exit_code == 0
    if on_null == "skip":
        assert out["error"][2] == "empty column(s) text; not sent (input.on_null: skip)"
        assert ", 2 skipped of 10" in result.stderr


def test_stall_detector_reports_when_nothing_finishes(tmp_path: Path) -> None:
    rows = article_rows(3)
    for row in rows:
        row["text"] += " [[sleep:1500]]"
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        job = write_job(tmp_path, rows, sim.base_url, stall_warning_s=0.3)
        result = invoke("run", str(job))

    assert result.exit_code == 0
    assert "warning: no row finished in the last 0.3 s; 3 request(s) in flight" in result.stderr


def test_checkpoint_is_sqlite_wal_keyed_by_row(tmp_path: Path) -> None:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        job = write_job(tmp_path, article_rows(5), sim.base_url)
        invoke("run", str(job))
    with sqlite3.connect(checkpoint_path(job)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = db.execute("SELECT row, id, status FROM results ORDER BY row").fetchall()
    assert rows == [(i, str(1000 + i), "ok") for i in range(5)]
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["id"].to_list() == list(range(1000, 1005))
