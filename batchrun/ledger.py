"""The checkpoint's record of provider batches: each submission and its rows, written before and
after every remote step, so that a process that dies at any instant leaves enough to reattach.

`batches`: one line per submission (rows sent as one provider batch), with the `name` it has at
the provider (its file's, or its batch's). Its `state` is where the remote steps got. OpenAI's
protocol: `uploading` (recorded before the upload: the file may or may not exist), `uploaded` (the
input file's id is known; the batch may or may not exist). xAI's: `creating` (the batch may or may
not exist), `created` (its id is known; `added` of its parts are in it), `adding` (part `added`
is being added: it may or may not be in). Both: `submitted` (every row that is in the batch is
known), then `collected` (its answers are in `results`) or `abandoned` (no batch was made, or it
vanished). All but the last two are live: their rows are never submitted again.
`batch_rows`: the rows of each submission (and, in xAI's protocol, the `part` that adds each);
a row the batch gave back unanswered (a failed line, expiry, cancellation) keeps why, and goes back
to the rows to do.

Both tables are made by the migration step `provider_batches` (and given their parts and names by
`batch_parts`); the writer (Checkpoint.ledger) shares the checkpoint's connection and
transactions, so a batch's answers and its state land in one transaction.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

LIVE = ("uploading", "uploaded", "creating", "created", "adding", "submitted")
_LIVE_SQL = f"state IN ({', '.join(repr(state) for state in LIVE)})"
# Ways a row comes back unanswered that are not its own failure (not counted as its attempt).
NOT_RUN = frozenset({"batch_expired", "batch_cancelled", "batch_not_run", "batch_failed", "batch_rejected"})

TABLES = {
    "batches": (
        "submission INTEGER PRIMARY KEY, run INTEGER, api TEXT NOT NULL, base_url TEXT NOT NULL,"
        " model TEXT NOT NULL, lines INTEGER NOT NULL, bytes INTEGER NOT NULL,"
        " reserved_usd REAL NOT NULL DEFAULT 0, file_id TEXT, batch_id TEXT, state TEXT NOT NULL,"
        " status TEXT, done INTEGER, failed INTEGER, message TEXT, created REAL NOT NULL,"
        " checked REAL, ended REAL"
    ),
    "batch_rows": (
        "submission INTEGER NOT NULL, request_key BLOB NOT NULL, occurrence INTEGER NOT NULL,"
        " row INTEGER NOT NULL, id TEXT NOT NULL, worst_usd REAL NOT NULL DEFAULT 0,"
        " error_kind TEXT, error TEXT, PRIMARY KEY (submission, request_key, occurrence)"
    ),
}


def create_tables(db: sqlite3.Connection) -> None:
    """The tables; in the caller's transaction (a migration step's)."""
    for name, columns in TABLES.items():
        db.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
    db.execute("CREATE INDEX IF NOT EXISTS batch_rows_by_request ON batch_rows (request_key, occurrence)")


def add_parts(db: sqlite3.Connection) -> None:
    """A submission's name at the provider and the parts added so far; a row's part (the
    migration step `batch_parts`)."""
    db.execute("ALTER TABLE batches ADD COLUMN name TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN added INTEGER")
    db.execute("ALTER TABLE batch_rows ADD COLUMN part INTEGER")


@dataclass(frozen=True)
class Submission:
    """A submission as recorded."""

    submission: int
    api: str
    base_url: str
    model: str
    lines: int
    reserved_usd: float
    file_id: str | None
    batch_id: str | None
    state: str
    status: str | None  # the provider's, as last seen
    done: int | None
    failed: int | None
    created: float
    name: str | None  # at the provider: its file's or its batch's
    added: int | None  # parts added (xAI's protocol)


@dataclass(frozen=True)
class SentRow:
    """A row of a submission: what its answer is recorded under, and its earlier attempts."""

    request_key: bytes
    occurrence: int
    row: int
    id: str
    worst_usd: float
    earlier: tuple[tuple[float, float, str], ...]  # (sent, back, error_kind) of earlier batches


@dataclass(frozen=True)
class Returned:
    """A row a batch gave back unanswered, and why."""

    request_key: bytes
    occurrence: int
    error_kind: str
    error: str


def custom_id(request_key: bytes, occurrence: int) -> str:
    """A line's custom_id: the row's request key and occurrence, in hex."""
    return f"{request_key.hex()}-{occurrence:x}"


_SUBMISSION = (
    "submission, api, base_url, model, lines, reserved_usd, file_id, batch_id, state, status, done,"
    " failed, created, name, added"
)
# A row of a submission as begun: request_key, occurrence, row, id, worst_usd, part (None: no parts)
LedgerRow = tuple[bytes, int, int, str, float, int | None]


class Ledger:
    """The writer's record of batches, on the checkpoint's connection and in its transactions."""

    def __init__(
        self,
        db: sqlite3.Connection,
        transaction: Callable[[], contextlib.AbstractContextManager[None]],
        run: int,
    ):
        self._db = db
        self.transaction = transaction
        self._run = run

    def live(self) -> list[Submission]:
        return live_batches(self._db)

    def reserved_usd(self) -> float:
        """What the live batches may still cost: their worst cases, reserved when submitted."""
        query = f"SELECT COALESCE(SUM(reserved_usd), 0) FROM batches WHERE {_LIVE_SQL}"
        return float(self._db.execute(query).fetchone()[0])

    def in_live(self, keys: Sequence[tuple[bytes, int]]) -> set[tuple[bytes, int]]:
        """Which of these (request_key, occurrence) are rows of a live batch."""
        found: set[tuple[bytes, int]] = set()
        for start in range(0, len(keys), 400):  # SQLite's bound parameters: well under its limit
            chunk = keys[start : start + 400]
            values = ", ".join("(?, ?)" for _ in chunk)
            query = (
                f"WITH k(request_key, occurrence) AS (VALUES {values}) SELECT k.request_key, k.occurrence"
                " FROM k JOIN batch_rows r USING (request_key, occurrence)"
                f" JOIN batches b USING (submission) WHERE b.{_LIVE_SQL}"
            )
            found.update(self._db.execute(query, [v for key in chunk for v in key]).fetchall())
        return found

    def begin(
        self,
        api: tuple[str, str],
        base_url: str,
        model: str,
        rows: Iterable[LedgerRow],
        size: int,
        reserved_usd: float,
    ) -> tuple[int, str]:
        """Record a submission before its first remote step: `api` is the protocol's name and
        the state it records first (`uploading`, `creating`). Its number, and the name it is to
        have at the provider (unique: a rerun finds by it what a killed run left there)."""
        name, state = api
        rows = list(rows)
        with self.transaction():
            cursor = self._db.execute(
                "INSERT INTO batches (run, api, base_url, model, lines, bytes, reserved_usd, state, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self._run, name, base_url, model, len(rows), size, reserved_usd, state, time.time()),
            )
            submission = cursor.lastrowid
            assert submission is not None
            remote_name = f"batchrun-{secrets.token_hex(6)}-{submission}"
            self._db.execute(
                "UPDATE batches SET name = ?, added = ? WHERE submission = ?",
                (remote_name, None if rows and rows[0][-1] is None else 0, submission),
            )
            self._db.executemany(
                "INSERT INTO batch_rows (submission, request_key, occurrence, row, id, worst_usd, part)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((submission, *row) for row in rows),
            )
        return submission, remote_name

    def uploaded(self, submission: int, file_id: str) -> None:
        self._set(submission, state="uploaded", file_id=file_id)

    def submitted(self, submission: int, batch_id: str, status: str) -> None:
        self._set(submission, state="submitted", batch_id=batch_id, status=status, checked=time.time())

    def created(self, submission: int, batch_id: str) -> None:
        self._set(submission, state="created", batch_id=batch_id)

    def adding(self, submission: int) -> None:
        """Before a part is added: it may be in the batch from now on."""
        self._set(submission, state="adding")

    def added(self, submission: int, parts: int) -> None:
        """After a part is added: the first `parts` are in the batch."""
        self._set(submission, state="created", added=parts)

    def parts(self, submission: int) -> list[int]:
        """The rows of each part of a submission, in order."""
        query = "SELECT part, COUNT(*) FROM batch_rows WHERE submission = ? GROUP BY part ORDER BY part"
        return [count for _, count in self._db.execute(query, (submission,))]

    def drop_parts(self, submission: int, first: int) -> int:
        """Take parts `first` on out of a submission: they were never sent, and their rows go back
        to the rows to do as if never submitted. How many rows that was."""
        with self.transaction():
            dropped = self._db.execute(
                "DELETE FROM batch_rows WHERE submission = ? AND part >= ?", (submission, first)
            ).rowcount
            self._db.execute(
                "UPDATE batches SET lines = lines - ?, added = ? WHERE submission = ?",
                (dropped, first, submission),
            )
        return dropped

    def is_live(self, submission: int) -> bool:
        query = f"SELECT 1 FROM batches WHERE submission = ? AND {_LIVE_SQL}"
        return self._db.execute(query, (submission,)).fetchone() is not None

    def seen(self, submission: int, status: str, done: int | None, failed: int | None) -> None:
        self._set(submission, status=status, done=done, failed=failed, checked=time.time())

    def _set(self, submission: int, **values: object) -> None:
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self.transaction():
            self._db.execute(
                f"UPDATE batches SET {assignments} WHERE submission = ?", (*values.values(), submission)
            )

    def rows(self, submission: int) -> dict[str, SentRow]:
        """A submission's rows by custom_id, each with its attempts in earlier batches (those
        that were its own failures, not an expiry or a cancellation)."""
        earlier: dict[tuple[bytes, int], list[tuple[float, float, str]]] = {}
        query = (
            "SELECT o.request_key, o.occurrence, b.created, COALESCE(b.ended, b.created), o.error_kind"
            " FROM batch_rows r JOIN batch_rows o USING (request_key, occurrence)"
            " JOIN batches b ON b.submission = o.submission"
            " WHERE r.submission = ? AND o.submission < ? AND o.error_kind IS NOT NULL"
            f" AND o.error_kind NOT IN ({', '.join('?' for _ in NOT_RUN)}) ORDER BY o.submission"
        )
        for key, occurrence, sent, back, kind in self._db.execute(query, (submission, submission, *NOT_RUN)):
            earlier.setdefault((key, occurrence), []).append((sent, back, kind))
        found = self._db.execute(
            "SELECT request_key, occurrence, row, id, worst_usd FROM batch_rows WHERE submission = ?",
            (submission,),
        )
        return {
            custom_id(key, occurrence): SentRow(
                key, occurrence, row, row_id, worst, tuple(earlier.get((key, occurrence), ()))
            )
            for key, occurrence, row, row_id, worst in found
        }

    def abandon(self, submission: int, kind: str, reason: str) -> None:
        """A submission no batch came of, or will: its rows back to the rows to do."""
        with self.transaction():
            self._db.execute(
                "UPDATE batch_rows SET error_kind = ?, error = ? WHERE submission = ?",
                (kind, reason, submission),
            )
            self._db.execute(
                "UPDATE batches SET state = 'abandoned', message = ?, ended = ? WHERE submission = ?",
                (reason, time.time(), submission),
            )

    def settle(self, submission: int, returned: Sequence[Returned], state: str, message: str | None) -> None:
        """The submission's end: the rows it gave back and why, in the caller's transaction (the
        one that records its answers)."""
        self._db.executemany(
            "UPDATE batch_rows SET error_kind = ?, error = ? WHERE submission = ? AND request_key = ?"
            " AND occurrence = ?",
            ((r.error_kind, r.error, submission, r.request_key, r.occurrence) for r in returned),
        )
        self._db.execute(
            "UPDATE batches SET state = ?, message = ?, ended = ? WHERE submission = ?",
            (state, message, time.time(), submission),
        )


def pending_reasons(db: sqlite3.Connection) -> dict[str, int]:
    """Why the rows that a batch gave back (and that have no answer since) are pending: the
    error kinds of their last batch, with how many rows each."""
    query = (
        "SELECT r.error_kind, COUNT(*) FROM batch_rows r WHERE r.error_kind IS NOT NULL"
        " AND r.submission = (SELECT MAX(o.submission) FROM batch_rows o"
        " WHERE o.request_key = r.request_key AND o.occurrence = r.occurrence)"
        " AND NOT EXISTS (SELECT 1 FROM results s WHERE s.request_key = r.request_key"
        " AND s.occurrence = r.occurrence) GROUP BY 1 ORDER BY 2 DESC, 1"
    )
    return dict(db.execute(query).fetchall())


def live_batches(db: sqlite3.Connection) -> list[Submission]:
    """The live submissions, for a reader (`batchrun status`); none before the step that made them."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'batches'").fetchone() is None:
        return []
    query = f"SELECT {_SUBMISSION} FROM batches WHERE {_LIVE_SQL} ORDER BY submission"
    return [Submission(*found) for found in db.execute(query)]
