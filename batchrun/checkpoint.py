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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from batchrun.errors import CheckpointError


@dataclass(frozen=True, slots=True)
class RowResult:
    """What one row came to; the columns of the checkpoint and of the output."""

    row: int
    id: str
    status: str  # ok | failed | skipped
    content: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    error_kind: str | None = None
    error: str | None = None
    attempts: int = 0
    latency_ms: float | None = None
    model: str | None = None
    response_id: str | None = None
    ttft_ms: float | None = None
    tool_calls: str | None = None  # JSON text: [{id, name, arguments}]
    fields: str | None = None  # JSON text: the parsed output.fields, typed columns in the output
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: float | None = None

    @property
    def answered(self) -> bool:
        """Whether the row got an answer (ok, or failed on one), and so was billed."""
        return self.status == "ok" or any(
            v is not None for v in (self.finish_reason, self.content, self.tool_calls)
        )


# Rows answered, and rows answered without usage, in SQL, for the whole checkpoint at once.
ANSWERED_SQL = "(status = 'ok' OR finish_reason IS NOT NULL OR content IS NOT NULL OR tool_calls IS NOT NULL)"
NO_USAGE_SQL = "(prompt_tokens IS NULL OR completion_tokens IS NULL)"

COLUMNS = tuple(f.name for f in fields(RowResult))
_as_row = operator.attrgetter(*COLUMNS)  # dataclasses.astuple deep-copies: ~20x slower per row
_SQL_TYPES = {"row": "INTEGER PRIMARY KEY", "attempts": "INTEGER", "latency_ms": "REAL", "ttft_ms": "REAL"}
_SQL_TYPES |= {c: "INTEGER" for c in ("prompt_tokens", "completion_tokens", "total_tokens")}
_SQL_TYPES |= {"cached_tokens": "INTEGER", "reasoning_tokens": "INTEGER", "cost_usd": "REAL"}


@dataclass(frozen=True)
class Totals:
    ok: int
    failed: int
    skipped: int
    prompt_tokens: int | None  # over the rows that reported usage; None: answers came, none did
    completion_tokens: int | None
    without_usage: int  # answered rows that reported no usage (llama.cpp's streams, for one)


class Checkpoint:
    """One job's finished rows and the fingerprint of the job that produced them."""

    def __init__(self, path: Path):
        self.path = path
        self._lock_file: IO[str] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            columns = ", ".join(f"{c} {_SQL_TYPES.get(c, 'TEXT')}" for c in COLUMNS)
            self._db.execute(f"CREATE TABLE IF NOT EXISTS results ({columns})")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            found = tuple(name for _, name, *_ in self._db.execute("PRAGMA table_info(results)"))
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot open checkpoint {path}: {exc}") from None
        if found != COLUMNS:
            self._db.close()
            raise CheckpointError(
                f"checkpoint {path.name} was made by another version of batchrun; move it away "
                "to start over (its results cannot be read here)"
            )
        placeholders = ", ".join("?" for _ in COLUMNS)
        self._insert = f"INSERT OR REPLACE INTO results ({', '.join(COLUMNS)}) VALUES ({placeholders})"

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

    def fingerprint(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        return json.loads(row[0]) if row else None

    def start(self, fingerprint: dict[str, Any], fresh: bool) -> None:
        """Bind the checkpoint to this job version, or refuse if it belongs to another."""
        old = self.fingerprint()
        if old is not None and old != fingerprint and not fresh:
            changed = [k for k in fingerprint if old.get(k) != fingerprint[k]]
            raise CheckpointError(
                f"the job's {', '.join(changed)} changed since checkpoint {self.path.name} was "
                "made; rerun with --fresh to start over (its results will be discarded), "
                "or restore the job as it was to resume"
            )
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
            self._db.executemany(self._insert, map(_as_row, results))

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
        """Every recorded row as a tuple in COLUMNS order."""
        return self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM results ORDER BY row").fetchall()
