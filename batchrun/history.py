"""The checkpoint's record of how the job went: every run, and every request sent for a row.

`runs`: one line per run (start and end as Unix seconds, how it ended, the driver, its worker
processes, the requests it sent). `attempts`: one line per request sent for a row that finished,
written with the row in the same transaction (Checkpoint.record), so the record costs no commit
of its own; a row still in flight when a run stops leaves no attempt, as it leaves no result.
The HTML report (html_report.py) draws throughput, retries and 429s over time from them; the
core knows none of this: it hands each row's attempts over on the row (RowResult.tries).

Both tables are declared here the way results.py declares the results' columns; a checkpoint of
schema 2 gets them, empty, when it is next opened (the migration step runs_and_attempts).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from typing import Any

import polars as pl

from batchrun.results import Column, RowResult

_INT, _REAL, _TEXT = "INTEGER", "REAL", "TEXT"
ATTEMPT_COLUMNS: tuple[Column, ...] = (
    Column("run", _INT, pl.Int64(), False, "the run that sent it (runs.run)"),
    Column("row", _INT, pl.Int64(), False, "0-based position in the input of the row it was sent for"),
    Column("attempt", _INT, pl.Int64(), False, "1 for the row's first request, 2 for the next ..."),
    Column("final", _INT, pl.Int64(), False, "1 on the request that finished the row"),
    Column("sent", _REAL, pl.Float64(), False, "when it was sent, Unix seconds"),
    Column("answered", _REAL, pl.Float64(), False, "when its answer or failure came, Unix seconds"),
    Column("status", _INT, pl.Int64(), False, "HTTP status; null: no answer"),
    Column("error_kind", _TEXT, pl.String(), False, "why it failed, as RowResult.error_kind; null: ok"),
    Column("ttft_ms", _REAL, pl.Float64(), False, "time to the first token, streamed requests only"),
    Column("prompt_tokens", _INT, pl.Int64(), False, "prompt tokens its answer reported"),
    Column("completion_tokens", _INT, pl.Int64(), False, "completion tokens its answer reported"),
)  # fmt: skip
RUN_COLUMNS: tuple[Column, ...] = (
    Column("run", "INTEGER PRIMARY KEY", pl.Int64(), False, "1 for the job's first run, 2 for the next ..."),
    Column("started", _REAL, pl.Float64(), False, "Unix seconds"),
    Column("ended", _REAL, pl.Float64(), False, "Unix seconds; null: it died, or is still running"),
    Column("outcome", _TEXT, pl.String(), False, "finished, interrupted, stopped_by_budget or aborted"),
    Column("driver", _TEXT, pl.String(), False, "local (one process: CLI or Python API) or ray"),
    Column("workers", _INT, pl.Int64(), False, "processes that sent requests (Ray worker actors)"),
    Column("requests", _INT, pl.Int64(), False, "requests the run sent, retries included"),
)  # fmt: skip

TABLES = {
    "runs": ", ".join(f"{c.name} {c.sql}" for c in RUN_COLUMNS),
    "attempts": ", ".join(f"{c.name} {c.sql}" for c in ATTEMPT_COLUMNS),
}
INSERT_ATTEMPTS = f"INSERT INTO attempts VALUES ({', '.join('?' for _ in ATTEMPT_COLUMNS)})"


def create_tables(db: sqlite3.Connection) -> None:
    """The tables, where missing; in the caller's transaction (a migration step's)."""
    for name, columns in TABLES.items():
        db.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")


def attempt_rows(run: int, results: Iterable[RowResult]) -> Iterator[tuple[Any, ...]]:
    """The `attempts` lines of a batch of finished rows, in ATTEMPT_COLUMNS order."""
    for result in results:
        last = len(result.tries)
        for n, attempt in enumerate(result.tries, 1):
            yield (run, result.row, n, int(n == last), *attempt)


def begin_run(db: sqlite3.Connection, driver: str) -> int:
    """Record a run's start; its id. In the caller's transaction."""
    cursor = db.execute("INSERT INTO runs (started, driver) VALUES (?, ?)", (time.time(), driver))
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def end_run(db: sqlite3.Connection, run: int, outcome: str, requests: int, workers: int) -> None:
    db.execute(
        "UPDATE runs SET ended = ?, outcome = ?, requests = ?, workers = ? WHERE run = ?",
        (time.time(), outcome, requests, workers, run),
    )
