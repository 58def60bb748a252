"""A resume of an input unchanged since its last complete key pass (its files' paths, sizes and
mtimes, the job's request-key parts) takes the rows to do from the checkpoint's index, without
the pass (#13, the all-but-one resume); any change makes the pass as before."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import batchrun
from batchrun.simulator import RunningSimulator
from tests.conftest import (
    article_rows,
    batchrun_process,
    checkpoint_path,
    invoke,
    read_output,
    write_job,
)
from tests.test_dedupe import duplicated_rows


def sent_by(simulator: RunningSimulator, *args: str, exit_code: int = 0) -> int:
    """Requests the simulator received during one `batchrun run`."""
    before = simulator.stats.requests
    result = invoke("run", *args)
    assert result.exit_code == exit_code, result.output
    return simulator.stats.requests - before


def indexed_input(job: Path) -> str | None:
    """The identity of the input the last complete key pass indexed, as the checkpoint holds it."""
    with sqlite3.connect(checkpoint_path(job)) as db:
        found = db.execute("SELECT value FROM meta WHERE key = 'input'").fetchone()
    return None if found is None else str(found[0])


def run_rows(job: Path, rows: set[int]) -> None:
    """A run that sends only `rows` (the Python API's rows=): the pass indexes every row."""
    batchrun.Job.from_yaml(job).run(rows=frozenset(rows), quiet=True)


def edit_behind_the_mtime(job: Path, old: str, new: str) -> None:
    """Change the input's bytes, keeping its size and mtime: what the identity cannot see."""
    data = job.parent / "input.csv"
    stat = data.stat()
    text = data.read_text()
    assert len(old) == len(new) and text.count(old) == 1
    data.write_text(text.replace(old, new))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_unchanged_input_is_resumed_from_the_index(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(10), simulator.base_url)
    run_rows(job, {0, 1, 2, 3, 4, 5, 6})
    # A finished row edited behind the mtime: the pass would see it and send it again; without
    # the pass only the rows to do are read.
    edit_behind_the_mtime(job, "Story 2,", "Story X,")

    assert sent_by(simulator, str(job)) == 3  # rows 7-9, no other
    assert indexed_input(job) is not None

    out = read_output(job)
    assert (out["status"] == "ok").all() and out.height == 10
    assert sent_by(simulator, str(job)) == 0


def test_a_row_to_do_changed_behind_the_mtime_stops_the_run(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = write_job(tmp_path, article_rows(10), simulator.base_url)
    run_rows(job, {0, 1, 2, 3, 4})
    edit_behind_the_mtime(job, "Story 8,", "Story Y,")

    stopped = invoke("run", str(job))

    data = tmp_path / "input.csv"
    assert (stopped.exit_code, stopped.stderr.splitlines()[-1] + "\n") == (
        2,
        f"Error: input {data}: row 9 changed while its file's size and modification time did "
        "not; stopped; run again to key the whole input\n",
    )
    assert indexed_input(job) is None and simulator.stats.requests == 5  # checked before sending
    assert sent_by(simulator, str(job)) == 5  # the pass: the rest, row 8 as it is now
    out = read_output(job)
    assert (out["status"] == "ok").all() and out["title"][8] == "Story Y"
    assert indexed_input(job) is not None


def test_a_touched_or_appended_input_makes_the_pass(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(10)
    job = write_job(tmp_path, rows, simulator.base_url)
    assert sent_by(simulator, str(job)) == 10
    first = indexed_input(job)
    edit_behind_the_mtime(job, "Story 2,", "Story X,")
    os.utime(tmp_path / "input.csv")  # touched: now it is seen

    assert sent_by(simulator, str(job)) == 1  # the edited row

    touched = indexed_input(job)
    assert touched is not None and touched != first
    write_job(tmp_path, [*rows, *article_rows(12)[10:]], simulator.base_url)
    assert sent_by(simulator, str(job)) == 2  # the appended rows (row 2 as it was: answered)
    assert indexed_input(job) not in (None, touched)
    assert read_output(job).height == 12


def test_a_pass_killed_leaves_no_identity(tmp_path: Path, simulator: RunningSimulator) -> None:
    """The pass drops the identity with its first batch: killed before its end, the index is
    partly rewritten and the next run makes the whole pass."""
    rows = article_rows(8200)  # two batches of the pass, the second keyed once the first is sent
    job = write_job(tmp_path, rows, simulator.base_url, concurrency=64)
    run_rows(job, {0})
    assert indexed_input(job) is not None
    os.utime(tmp_path / "input.csv", ns=(0, 0))  # another mtime: the next run makes the pass

    process = batchrun_process("run", str(job))
    deadline = time.monotonic() + 30
    while indexed_input(job) is not None:
        assert time.monotonic() < deadline, "the pass never started"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)

    assert indexed_input(job) is None
    before = simulator.stats.requests
    run_rows(job, set())  # sends nothing; its pass indexes every row and records the identity
    assert simulator.stats.requests == before
    assert indexed_input(job) is not None
    with sqlite3.connect(checkpoint_path(job)) as db:
        assert db.execute("SELECT COUNT(*), MAX(row) FROM rows").fetchone() == (8200, 8199)


def test_dedupe_and_retry_failed_from_the_index(tmp_path: Path, simulator: RunningSimulator) -> None:
    """The rows to do as a pass finds them: with dedupe the first row of each request (the
    others reuse its answer); with --retry-failed the failed rows."""
    rows = duplicated_rows()
    rows[4] = {**rows[4], "text": rows[4]["text"][:-15] + "[[fail:400x1]]"}  # the same length
    job = write_job(tmp_path, rows, simulator.base_url, dedupe=True)
    run_rows(job, {0, 4})
    edit_behind_the_mtime(job, "1000,Story 0,", "1000,Story Z,")  # done: not read again

    assert sent_by(simulator, str(job), exit_code=1) == 1  # 1002 (1005 reuses it); 1004 failed

    out = read_output(job)
    assert out["reused_from"].to_list() == [None, "1000", None, "1000", None, "1002"]
    assert out["status"].to_list() == ["ok", "ok", "ok", "ok", "failed", "ok"]
    assert sent_by(simulator, str(job), "--retry-failed") == 1  # 1004, answered now
    assert (read_output(job)["status"] == "ok").all()
    assert indexed_input(job) is not None


def test_readers_take_the_index_of_an_unchanged_input(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(10), simulator.base_url)
    run_rows(job, {0, 1, 2, 3, 4, 5, 6})
    edit_behind_the_mtime(job, "Story 2,", "Story X,")  # what only a key pass would see

    trusted = invoke("status", str(job))

    assert trusted.exit_code == 0, trusted.output
    assert trusted.stdout.splitlines()[0] == "ok: 7"  # the index as the run's pass left it

    os.utime(tmp_path / "input.csv")  # a new mtime: the reader makes its own pass
    passed = invoke("status", str(job))

    assert passed.exit_code == 0, passed.output
    assert passed.stdout.splitlines()[0] == "ok: 6"  # row 2's request changed: not done
