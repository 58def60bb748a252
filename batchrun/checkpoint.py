"""The durable record of finished rows: SQLite in WAL mode, one transaction per batch of results.

WAL with synchronous=NORMAL survives the process being killed at any instant (a committed
transaction is in the WAL file before commit returns); only a power loss can take back the
last few commits. Rows are keyed by their 0-based position in the input, which is stable
because the input's content hash is part of the job fingerprint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import operator
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import IO, Any, Literal

from batchrun.errors import CheckpointError
from batchrun.results import ANSWER_COLUMNS, COLUMNS, NAMES, SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class RowResult:
    """What one row came to: a row of the registry's columns (results.py; a test keeps them equal)."""

    row: int
    id: str
    status: str  # ok | failed | skipped
    _: KW_ONLY
    fields: str | None = None  # JSON text: the parsed output.fields, typed columns in the output
    content: str | None = None
    tool_calls: str | None = None  # JSON text: [{id, name, arguments}]
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: float | None = None
    error_kind: str | None = None
    error: str | None = None
    attempts: int = 0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    model: str | None = None
    response_id: str | None = None

    @property
    def answered(self) -> bool:
        """Whether the row got an answer (ok, or failed on one), and so was billed."""
        return self.status == "ok" or any(getattr(self, c) is not None for c in ANSWER_COLUMNS)


# Rows answered, and rows answered without usage, in SQL, for the whole checkpoint at once.
ANSWERED_SQL = f"(status = 'ok' OR {' OR '.join(f'{c} IS NOT NULL' for c in ANSWER_COLUMNS)})"
NO_USAGE_SQL = "(prompt_tokens IS NULL OR completion_tokens IS NULL)"

_as_row = operator.attrgetter(*NAMES)  # dataclasses.astuple deep-copies: ~20x slower per row
_INSERT = f"INSERT OR REPLACE INTO results ({', '.join(NAMES)}) VALUES ({', '.join('?' for _ in NAMES)})"

Fingerprint = dict[str, Any]
# read: look, never write (status, cost, estimate); resume / fresh: become the one writer, bring
# the table up to this version's columns, and keep (resume) or discard (fresh) the rows recorded.
Mode = Literal["read", "resume", "fresh"]


@dataclass(frozen=True)
class Totals:
    ok: int
    failed: int
    skipped: int
    prompt_tokens: int | None  # over the rows that reported usage; None: answers came, none did
    completion_tokens: int | None
    without_usage: int  # answered rows that reported no usage (llama.cpp's streams, for one)


def open_checkpoint(path: Path, mode: Mode, *made_for: Fingerprint) -> Checkpoint:
    """Open a job's checkpoint if it was made for the job as it is now (one of `made_for`), else
    refuse and name what changed; every reader and the writer check the same way.

    Readers pass the job as run on its endpoint and as run with --simulate: either run's
    checkpoint is the job's. The writer passes the one fingerprint it binds the checkpoint to.
    """
    checkpoint = Checkpoint(path, mode)
    try:
        if mode != "read":
            checkpoint.lock()
            checkpoint.migrate()
        checkpoint.check(made_for, fresh=mode == "fresh")
        if mode != "read":
            checkpoint.bind(made_for[0], fresh=mode == "fresh")
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint


class Checkpoint:
    """One job's finished rows and the fingerprint of the job that produced them."""

    def __init__(self, path: Path, mode: Mode):
        self.path = path
        self._lock_file: IO[str] | None = None
        try:
            if mode != "read":  # a reader makes no file and changes nothing in one
                path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            if mode != "read":
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            self._columns = {name for _, name, *_ in self._db.execute("PRAGMA table_info(results)")}
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot open checkpoint {path}: {exc}") from None
        if self._version > SCHEMA_VERSION:
            self._db.close()
            raise CheckpointError(
                f"checkpoint {path.name} was made by a newer batchrun (checkpoint schema "
                f"{self._version}, this one reads up to {SCHEMA_VERSION}); upgrade batchrun to "
                "resume it, or move it away to start over"
            )
        if mode == "read":
            self._read_as_current()

    def _read_as_current(self) -> None:
        """Let a reader see this version's columns without changing the file: temp tables (an
        empty checkpoint) or a temp view over an older table, with null for the columns it lacks;
        SQLite looks names up in `temp` first."""
        if not self._columns:
            columns = ", ".join(f"{c.name} {c.sql}" for c in COLUMNS)
            self._db.execute(f"CREATE TEMP TABLE results ({columns})")
            self._db.execute("CREATE TEMP TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        elif not self._columns.issuperset(NAMES):
            select = ", ".join(c if c in self._columns else f"NULL AS {c}" for c in NAMES)
            self._db.execute(f"CREATE TEMP VIEW results AS SELECT {select} FROM main.results")

    def migrate(self) -> None:
        """Bring the table to this version's columns in place: a new column is added (null for
        the rows already recorded), so a checkpoint of an older version resumes."""
        if self._version == SCHEMA_VERSION and self._columns:
            return
        with self._transaction():
            if not self._columns:
                columns = ", ".join(f"{c.name} {c.sql}" for c in COLUMNS)
                self._db.execute(f"CREATE TABLE results ({columns})")
            else:
                for column in COLUMNS:
                    if column.name not in self._columns:
                        self._db.execute(f"ALTER TABLE results ADD COLUMN {column.name} {column.sql}")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._columns = set(NAMES)
        self._version = SCHEMA_VERSION

    def lock(self) -> None:
        """Become the one writer of this checkpoint; the OS drops the lock when we die."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_file = lock_path.open("a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            raise CheckpointError(
                f"another batchrun ({holder}) is running this job and holds {self.path.name}; "
                "wait for it to finish or stop it first"
            ) from None
        self._lock_file.truncate(0)
        self._lock_file.write(f"pid {os.getpid()}")
        self._lock_file.flush()

    def close(self) -> None:
        self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()

    def fingerprint(self) -> Fingerprint | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        return json.loads(row[0]) if row else None

    def check(self, made_for: tuple[Fingerprint, ...], fresh: bool = False) -> None:
        """Refuse a checkpoint made for another version of the job, unless it is to be discarded."""
        old = self.fingerprint()
        if old is None or old in made_for or fresh or self._empty():
            return  # an empty checkpoint (a run stopped before any row) has nothing to protect
        closest = min(made_for, key=lambda f: sum(old.get(k) != f[k] for k in f))
        changed = [k for k in closest if old.get(k) != closest[k]]
        raise CheckpointError(
            f"the job's {', '.join(changed)} changed since checkpoint {self.path.name} was "
            "made; rerun with --fresh to start over (its results will be discarded), "
            "or restore the job as it was to resume"
        )

    def _empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM results LIMIT 1").fetchone() is None

    def bind(self, fingerprint: Fingerprint, fresh: bool) -> None:
        """Record the job version this checkpoint is for; `fresh` discards the rows recorded."""
        with self._transaction():
            if fresh:
                self._db.execute("DELETE FROM results")
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)",
                (json.dumps(fingerprint, sort_keys=True),),
            )

    def record(self, results: Iterable[RowResult]) -> None:
        """Commit a batch of finished rows in one transaction."""
        with self._transaction():
            self._db.executemany(_INSERT, map(_as_row, results))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """A write that lands whole or not at all; a failed write stops the job, never passes."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise CheckpointError(f"cannot write checkpoint {self.path}: {exc}") from None

    def reprice(self, pricing: str, cost: Callable[..., float | None]) -> int:
        """Recompute answered rows' cost if `pricing` (a description of the rates) changed since
        they were recorded, so one table never mixes two prices; returns the rows repriced.

        `cost` takes prompt, completion, total and cached tokens.
        """
        found = self._db.execute("SELECT value FROM meta WHERE key = 'pricing'").fetchone()
        if found is not None and found[0] == pricing:
            return 0
        usage = self._db.execute(
            "SELECT row, prompt_tokens, completion_tokens, total_tokens, cached_tokens FROM results"
            " WHERE status = 'ok'"
        ).fetchall()
        with self._transaction():
            self._db.executemany(
                "UPDATE results SET cost_usd = ? WHERE row = ?", ((cost(*u[1:]), u[0]) for u in usage)
            )
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('pricing', ?)", (pricing,))
        return len(usage)

    def spent_usd(self) -> float:
        """What the recorded rows cost, as far as it is known."""
        return float(self._db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM results").fetchone()[0])

    def rows_with_status(self, *statuses: str) -> set[int]:
        marks = ", ".join("?" for _ in statuses)
        query = f"SELECT row FROM results WHERE status IN ({marks})"
        return {r for (r,) in self._db.execute(query, statuses)}

    def status_counts(self, below: int) -> dict[str, int]:
        """Rows finished so far among the first `below`, by status."""
        query = "SELECT status, COUNT(*) FROM results WHERE row < ? GROUP BY 1"
        return dict(self._db.execute(query, (below,)).fetchall())

    def totals(self) -> Totals:
        ok, failed, skipped, prompt, completion, without_usage = self._db.execute(
            "SELECT COUNT(*) FILTER (WHERE status = 'ok'), COUNT(*) FILTER (WHERE status = 'failed'),"
            " COUNT(*) FILTER (WHERE status = 'skipped'), SUM(prompt_tokens), SUM(completion_tokens),"
            f" COUNT(*) FILTER (WHERE {ANSWERED_SQL} AND {NO_USAGE_SQL}) FROM results"
        ).fetchone()
        unknown = None if without_usage else 0  # no sum at all: unknown if answers came, else none
        return Totals(
            ok, failed, skipped, unknown if prompt is None else prompt,
            unknown if completion is None else completion, without_usage,
        )  # fmt: skip

    def failures_by_kind(self) -> dict[str, int]:
        query = (
            "SELECT error_kind, COUNT(*) FROM results WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC, 1"
        )
        return {kind or "unknown": n for kind, n in self._db.execute(query)}

    def top_errors(self, n: int = 3) -> list[tuple[str, int]]:
        """The `n` commonest messages of failed rows, as recorded, with how many rows had each."""
        query = (
            "SELECT COALESCE(error, '(no message)'), COUNT(*) FROM results WHERE status = 'failed'"
            " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?"
        )
        return self._db.execute(query, (n,)).fetchall()

    def results(self) -> list[tuple[Any, ...]]:
        """Every recorded row as a tuple in `results.NAMES` order."""
        return self._db.execute(f"SELECT {', '.join(NAMES)} FROM results ORDER BY row").fetchall()
