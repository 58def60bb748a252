"""Results keyed by what was sent (#13 item 2): a changed input sends only the rows whose
request is new, counted at the simulator; a checkpoint of 0.2 is keyed by request or refused."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import polars as pl

from batchrun.checkpoint import open_checkpoint
from batchrun.simulator import RunningSimulator
from tests.conftest import article_rows, checkpoint_path, invoke, read_output, write_job

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"


def sent_by(simulator: RunningSimulator, *args: str) -> int:
    """Requests the simulator received during one `batchrun run`."""
    before = simulator.stats.requests
    result = invoke("run", *args)
    assert result.exit_code == 0, result.output
    return simulator.stats.requests - before


def test_appended_edited_and_reordered_rows(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(10)
    job = write_job(tmp_path, rows, simulator.base_url)
    assert sent_by(simulator, str(job)) == 10
    answers = dict(read_output(job).select("id", "response_id").rows())

    write_job(tmp_path, [*rows, *article_rows(13)[10:]], simulator.base_url)
    assert sent_by(simulator, str(job)) == 3  # appended: only they

    edited = [*rows, *article_rows(13)[10:]]
    edited[4] = {**edited[4], "text": "Fixed text."}
    edited[7] = {**edited[7], "title": "Fixed title"}
    write_job(tmp_path, edited, simulator.base_url)
    assert sent_by(simulator, str(job)) == 2  # edited: only they

    write_job(tmp_path, edited[::-1], simulator.base_url)
    assert sent_by(simulator, str(job)) == 0  # reordered: nothing
    out = read_output(job)
    assert out["id"].to_list() == [r["id"] for r in edited[::-1]]  # in the input's order
    kept = {i: r for i, r in out.select("id", "response_id").rows() if i in answers and i not in (1004, 1007)}
    assert kept == {i: r for i, r in answers.items() if i not in (1004, 1007)}
    assert (out["status"] == "ok").all()


def test_limit_keeps_the_first_rows_keys_and_duplicates_stay_separate(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = article_rows(6)
    rows[3] = {**rows[1], "id": rows[3]["id"]}  # the same request as row 1, at temperature 0.2
    job = write_job(tmp_path, rows, simulator.base_url)

    assert sent_by(simulator, str(job), "--limit", "2") == 2
    assert sent_by(simulator, str(job)) == 4  # rows 2-5, the duplicate of row 1 included

    out = read_output(job)
    assert out.height == 6 and (out["status"] == "ok").all()
    with sqlite3.connect(checkpoint_path(job)) as db:
        occurrences = db.execute("SELECT occurrence FROM rows ORDER BY row").fetchall()
        results = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert [o for (o,) in occurrences] == [0, 0, 0, 1, 0, 0]
    assert results == 6  # two samples of the same request, each its own result


def test_retry_failed_sends_the_failed_rows_only(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(6)
    rows[2] = {**rows[2], "text": rows[2]["text"] + " [[fail:400]]"}
    job = write_job(tmp_path, rows, simulator.base_url)
    first = invoke("run", str(job))
    assert first.exit_code == 1 and simulator.stats.requests == 6

    retried = invoke("run", str(job), "--retry-failed")

    assert retried.exit_code == 1
    assert simulator.stats.requests == 7  # row 2 again, no other
    assert read_output(job)["status"].to_list() == ["ok", "ok", "failed", "ok", "ok", "ok"]


def test_a_checkpoint_of_0_1_for_another_input_is_refused(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE, tmp_path / "job")
    job = tmp_path / "job" / "job.yaml"
    data = tmp_path / "job" / "input.csv"
    data.write_text(data.read_text() + "1012,Story 12,Lead sentence of story 12.\n")

    refused = invoke("run", str(job), "--simulate")
    status = invoke("status", str(job))

    expected = (
        "Error: checkpoint result.parquet.checkpoint.sqlite was made by batchrun 0.1 for another "
        "input or job, and keys its rows by position (finish it with batchrun 0.1 and the input as "
        "it was); pass --fresh to start over (its results will be discarded)\n"
    )
    assert (refused.exit_code, refused.stderr) == (2, expected)
    assert (status.exit_code, status.stderr) == (2, expected)
    with sqlite3.connect(tmp_path / "job" / "out" / "result.parquet.checkpoint.sqlite") as db:
        # The refused migration step (its key pass too) rolled back whole: the file is as 0.1 left it.
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [
            ("results",),
            ("meta",),
        ]
        assert db.execute("PRAGMA user_version").fetchone() == (0,)
    fresh = invoke("run", str(job), "--simulate", "--fresh")
    assert fresh.exit_code == 1, fresh.output  # rows 1001 and 1004 fail (their marker)
    assert pl.read_parquet(tmp_path / "job" / "out" / "result.parquet").height == 13


def test_a_shorter_input_leaves_no_row_past_its_end(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(6)
    job = write_job(tmp_path, rows, simulator.base_url)
    assert sent_by(simulator, str(job)) == 6

    write_job(tmp_path, rows[:4], simulator.base_url)
    assert sent_by(simulator, str(job)) == 0

    assert read_output(job)["id"].to_list() == [r["id"] for r in rows[:4]]
    with sqlite3.connect(checkpoint_path(job)) as db:  # rewritten in place: the last 2 dropped
        assert db.execute("SELECT COUNT(*), MAX(row) FROM rows").fetchone() == (4, 3)


def test_occurrences_count_across_batches(tmp_path: Path) -> None:
    """The key pass's occurrence numbers (identical requests before a row), within a batch and
    from earlier batches; with dedupe, 0 for all and only the first of each is `first`."""
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    for dedupe, expected in ((False, ([0, 0, 1], [2, 0, 1])), (True, ([0, 0, 0], [0, 0, 0]))):
        checkpoint = open_checkpoint(tmp_path / f"{dedupe}.sqlite", "fresh", {})
        try:
            index = checkpoint.key_index(dedupe)
            first = index.add([0, 1, 2], [a, b, a])
            second = index.add([3, 4, 5], [a, c, b])
        finally:
            checkpoint.close()
        assert (first[0], second[0]) == expected
        assert (first[1], second[1]) == ([True, True, False], [False, True, False])


def test_closing_the_plan_waits_for_the_batch_being_keyed(tmp_path: Path) -> None:
    """A stopped run leaves a batch being keyed in a thread; the checkpoint's connections close
    only once it is done (closing SQLite under it crashed the process: a segfault in the suite)."""
    import threading

    from batchrun.job import load_job
    from batchrun.plan import prepare, run_plan

    job = prepare(load_job(write_job(tmp_path, article_rows(20_000), "http://127.0.0.1:9/v1")))
    checkpoint = open_checkpoint(job.checkpoint_path, "fresh", job.fingerprint(False))
    plan = run_plan(job, checkpoint, False)
    keyed: list[int] = []
    worker = threading.Thread(target=lambda: keyed.append(len(plan.next_batch() or [])))
    worker.start()
    while not plan._lock.locked() and worker.is_alive():  # the batch is being keyed
        pass
    plan.close()
    checkpoint.close()  # as run_job's end: with SQLite still in use by the batch, it failed
    worker.join()
    assert keyed and keyed[0] > 0, "the batch being keyed when the run ended did not complete"
    assert plan.next_batch() is None  # and no more is keyed
