"""The checkpoint across versions (the column registry, additive migration) and the one way of
opening it that every reader shares (#12 items 4 and 7)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import typing
from dataclasses import fields
from pathlib import Path

import polars as pl
import pytest

from batchrun.checkpoint import open_checkpoint
from batchrun.migrations import MIGRATIONS, SCHEMA_VERSION
from batchrun.results import NAMES, OUTPUT_RESULT_COLUMNS, STORED, RowResult
from batchrun.simulator import RunningSimulator
from batchrun.simulator.endpoint import SYSTEM_FINGERPRINT
from tests.conftest import article_rows, checkpoint_path, invoke, read_output, write_job

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"


def previous_release_job(tmp_path: Path) -> Path:
    """A copy of the job whose checkpoint the release before the registry wrote: rows 0-7 done
    (1001 and 1004 failed with HTTP 400), rows 8-11 pending; made with --simulate."""
    shutil.copytree(FIXTURE, tmp_path / "job")
    return tmp_path / "job" / "job.yaml"


def sql(job: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(checkpoint_path(job)) as db:
        return db.execute(query).fetchall()


def test_each_stored_column_has_the_python_type_of_its_sql_type() -> None:
    hints = typing.get_type_hints(RowResult)
    python_type = {"INTEGER": int, "BLOB": bytes, "REAL": float, "TEXT": str}
    assert [f.name for f in fields(RowResult) if f.name != "tries"] == list(NAMES)
    for column in STORED:
        declared = hints[column.name]
        assert column.sql is not None, column.name
        assert python_type[column.sql] in (declared, *typing.get_args(declared)), column.name


# tests/fixtures/checkpoint_vN: made by batchrun 0.N, which had the first N steps of migrations.py.
RELEASES = range(1, 5)


def schema(db_path: Path) -> dict[str, object]:
    """A checkpoint's tables (each with its columns as PRAGMA table_info gives them) and indexes."""
    with sqlite3.connect(db_path) as db:
        found = db.execute("SELECT name, type FROM sqlite_master WHERE tbl_name != 'migrations'").fetchall()
        return {name: db.execute(f"PRAGMA table_info({name})").fetchall() or kind for name, kind in found}


@pytest.mark.parametrize("steps", RELEASES, ids=[f"0.{n}" for n in RELEASES])
def test_a_checkpoint_of_each_release_is_read_then_resumed_into_the_current_schema(
    tmp_path: Path, steps: int
) -> None:
    """Rows 0-7 done (1001 and 1004 failed with HTTP 400), rows 8-11 pending; made with --simulate."""
    shutil.copytree(Path(__file__).parent / "fixtures" / f"checkpoint_v{steps}", tmp_path / "job")
    job = tmp_path / "job" / "job.yaml"
    before = {r: (s, rid) for r, s, rid in sql(job, "SELECT row, status, response_id FROM results")}
    recorded = checkpoint_path(job).read_bytes()

    status = invoke("status", str(job))  # readers migrate a private copy: the file stays as it was
    cost = invoke("cost", str(job), "--by", "status", "--format", "csv")
    page = invoke("report", str(job))

    assert status.exit_code == 0, status.output
    assert status.stdout.splitlines()[:2] + status.stdout.splitlines()[4:6] == [
        "ok: 6", "failed: 2 (http_400: 2)", "pending: 4", "of: 12"
    ]  # fmt: skip
    assert cost.exit_code == 0, cost.output
    assert [line.split(",")[:3] for line in cost.stdout.splitlines()[1:4]] == [
        ["failed", "grok-4.3", "2"], ["ok", "grok-4.3", "6"], ["pending", "", "4"]
    ]  # fmt: skip
    assert page.exit_code == 0, page.output
    assert checkpoint_path(job).read_bytes() == recorded

    resumed = invoke("run", str(job), "--simulate")

    assert resumed.exit_code == 1, resumed.output  # finished, two rows failed (as recorded)
    assert "resuming: 8 of 12 rows already done" in resumed.stderr
    report = json.loads((job.parent / "out" / "result.parquet.report.json").read_text())
    assert report["this_run"]["requests"] == 4  # only the pending rows were sent
    out = read_output(job)
    assert out.columns == ["id", "title", *OUTPUT_RESULT_COLUMNS]
    assert out["id"].to_list() == list(range(1000, 1012))
    assert out["status"].to_list() == ["ok", "failed", "ok", "ok", "failed"] + ["ok"] * 7
    assert out.head(8).select("status", "response_id").rows() == [before[r] for r in range(8)]
    new = open_checkpoint(tmp_path / "new.sqlite", "fresh", {})
    new.close()
    assert schema(checkpoint_path(job)) == schema(tmp_path / "new.sqlite")
    assert sql(job, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    if steps < len(MIGRATIONS):  # the steps it had, undated, then those applied now
        applied = sql(job, "SELECT name, applied IS NOT NULL FROM migrations ORDER BY rowid")
        assert applied == [(m.name, n >= steps) for n, m in enumerate(MIGRATIONS)]


def test_each_migration_is_applied_once_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    open_checkpoint(path, "fresh", {}).close()
    with sqlite3.connect(path) as db:
        applied = db.execute("SELECT name, applied FROM migrations ORDER BY rowid").fetchall()

    open_checkpoint(path, "resume", {}).close()
    open_checkpoint(path, "read", {}).close()

    assert [name for name, _ in applied] == [m.name for m in MIGRATIONS]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name, applied FROM migrations ORDER BY rowid").fetchall() == applied
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)


def test_a_column_new_since_the_checkpoint_is_added_in_place(tmp_path: Path) -> None:
    """0.4 wrote no system_fingerprint: a reader reads the file as it is; the writer adds the column."""
    shutil.copytree(Path(__file__).parent / "fixtures" / "checkpoint_v4", tmp_path / "job")
    job = tmp_path / "job" / "job.yaml"

    status = invoke("status", str(job))

    assert status.exit_code == 0, status.output
    assert status.stdout.splitlines()[:2] == ["ok: 6", "failed: 2 (http_400: 2)"]
    assert "system_fingerprint" not in {c for _, c, *_ in sql(job, "PRAGMA table_info(results)")}

    resumed = invoke("run", str(job), "--simulate")

    assert resumed.exit_code == 1, resumed.output
    assert sql(job, "SELECT COUNT(*), COUNT(system_fingerprint) FROM results") == [(12, 4)]
    out = read_output(job)
    assert out["system_fingerprint"].to_list() == [None] * 8 + [SYSTEM_FINGERPRINT] * 4  # old rows: unknown
    assert out["response_id"].null_count() == 2  # the failed rows; the others kept theirs


def test_checkpoint_of_a_newer_release_is_refused(tmp_path: Path) -> None:
    job = previous_release_job(tmp_path)
    sql(job, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    expected = (
        f"Error: checkpoint result.parquet.checkpoint.sqlite was made by a newer batchrun (checkpoint "
        f"schema {SCHEMA_VERSION + 1}, this one reads up to {SCHEMA_VERSION}); upgrade batchrun to "
        "resume it, or move it away to start over\n"
    )
    for command in ("run", "status"):
        refused = invoke(command, str(job), *(["--simulate"] if command == "run" else []))
        assert (refused.exit_code, refused.stderr) == (2, expected)
    assert sql(job, "SELECT COUNT(*) FROM results") == [(8,)]


def test_readers_take_the_checkpoint_of_a_simulated_run(tmp_path: Path) -> None:
    job = previous_release_job(tmp_path)  # made with --simulate; the job names a real endpoint

    status = invoke("status", str(job))
    cost = invoke("cost", str(job), "--format", "json")

    assert status.exit_code == 0 and status.stdout.splitlines()[4:6] == ["pending: 4", "of: 12"]
    assert cost.exit_code == 0, cost.output
    assert pl.DataFrame(json.loads(cost.stdout)).filter(pl.col("model") == "total")["rows"].item() == 12


def test_a_checkpoint_with_no_row_takes_the_corrected_job(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    """A run stopped before any row (here: nothing listens, model check skipped) leaves an empty
    checkpoint bound to the wrong URL; once the URL is fixed the job runs without --fresh."""
    rows = article_rows(5)
    job = write_job(tmp_path, rows, "http://127.0.0.1:9/v1")
    first = invoke("run", str(job), "--no-check-model")
    assert first.exit_code == 4, first.output
    assert checkpoint_path(job).exists()

    write_job(tmp_path, rows, simulator.base_url)
    second = invoke("run", str(job))

    assert second.exit_code == 0, second.output
    assert read_output(job)["status"].to_list() == ["ok"] * 5
