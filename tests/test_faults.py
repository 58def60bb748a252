"""Fault injection end to end: the job survives every fault, loses nothing, stops promptly on signals.

Every test drives the real CLI (in-process through CliRunner where signals do not matter, in its own
process where they do or where the test process must stay free to serve) against the simulator on
127.0.0.1. Waiting is always polling a condition against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import queue
import random
import resource
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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

SOAK_FAULTS = (
    "[[fail:500x1]]",
    "[[fail:503x2]]",
    "[[fail:429x1]]",
    "[[fail:resetx1]]",
    "[[fail:badjsonx1]]",
    "[[fail:502x1]]",
)


class StderrLines:
    """Read a child's stderr line by line on a thread, so the test can wait for a line with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]):
        assert proc.stderr is not None
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, deadline_s: float = 15) -> str:
        deadline = time.monotonic() + deadline_s
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"stderr never said {text!r}: {''.join(self.lines)}"
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, f"stderr closed before saying {text!r}: {''.join(self.lines)}"
            self.lines.append(line)
            if text in line:
                return line

    def rest(self, timeout: float = 15) -> str:
        """Everything up to EOF (the child must be exiting)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stderr did not close"
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        return "".join(self.lines)


@contextlib.contextmanager
def child(*args: str, **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    """The CLI in its own process; killed if a failed assertion leaves it running, pipes closed."""
    with batchrun_process(*args, **kwargs) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(360)
def test_soak_20000_rows_with_30_percent_faults(tmp_path: Path) -> None:
    rng = random.Random(2024)
    rows = article_rows(20_000)
    rng.shuffle(rows)  # input order differs from id order
    faulted: set[int] = set()
    for row in rows:
        if rng.random() < 0.3:
            row["text"] += " " + rng.choice(SOAK_FAULTS)
            faulted.add(row["id"])
    config = SimulatorConfig(api_key=TEST_KEY, error_rate=0.05, retry_after_s=0.01, seed=11)
    with serve_in_thread(config) as sim:
        job = write_job(
            tmp_path,
            rows,
            sim.base_url,
            concurrency=64,
            retry={"max_attempts": 8, "initial_backoff_s": 0.001, "max_backoff_s": 0.02},
        )
        started = time.monotonic()
        # Its own process: the CLI and the simulator each get a core (and a GIL) of their own.
        # About 20 s on an idle 2-core machine; the timeout only stops a hang, however busy the machine.
        result = run_batchrun(str(job), "-q", timeout=300)
        wall_s = time.monotonic() - started

    print(f"\nsoak: {len(rows)} rows, {len(faulted)} faults injected, {wall_s:.1f} s wall")
    assert result.returncode == 0, result.stderr
    out = read_output(job)
    assert out["id"].to_list() == [r["id"] for r in rows]
    assert out["id"].n_unique() == len(rows)
    assert set(out["status"]) == {"ok"}
    assert out["attempts"].sum() == sim.stats.requests
    faulted_attempts = out.filter(pl.col("id").is_in(sorted(faulted)))["attempts"]
    assert faulted_attempts.len() == len(faulted) > 5000
    assert faulted_attempts.min() >= 2
    # Every row answered exactly once: no lost row, no row paid for twice.
    assert len(sim.stats.ok_by_user_message) == len(rows)
    assert max(sim.stats.ok_by_user_message.values()) == 1


def test_hung_requests_time_out_and_fail_fast(tmp_path: Path) -> None:
    rows = article_rows(24)
    hung = [3, 11, 17]
    for i in hung:  # far longer than any run of this test, however busy the machine
        rows[i]["text"] += " [[sleep:60000]]"
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        job = write_job(
            tmp_path,
            rows,
            sim.base_url,
            endpoint={"base_url": sim.base_url, "api_key_env": "BATCHRUN_TEST_KEY", "timeout_s": 0.3},
            retry={"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.05},
        )
        started = time.monotonic()
        result = invoke("run", str(job))
        wall_s = time.monotonic() - started

    print(f"\ntimeouts: {len(hung)} hung rows, {wall_s:.2f} s wall")
    assert result.exit_code == 1, result.output
    out = read_output(job)
    assert out["id"].to_list() == [r["id"] for r in rows]
    failed = out.filter(pl.col("status") == "failed")
    assert failed["id"].to_list() == [rows[i]["id"] for i in hung]
    assert set(failed["error_kind"]) == {"timeout"}
    assert failed["attempts"].to_list() == [2, 2, 2]
    # The last attempt was cut at its 0.3 s timeout, not after the 60 s the server would take.
    assert failed["latency_ms"].max() < 30_000
    assert out.filter(pl.col("status") == "ok").height == len(rows) - len(hung)
    assert f"timeout: {len(hung)}" in result.stderr
    # Waiting out a sleep would take 60 s per attempt; two 0.3 s attempts take about 0.6 s at the
    # least (less a little: uvloop arms timers from the clock it read at the start of its turn).
    assert 0.5 <= wall_s < 30


def test_server_goes_away_and_comes_back(tmp_path: Path) -> None:
    rows = article_rows(120)
    port = free_port()
    # Stopping the simulator cuts the requests in flight (300 ms each) and cancels their answers:
    # this once left a coroutine never awaited, an error under filterwarnings=error.
    config = SimulatorConfig(api_key=TEST_KEY, latency_ms=300)
    job = write_job(
        tmp_path,
        rows,
        f"http://127.0.0.1:{port}/v1",
        concurrency=8,
        retry={"max_attempts": 10, "initial_backoff_s": 0.05, "max_backoff_s": 0.5},
    )
    with contextlib.ExitStack() as first_server:
        first = first_server.enter_context(serve_in_thread(config, port=port))
        with child(str(job), "-q") as proc:
            wait_for_rows(job, at_least=24)
            first_server.close()  # the server goes away: requests in flight are dropped
            with serve_in_thread(config, port=port) as second:  # and comes back on the same port
                _, stderr = proc.communicate(timeout=45)

    assert proc.returncode == 0, stderr
    out = read_output(job)
    assert out["id"].to_list() == [r["id"] for r in rows]
    assert set(out["status"]) == {"ok"}
    assert out["attempts"].max() >= 2  # some rows did meet the outage and were retried
    assert 24 <= len(first.stats.ok_by_user_message) < len(rows)
    assert len(second.stats.ok_by_user_message) > 0
    answered = set(first.stats.ok_by_user_message) | set(second.stats.ok_by_user_message)
    assert len(answered) == len(rows)


def test_exhausted_retries_fail_the_row_and_group_it(tmp_path: Path) -> None:
    rows = article_rows(10)
    rows[4]["text"] += " [[fail:503x99]]"
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, retry_after_s=0.01)) as sim:
        job = write_job(
            tmp_path,
            rows,
            sim.base_url,
            retry={"max_attempts": 3, "initial_backoff_s": 0.001, "max_backoff_s": 0.02},
        )
        result = invoke("run", str(job))

    assert result.exit_code == 1, result.output
    out = read_output(job)
    failed = out.filter(pl.col("status") == "failed")
    assert failed["id"].to_list() == [rows[4]["id"]]
    assert failed["error_kind"].to_list() == ["http_503"]
    assert failed["attempts"].to_list() == [3]
    assert sim.stats.by_status[503] == 3
    assert sim.stats.requests == 9 + 3
    assert "1 failed (http_503: 1)" in result.stderr


def test_sigterm_stops_like_the_first_ctrl_c(tmp_path: Path) -> None:
    rows = article_rows(300)
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, latency_ms=20)) as sim:
        job = write_job(tmp_path, rows, sim.base_url, concurrency=4)
        with child(str(job)) as proc:
            wait_for_rows(job, at_least=20)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=15)
            stop_s = time.monotonic() - signalled

    print(f"\nSIGTERM: exited {stop_s:.2f} s after the signal")
    assert proc.returncode == 130, stderr
    assert stop_s < 5
    assert "SIGTERM received" in stderr
    assert f"rerun `batchrun {job}` to resume" in stderr
    out = read_output(job)
    assert out["id"].to_list() == [r["id"] for r in rows]
    assert out["id"].n_unique() == len(rows)
    assert set(out["status"]) == {"ok", "pending"}
    done = out.filter(pl.col("status") == "ok").height
    assert 20 <= done < len(rows)
    assert done == len(sim.stats.ok_by_user_message)  # every answered row was kept


def test_second_sigint_exits_at_once_and_checkpoint_stays_consistent(tmp_path: Path) -> None:
    rows = article_rows(60)
    quick = 30
    for row in rows[quick:]:
        row["text"] += " [[sleep:20000]]"  # these stay in flight far past the 10 s grace
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        job = write_job(
            tmp_path,
            rows,
            sim.base_url,
            concurrency=4,
            endpoint={"base_url": sim.base_url, "api_key_env": "BATCHRUN_TEST_KEY", "timeout_s": 60},
        )
        with child(str(job)) as proc:
            stderr = StderrLines(proc)
            wait_for_rows(job, at_least=quick)
            deadline = time.monotonic() + 15
            while sim.stats.requests < quick + 4:  # all four workers are on sleeping rows
                assert time.monotonic() < deadline, "the sleeping rows were never sent"
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            stderr.wait_for("SIGINT received")
            signalled = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=15)
            stop_s = time.monotonic() - signalled
            text = stderr.rest()
        sent = sim.stats.requests

        print(f"\nsecond SIGINT: exited {stop_s:.2f} s after it")
        assert proc.returncode == 130, text
        assert stop_s < 3
        assert "stopped at once" in text
        with sqlite3.connect(checkpoint_path(job)) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            statuses = db.execute("SELECT status, COUNT(*) FROM results GROUP BY 1").fetchall()
        assert statuses == [("ok", quick)]

        rerun = run_batchrun(str(job), "--limit", str(quick))

        assert rerun.returncode == 0, rerun.stderr
        assert f"resuming: {quick} of {quick} rows already done" in rerun.stderr
        assert sim.stats.requests == sent
        out = read_output(job)
        assert out["id"].to_list() == [r["id"] for r in rows[:quick]]
        assert set(out["status"]) == {"ok"}


@settings(max_examples=4, deadline=None, database=None)
@given(thresholds=st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=3).map(sorted))
def test_kill_9_at_any_row_count_resumes_to_every_row_once(thresholds: list[int]) -> None:
    n, concurrency = 150, 4
    rows = article_rows(n)
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve_in_thread(SimulatorConfig(api_key=TEST_KEY, latency_ms=5)) as sim,
    ):
        job = write_job(Path(tmp), rows, sim.base_url, concurrency=concurrency)
        kills = 0
        for threshold in thresholds:
            with child(str(job), "-q") as proc:
                wait_for_rows(job, at_least=threshold)
                proc.kill()
                proc.communicate(timeout=10)
            assert proc.returncode in (-9, 0)  # 0: the job finished before the kill landed
            kills += proc.returncode == -9
        final = run_batchrun(str(job), "-q")

        assert final.returncode == 0, final.stderr
        out = read_output(job)
        assert out["id"].to_list() == [r["id"] for r in rows]
        assert set(out["status"]) == {"ok"}
        assert len(sim.stats.ok_by_user_message) == n
        # Only rows in flight when a kill landed may have been answered twice.
        assert sum(sim.stats.ok_by_user_message.values()) - n <= kills * concurrency


def _limit_file_size(max_bytes: int) -> Any:
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


def test_checkpoint_write_failure_stops_the_job(tmp_path: Path) -> None:
    rows = article_rows(2000)
    # Tests run as root, so chmod cannot make the checkpoint unwritable; a file size limit can:
    # the WAL passes 288 KiB after the input's index (~150 KiB for 2000 rows, #13), the schema's
    # migration steps (each a transaction of its own) and a few dozen rows. Three runs, since the
    # stray traceback this catches comes from garbage collection and does not show every time.
    for run in range(3):
        output = tmp_path / f"run{run}" / "result.parquet"
        with (
            serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim,
            child(
                str(write_job(tmp_path, rows, sim.base_url)),
                "-q",
                "--output",
                str(output),
                preexec_fn=_limit_file_size(288 * 1024),
            ) as proc,
        ):
            _, stderr = proc.communicate(timeout=30)

        assert proc.returncode == 2, stderr
        assert "Traceback" not in stderr, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        checkpoint = output.with_name(output.name + ".checkpoint.sqlite")
        assert lines[0].startswith(f"Error: cannot write checkpoint {checkpoint}")
        assert sim.stats.requests < len(rows)  # it stopped instead of carrying on
        with sqlite3.connect(checkpoint) as db:  # what was committed before the fault is intact
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert 0 < db.execute("SELECT COUNT(*) FROM results").fetchone()[0] < len(rows)
