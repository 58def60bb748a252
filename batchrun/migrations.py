"""The checkpoint's schema as an ordered list of small named steps (as simonw/llm's migrations.py
does): opening a checkpoint applies the steps it lacks, each once, in a transaction of its own
that also records it in `migrations`, so a kill at any instant leaves a schema some list prefix
made. A new checkpoint takes every step; a writer applies them in place, a reader in a private
copy (Checkpoint.migrate); so every query is written against one schema, the current one.

`PRAGMA user_version` is kept equal to the number of steps applied: a batchrun from before this
list reads it to refuse a checkpoint newer than itself, and in a checkpoint made before the list
it says which steps it has (the first user_version of them; 0 with a `results` table: the first).

A released step never changes: it names the columns it made, so an old checkpoint and a new one
reach the same schema by the same steps. Adding a result column: declare it as a field of
results.RowResult and append `added_column(name)` (null for the rows recorded).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from batchrun import history, ledger
from batchrun.results import RESULT_KEY, STORED

# Fills `rows` with the input's rows keyed as the job the checkpoint records made them, or raises
# CheckpointError (another job or input): the job, for the one step that needs it.
KeyRows = Callable[[], None]
Step = Callable[[sqlite3.Connection, KeyRows], None]

ROWS_TABLE = "(row INTEGER PRIMARY KEY, request_key BLOB NOT NULL, occurrence INTEGER NOT NULL)"
# The results' columns before schema 2 (batchrun 0.1); one of schema 0 may lack some of them.
_BY_POSITION = (
    "row", "id", "fields", "content", "tool_calls", "finish_reason", "prompt_tokens", "completion_tokens",
    "total_tokens", "cached_tokens", "reasoning_tokens", "cost_usd", "status", "error_kind", "error",
    "attempts", "latency_ms", "ttft_ms", "model", "response_id",
)  # fmt: skip


@dataclass(frozen=True)
class Migration:
    name: str
    apply: Step  # in the caller's transaction


def declared(names: Collection[str]) -> list[str]:
    """`name TYPE` of the result columns `names`, as results.RowResult declares them, in its order."""
    return [f"{c.name} {c.sql}" for c in STORED if c.name in names]


def _results_by_position(db: sqlite3.Connection, _: KeyRows) -> None:
    """Schema 1: one result per input row, by position; `meta` for the job's fingerprint."""
    columns = ["row INTEGER PRIMARY KEY", *declared(_BY_POSITION[1:])]
    db.execute(f"CREATE TABLE results ({', '.join(columns)})")
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")


def key_by_request(db: sqlite3.Connection, key_rows: KeyRows) -> None:
    """Schema 2: results keyed by the request they answer (RESULT_KEY), so an edited input reuses
    every answer whose request it still makes; `rows` maps the input's rows to requests. The
    results recorded are keyed through `rows` as their job made them (`key_rows`)."""
    had = {name for _, name, *_ in db.execute("PRAGMA main.table_info(results)")}
    db.execute(f"CREATE TABLE IF NOT EXISTS rows {ROWS_TABLE}")  # an older batchrun's rekey may have begun it
    if db.execute("SELECT 1 FROM results LIMIT 1").fetchone():
        key_rows()
    wanted = {*RESULT_KEY, *_BY_POSITION}
    names = [c.name for c in STORED if c.name in wanted]
    moved = ", ".join(
        f"r.{c}" if c in RESULT_KEY else f"o.{c}" if c in had else f"NULL AS {c}" for c in names
    )
    db.execute("ALTER TABLE results RENAME TO results_by_position")
    db.execute(f"CREATE TABLE results ({', '.join(declared(wanted))}, PRIMARY KEY ({', '.join(RESULT_KEY)}))")
    select = f"SELECT {moved} FROM results_by_position o JOIN rows r USING (row)"
    db.execute(f"INSERT INTO results ({', '.join(names)}) {select}")
    db.execute("DROP TABLE results_by_position")


def _runs_and_attempts(db: sqlite3.Connection, _: KeyRows) -> None:
    """Schema 3: the record of runs and of every request sent (history.py)."""
    history.create_tables(db)


def _results_by_row(db: sqlite3.Connection, _: KeyRows) -> None:
    """Schema 4: the results by the row they were sent for, so that the output build reads them
    in row order instead of probing the key index at random (checkpoint.RESULT_OF_ROW)."""
    db.execute("CREATE INDEX results_by_row ON results (row, request_key, occurrence)")


def _provider_batches(db: sqlite3.Connection, _: KeyRows) -> None:
    """The record of provider batches: each submission and its rows (batch/ledger.py)."""
    ledger.create_tables(db)


def _batch_parts(db: sqlite3.Connection, _: KeyRows) -> None:
    """Provider batches added to in parts (xAI's protocol), and named at the provider."""
    ledger.add_parts(db)


def added_column(name: str) -> Migration:
    """The step that adds the result column `name`, as results.RowResult declares it."""

    def add(db: sqlite3.Connection, _: KeyRows) -> None:
        db.execute(f"ALTER TABLE results ADD COLUMN {declared([name])[0]}")

    return Migration(f"add_{name}", add)


MIGRATIONS = (
    Migration("results_by_position", _results_by_position),
    Migration("results_keyed_by_request", key_by_request),
    Migration("runs_and_attempts", _runs_and_attempts),
    Migration("results_by_row", _results_by_row),
    added_column("system_fingerprint"),
    Migration("provider_batches", _provider_batches),
    added_column("batch_id"),
    Migration("batch_parts", _batch_parts),
)
SCHEMA_VERSION = len(MIGRATIONS)  # PRAGMA user_version of a checkpoint with every step applied


def _applied(db: sqlite3.Connection) -> list[str]:
    """The names of the steps `db` has, in order."""
    if _has_table(db, "migrations"):
        return [name for (name,) in db.execute("SELECT name FROM migrations ORDER BY rowid")]
    version = int(db.execute("PRAGMA main.user_version").fetchone()[0])  # made before this list
    return [m.name for m in MIGRATIONS[: version or int(_has_table(db, "results"))]]


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM main.sqlite_master WHERE name = ?", (name,)).fetchone() is not None


def pending(db: sqlite3.Connection) -> list[Migration]:
    """The steps `db` lacks, in the order they apply."""
    done = set(_applied(db))
    return [m for m in MIGRATIONS if m.name not in done]


def apply(
    db: sqlite3.Connection,
    transaction: Callable[[], contextlib.AbstractContextManager[None]],
    key_rows: KeyRows,
) -> None:
    """Apply the steps `db` lacks, each in a `transaction` of its own with its record."""
    done = _applied(db)
    for step in pending(db):
        with transaction():
            step.apply(db, key_rows)
            db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied REAL)")
            # A checkpoint made before this list: the steps its user_version stands for, undated.
            db.executemany("INSERT OR IGNORE INTO migrations (name) VALUES (?)", ((n,) for n in done))
            db.execute("INSERT INTO migrations VALUES (?, ?)", (step.name, time.time()))
            done.append(step.name)
            db.execute(f"PRAGMA user_version = {len(done)}")
