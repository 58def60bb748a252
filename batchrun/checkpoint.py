"""The durable record of finished rows: SQLite in WAL mode, one transaction per batch of results.

WAL with synchronous=NORMAL survives the process being killed at any instant (a committed
transaction is in the WAL file before commit returns); only a power loss can take back the
last few commits.

Tables (schema 3): `results`, keyed by the request a result answers (request_key, occurrence),
so an appended, edited or reordered input reuses every answer whose request it still makes;
`rows`, the current input's rows by position -> (request_key, occurrence), rewritten in place a
batch at a time by each run's key pass (KeyIndex; until a pass ends, the rows it has not reached
keep the last pass's entries); `meta`, the job fingerprint, the pricing, the response_format each
endpoint accepted for output.fields (Checkpoint.accept_format), and `input`: what the
last complete pass indexed (the input files' paths, sizes and mtimes, the request-key parts),
written with the pass's last batch and deleted with its first, so it names a complete `rows` or
is absent (plan.IndexedPlan trusts `rows` without a pass while it matches). The pass counts
identical requests (the occurrence numbers) in a temp table, `seen`: scratch, on disk, not kept.
`runs` and `attempts` (schema 3) are the record of how the job went (history.py). The schema
is made and brought up to date by the steps in migrations.py, for writers and readers alike.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import json
import operator
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from batchrun import history, ledger, migrations
from batchrun.errors import CheckpointError, Remedy
from batchrun.migrations import ROWS_TABLE, SCHEMA_VERSION
from batchrun.results import ANSWER_COLUMNS, NAMES, OUTPUT_RESULT_COLUMNS, USAGE_REPORTED, RowResult, RowTally

# Rows answered, and rows answered without usage, in SQL, for the whole checkpoint at once.
ANSWERED_SQL = f"(status = 'ok' OR {' OR '.join(f'{c} IS NOT NULL' for c in ANSWER_COLUMNS)})"
NO_USAGE_SQL = f"({' OR '.join(f'{c} IS NULL' for c in USAGE_REPORTED)})"
# The rowid of row r's result: its own, found in `results_by_row` in row order (its pages read
# once each), else the one another row sent (dedupe), by key. At 1M rows, 4x faster than a join
# by key (a probe of the results' key index per row, at random), 8x for the results used.
_SAME = "request_key = r.request_key AND occurrence = r.occurrence"  # bare names: the subquery's
RESULT_OF_ROW = (
    f"COALESCE((SELECT rowid FROM results INDEXED BY results_by_row WHERE row = r.row AND {_SAME}),"
    f" (SELECT rowid FROM results WHERE {_SAME}))"
)
# The current input's rows with their results (one line per row), and the results they use (one
# line per result: what was paid, counted once however many rows share it).
ROW_RESULTS = f"rows r JOIN results s ON s.rowid = {RESULT_OF_ROW}"
USED_RESULTS = f"results WHERE rowid IN (SELECT {RESULT_OF_ROW} FROM rows r)"

SEEN_CACHE_KIB = 65536
# What output_rows gives for each row: its position, and its result as the output has it.
OUTPUT_ROW_COLUMNS = ("row", "fields", *OUTPUT_RESULT_COLUMNS)

_as_row = operator.attrgetter(*NAMES)  # dataclasses.astuple deep-copies: ~20x slower per row
_INSERT = f"INSERT OR REPLACE INTO results ({', '.join(NAMES)}) VALUES ({', '.join('?' for _ in NAMES)})"

Fingerprint = dict[str, Any]
# read: look, never write (status, cost, estimate); resume / fresh: become the one writer, bring
# the schema up to this version's, and keep (resume) or discard (fresh) the rows recorded.
Mode = Literal["read", "resume", "fresh"]


@dataclass(frozen=True)
class Totals:
    ok: int
    failed: int
    skipped: int
    prompt_tokens: int | None  # over the rows that reported usage; None: answers came, none did
    completion_tokens: int | None
    without_usage: int  # answered rows that reported no usage (llama.cpp's streams, for one)


# Keys an older checkpoint's rows by request: given the fingerprint it records, fill the index
# with the input's keys as that job made them, or raise CheckpointError (another input).
Rekey = Callable[[Fingerprint, "KeyIndex"], None]


def _format_key(base_url: str) -> str:
    """The `meta` key of the response_format an endpoint accepted for output.fields."""
    return f"response_format {base_url}"


def open_checkpoint(path: Path, mode: Mode, *made_for: Fingerprint, rekey: Rekey | None = None) -> Checkpoint:
    """Open a job's checkpoint; the writer binds it to `made_for[0]`, the job as it is now. A job
    changed since the last run is not refused: its rows are matched by request key (the runner
    asks before finished rows are sent again, plan.finished_rows_to_resend).

    Readers pass the job as run on its endpoint and as run with --simulate. Either way the
    checkpoint is brought to the current schema (Checkpoint.migrate); one of schema 0 or 1
    (results by row position) is keyed by request with `rekey` when it was made for one of
    `made_for`, and is refused without it.
    """
    checkpoint = Checkpoint(path, mode)
    try:
        if mode != "read":
            checkpoint.lock()
        checkpoint.migrate(rekey)
        if mode != "read":
            checkpoint.bind(made_for[0], fresh=mode == "fresh")
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint


class Checkpoint:
    """One job's finished rows and the fingerprint of the job that produced them. Its rows are
    read once open_checkpoint has brought it to the current schema (migrate); constructed alone,
    before that, it answers `fingerprint` and `keyed_by_row`, which every schema can."""

    def __init__(self, path: Path, mode: Mode):
        self.path = path
        self._mode = mode
        self._key_dbs: list[sqlite3.Connection] = []
        self._lock_file: IO[str] | None = None
        self._run = 0  # the run this writer records (begin_run); attempts are filed under it
        try:
            if mode != "read":  # a reader makes no file and changes nothing in one
                path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            if mode != "read":
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot open checkpoint {path}: {exc}") from None
        if version > SCHEMA_VERSION:
            self._db.close()
            raise CheckpointError(
                f"checkpoint {path.name} was made by a newer batchrun (checkpoint schema "
                f"{version}, this one reads up to {SCHEMA_VERSION}); upgrade batchrun to "
                "resume it, or move it away to start over"
            )

    def migrate(self, rekey: Rekey | None) -> None:
        """Apply the migration steps this checkpoint lacks (migrations.py): a writer in place; a
        reader in a private copy of the file (SQLite's temporary database, on disk, deleted when
        it closes) that it reads from then on, so that every query reads the current schema."""
        if not migrations.pending(self._db):
            return
        if self._mode == "read":
            copy = sqlite3.connect("", isolation_level=None, check_same_thread=False)
            try:
                self._db.backup(copy)
            except sqlite3.Error as exc:
                copy.close()
                raise CheckpointError(f"cannot read checkpoint {self.path}: {exc}") from None
            self._db.close()
            self._db = copy
        migrations.apply(self._db, self._transaction, functools.partial(self._key_rows, rekey))

    def _key_rows(self, rekey: Rekey | None) -> None:
        """Migrations' KeyRows: index the input by request as the job this checkpoint records made
        it (`rekey`), in the step's transaction; `fresh` discards the rows, so it indexes none."""
        if self._mode == "fresh":
            return
        old = self.fingerprint()
        if rekey is None or old is None:
            raise CheckpointError(
                f"checkpoint {self.path.name} keys its rows by position (made by batchrun 0.1)",
                remedy=Remedy("fresh", True, "to start over"),
            )
        rekey(old, KeyIndex(self._db, "main", dedupe=False, writer=True, path=self.path))
        # The input hash the old fingerprint held was just checked: the job's parts remain.
        self._db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)",
            (json.dumps(without_input_hash(old), sort_keys=True),),
        )

    @property
    def keyed_by_row(self) -> bool:
        """Made before schema 2: results keyed by row position, which opening it keys by request."""
        return any(step.apply is migrations.key_by_request for step in migrations.pending(self._db))

    def key_index(self, dedupe: bool) -> KeyIndex:
        """An index of the current input's rows by request, rebuilt from its first row: for the
        writer in the file, on a connection of its own (the key pass runs in another thread while
        results are recorded); for a reader in temp tables on its connection."""
        if self._mode == "read":
            self._db.execute(f"CREATE TEMP TABLE IF NOT EXISTS rows {ROWS_TABLE}")
            return KeyIndex(self._db, "temp", dedupe, writer=False, path=self.path)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA synchronous=NORMAL")
        self._key_dbs.append(db)
        return KeyIndex(db, "main", dedupe, writer=True, path=self.path)

    def indexed_input(self) -> str | None:
        """What the last complete key pass indexed (KeyIndex.end), or None: no such pass."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'input'").fetchone()
        return None if row is None else str(row[0])

    def read_as_indexed(self, identity: str | None) -> bool:
        """For a reader: whether the file's `rows` index the input as it is now (its last
        complete pass recorded `identity`), so its queries can take them as they are, without a
        key pass of its own. If so, the reader keeps that snapshot: a pass starting meanwhile
        rewrites `rows` unseen."""
        if self._mode != "read" or identity is None:
            return False
        self._db.execute("BEGIN")  # a read transaction: this look and every query after it
        if self.indexed_input() == identity:
            return True
        self._db.execute("ROLLBACK")
        return False

    def to_do(self) -> ToDo:
        """The rows still to do, read from `rows` as the last complete pass left it, on a
        connection of its own (read in the plan's thread while results are recorded)."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._key_dbs.append(db)
        return ToDo(db, self.path)

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
        for db in self._key_dbs:
            db.close()
        self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()

    def fingerprint(self) -> Fingerprint | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        return json.loads(row[0]) if row else None

    def bind(self, fingerprint: Fingerprint, fresh: bool) -> None:
        """Record the job version this checkpoint is for; `fresh` discards the rows recorded."""
        with self._transaction():
            if fresh:
                self._db.execute("DELETE FROM results")
                self._db.execute("DELETE FROM rows")
                self._db.execute("DROP TABLE IF EXISTS seen")  # made again by the next key pass
                self._db.execute("DELETE FROM meta WHERE key = 'input'")
                self._db.execute("DELETE FROM meta WHERE key LIKE ?", (_format_key("%"),))
                self._db.execute("DELETE FROM runs")
                self._db.execute("DELETE FROM attempts")
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)",
                (json.dumps(fingerprint, sort_keys=True),),
            )

    def record(self, results: Sequence[RowResult]) -> None:
        """Commit a batch of finished rows, and the requests sent for them, in one transaction."""
        with self._transaction():
            self._db.executemany(_INSERT, map(_as_row, results))
            self._db.executemany(history.INSERT_ATTEMPTS, history.attempt_rows(self._run, results))

    def begin_run(self, driver: str) -> None:
        """Record that a run starts (history.py); the attempts recorded from now on are its. A
        run that does not collect batches is refused while the provider holds live ones: it
        would send their rows again."""
        if driver != "batch" and (live := self.live_batches()):
            rows = sum(s.lines for s in live)
            raise CheckpointError(
                f"{len(live)} provider batch(es) of this job ({rows:,} rows) are still live at the "
                "provider; collect them first, or cancel them",
                remedy=Remedy("batch", True, "to collect them"),
            )
        with self._transaction():
            self._run = history.begin_run(self._db, driver)

    def live_batches(self) -> list[ledger.Submission]:
        """The provider batches still live (submitted, or being submitted when a run stopped)."""
        return ledger.live_batches(self._db)

    def pending_reasons(self) -> dict[str, int]:
        """Why rows given back by provider batches are pending, by error kind (ledger.py)."""
        return ledger.pending_reasons(self._db)

    def ledger(self) -> ledger.Ledger:
        """The writer's record of provider batches, in this checkpoint's transactions."""
        return ledger.Ledger(self._db, self._transaction, self._run)

    def end_run(self, outcome: str, requests: int, workers: int) -> None:
        with self._transaction():
            history.end_run(self._db, self._run, outcome, requests, workers)

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return transaction(self._db, self.path)

    def reprice(self, pricing: str, cost: Callable[..., float | None], *, batch: bool = False) -> int:
        """Recompute answered rows' cost if `pricing` (a description of the rates) changed since
        they were recorded, so one table never mixes two prices; returns the rows repriced.
        The rows answered in provider batches have rates of their own (`batch`).

        `cost` takes prompt, completion, total and cached tokens.
        """
        key = "batch_pricing" if batch else "pricing"
        found = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if found is not None and found[0] == pricing:
            return 0
        usage = self._db.execute(
            "SELECT rowid, prompt_tokens, completion_tokens, total_tokens, cached_tokens FROM results"
            f" WHERE status = 'ok' AND batch_id IS {'NOT ' if batch else ''}NULL"
        )
        repriced = 0
        with self._transaction():
            for chunk in iter(lambda: usage.fetchmany(10_000), []):
                self._db.executemany(
                    "UPDATE results SET cost_usd = ? WHERE rowid = ?", ((cost(*u[1:]), u[0]) for u in chunk)
                )
                repriced += len(chunk)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, pricing))
        return repriced

    def accepted_format(self, base_url: str, fallbacks: Sequence[object]) -> int:
        """Where in `fallbacks` (the response_formats tried in turn) a run against `base_url`
        starts: at the one it last accepted, so that each run does not pay for the refusals again."""
        found = self._db.execute("SELECT value FROM meta WHERE key = ?", (_format_key(base_url),)).fetchone()
        tried = [json.dumps(f, sort_keys=True) for f in fallbacks]
        return tried.index(found[0]) if found is not None and found[0] in tried else 0

    def accept_format(self, base_url: str, response_format: object) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                (_format_key(base_url), json.dumps(response_format, sort_keys=True)),
            )

    def last_run_finished(self, first_row: int, last_row: int) -> set[int]:
        """The rows between `first_row` and `last_row` that the last run (as it indexed them in the
        file's `rows`) had finished: for a reader, which rows a changed job would send again."""
        query = (
            "SELECT m.row FROM main.rows m JOIN results USING (request_key, occurrence)"
            " WHERE m.row BETWEEN ? AND ?"
        )
        return {row for (row,) in self._db.execute(query, (first_row, last_row))}

    def prune(self) -> tuple[int, int]:
        """Drop the results no row of the current index uses; (dropped, kept)."""
        with self._transaction():
            dropped = self._db.execute(
                "DELETE FROM results WHERE (request_key, occurrence) NOT IN"
                " (SELECT request_key, occurrence FROM rows)"
            ).rowcount
        kept = self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        return dropped, int(kept)

    def spent_usd(self) -> float:
        """What the results the current rows use cost, as far as it is known (each counted once)."""
        query = f"SELECT COALESCE(SUM(cost_usd), 0) FROM {USED_RESULTS}"
        return float(self._db.execute(query).fetchone()[0])

    def done_before(self, below: int, dedupe: bool) -> Callable[[], RowTally]:
        """Rows finished among the first `below` of the rows last indexed, by status, and what
        the results the current rows use cost and used (spent_usd, tokens, answers without
        usage), as the checkpoint is now: the snapshot is taken here, and the count (one join of
        rows and results, on a connection of its own) is what this returns, to run in a thread
        while the run sends and records."""
        try:
            db = sqlite3.connect(self.path, check_same_thread=False)
            db.execute("BEGIN")
            db.execute("SELECT 1 FROM meta").fetchall()  # the snapshot starts with a read
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot read checkpoint {self.path}: {exc}") from None
        # as RowTally adds a result: tokens where usage came, answers without it apart
        used = (
            "SUM(cost_usd), SUM(COALESCE(total_tokens, prompt_tokens + completion_tokens))"
            f" FILTER (WHERE NOT {NO_USAGE_SQL}), COUNT(*) FILTER (WHERE {ANSWERED_SQL} AND {NO_USAGE_SQL})"
        )

        def count() -> RowTally:
            try:
                by_status = f"SELECT status, COUNT(*) FILTER (WHERE r.row < ?), {used} FROM {ROW_RESULTS}"
                found = db.execute(f"{by_status} GROUP BY 1", (below,)).fetchall()
                if dedupe:  # rows share results: each counted once
                    sums = db.execute(f"SELECT {used} FROM {USED_RESULTS}").fetchone()
                else:  # one result per row
                    sums = [sum(n or 0 for n in column) for column in list(zip(*found, strict=True))[2:]]
            except sqlite3.Error as exc:
                raise CheckpointError(f"cannot read checkpoint {self.path}: {exc}") from None
            finally:
                db.close()
            spent, tokens, without_usage = (n or 0 for n in (sums or (0, 0, 0)))
            counts = collections.Counter({status: n for status, n, *_ in found if n})
            return RowTally(counts, int(tokens), int(without_usage), float(spent))

        return count

    def status_counts(self, below: int) -> dict[str, int]:
        """Rows finished so far among the first `below` of the rows last indexed, by status."""
        query = f"SELECT status, COUNT(*) FROM {ROW_RESULTS} WHERE r.row < ? GROUP BY 1"
        return dict(self._db.execute(query, (below,)).fetchall())

    def rows_without_result(self) -> sqlite3.Cursor:
        """The indexed rows that have no result yet, in row order, one-tuples."""
        return self._db.execute(
            "SELECT r.row FROM rows r LEFT JOIN results s USING (request_key, occurrence)"
            " WHERE s.status IS NULL ORDER BY r.row"
        )

    def used_sums(self, usage_columns: tuple[str, ...]) -> dict[str, float]:
        """What the results the current rows use were billed, each counted once, in one pass:
        the sums output.Tally takes from the output's rows (same names), for a dedupe job, whose
        rows share results (the output bills a result at the row whose id sent it)."""
        sent = "status IN ('ok', 'failed')"
        no_usage = f"{ANSWERED_SQL} AND {NO_USAGE_SQL}"
        sums = {
            "cost_usd": "COALESCE(SUM(cost_usd), 0)",
            "prompt_tokens": "COALESCE(SUM(prompt_tokens), 0)",
            "completion_tokens": "COALESCE(SUM(completion_tokens), 0)",
            "prompt_tokens_known": "COUNT(prompt_tokens)",
            "completion_tokens_known": "COUNT(completion_tokens)",
            "without_usage": f"COUNT(*) FILTER (WHERE {no_usage})",
            "sent": f"COUNT(*) FILTER (WHERE {sent})",
            "sent_without_usage": f"COUNT(*) FILTER (WHERE {sent} AND {no_usage})",
            **{f"sent_{c}": f"COALESCE(SUM({c}) FILTER (WHERE {sent}), 0)" for c in usage_columns},
        }
        values = self._db.execute(f"SELECT {', '.join(sums.values())} FROM {USED_RESULTS}").fetchone()
        return dict(zip(sums, values, strict=True))

    def ok_usage(self) -> tuple[int, int]:
        """Prompt and output tokens billed for the `ok` results the current rows use (output as
        cost.billed_output_tokens counts it: total - prompt when the total is larger)."""
        query = (
            "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(CASE WHEN total_tokens IS NOT NULL"
            " AND prompt_tokens IS NOT NULL"
            " THEN MAX(total_tokens - prompt_tokens, COALESCE(completion_tokens, 0))"
            f" ELSE completion_tokens END), 0) FROM {USED_RESULTS} AND status = 'ok'"
        )
        prompt, output = self._db.execute(query).fetchone()
        return int(prompt), int(output)

    def output_rows(self, dedupe: bool = False) -> Callable[[int], list[tuple[Any, ...]]]:
        """Every indexed row with its result (None where it has none), in `OUTPUT_ROW_COLUMNS`
        order and row order, fetched n at a time: what the output is built from, in flat memory.
        With dedupe, `reused_from` is the id the result was sent for, where another row sent it.
        Only the columns the output has: each value is a Python object on its way to polars."""
        reused = "CASE WHEN s.row != r.row THEN s.id END" if dedupe else "NULL"
        select = ", ".join(
            "r.row" if c == "row" else reused if c == "reused_from" else f"s.{c}" for c in OUTPUT_ROW_COLUMNS
        )
        join = f"ON s.rowid = {RESULT_OF_ROW}"
        cursor = self._db.execute(f"SELECT {select} FROM rows r LEFT JOIN results s {join} ORDER BY r.row")
        return cursor.fetchmany

    def totals(self) -> Totals:
        ok, failed, skipped = self._db.execute(
            "SELECT COUNT(*) FILTER (WHERE status = 'ok'), COUNT(*) FILTER (WHERE status = 'failed'),"
            f" COUNT(*) FILTER (WHERE status = 'skipped') FROM {ROW_RESULTS}"
        ).fetchone()
        prompt, completion, without_usage = self._db.execute(
            "SELECT SUM(prompt_tokens), SUM(completion_tokens),"
            f" COUNT(*) FILTER (WHERE {ANSWERED_SQL} AND {NO_USAGE_SQL}) FROM {USED_RESULTS}"
        ).fetchone()
        unknown = None if without_usage else 0  # no sum at all: unknown if answers came, else none
        return Totals(
            ok, failed, skipped, unknown if prompt is None else prompt,
            unknown if completion is None else completion, without_usage,
        )  # fmt: skip

    def failures_by_kind(self) -> dict[str, int]:
        query = (
            f"SELECT error_kind, COUNT(*) FROM {ROW_RESULTS} WHERE status = 'failed'"
            " GROUP BY 1 ORDER BY 2 DESC, 1"
        )
        return {kind or "unknown": n for kind, n in self._db.execute(query)}

    def top_errors(self, n: int = 3) -> list[tuple[str, int]]:
        """The `n` commonest messages of failed rows, as recorded, with how many rows had each."""
        query = (
            "SELECT COALESCE(error, '(no message)'), COUNT(*)"
            f" FROM {ROW_RESULTS} WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?"
        )
        return self._db.execute(query, (n,)).fetchall()


def without_input_hash(fingerprint: Fingerprint) -> Fingerprint:
    """A schema 0/1 fingerprint as this version's: without the input's hash (the rows are keyed
    by request now, so the input may change)."""
    given = fingerprint.get("input")
    if not isinstance(given, dict) or "sha256" not in given:
        return fingerprint
    return {**fingerprint, "input": {k: v for k, v in given.items() if k != "sha256"}}


class KeyIndex:
    """The current input's rows by request, written a batch at a time as the input streams by:
    `rows` (row -> request_key, occurrence) and `seen` (how often each request came so far), so
    occurrence numbers and finished results are looked up on disk, never in a set of all rows."""

    def __init__(self, db: sqlite3.Connection, schema: str, dedupe: bool, writer: bool, path: Path):
        self._db = db
        self._path = path
        self._schema = schema
        self._dedupe = dedupe
        self._begin = "BEGIN IMMEDIATE" if writer else "BEGIN"
        self._last_row = -1
        db.execute(f"CREATE TABLE IF NOT EXISTS {schema}.rows {ROWS_TABLE}")
        # Scratch of one pass, so in temp: no WAL to write, nothing to keep. In the file its
        # random-order inserts rewrote most of its pages in the WAL each batch (O(N) per batch).
        db.execute("PRAGMA temp.journal_mode = OFF")
        db.execute(f"PRAGMA temp.cache_size = {-SEEN_CACHE_KIB}")
        db.execute("DROP TABLE IF EXISTS temp.seen")
        db.execute("CREATE TEMP TABLE seen (request_key BLOB PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID")
        db.execute(f"CREATE TEMP TABLE IF NOT EXISTS batch {ROWS_TABLE}")
        if writer:  # the file's seen of a checkpoint made before it moved to temp
            with self._transaction():
                db.execute("DROP TABLE IF EXISTS main.seen")
        else:
            db.execute(f"DELETE FROM {schema}.rows")

    def add(self, rows: list[int], keys: list[bytes]) -> tuple[list[int], list[bool]]:
        """Index one batch of rows (in input order); each row's occurrence number, and whether it
        is the first of its request in the input (with dedupe, the one row that is sent).

        One round of Python values per batch (the rows into temp.batch); the rest is SQL over
        it, keys in sorted order where they meet a B-tree (seen, results): ~3x fewer page visits
        than one statement per row in input order."""
        schema = self._schema
        with self._transaction():
            if self._last_row < 0 and schema == "main":  # `rows` is no longer what `input` names
                self._db.execute("DELETE FROM meta WHERE key = 'input'")
            self._db.execute("DELETE FROM temp.batch")
            self._db.executemany("INSERT INTO temp.batch VALUES (?, ?, 0)", zip(rows, keys, strict=True))
            # Each request's count so far, this batch's rows included: one visit of seen per key.
            now = self._db.execute(
                "INSERT INTO temp.seen SELECT request_key, COUNT(*) FROM temp.batch WHERE true"
                " GROUP BY request_key ON CONFLICT (request_key) DO UPDATE SET n = n + excluded.n"
                " RETURNING request_key, n"
            ).fetchall()
            counts = collections.Counter(keys)
            before = {key: n - counts[key] for key, n in now if n > counts[key]}  # earlier batches'
            repeated: list[tuple[int, int]] = []  # (occurrence, row) where not 0
            if not before and len(counts) == len(keys):  # the common case: all new, all distinct
                occurrences, first = [0] * len(keys), [True] * len(keys)
            else:
                taken: dict[bytes, int] = {}
                occurrences, first = [], []
                for row, key in zip(rows, keys, strict=True):
                    n = before.get(key, 0) + taken.get(key, 0)
                    taken[key] = taken.get(key, 0) + 1
                    occurrences.append(0 if self._dedupe else n)
                    first.append(n == 0)
                    if n and not self._dedupe:
                        repeated.append((n, row))
            self._db.executemany("UPDATE temp.batch SET occurrence = ? WHERE row = ?", repeated)
            # Over the last pass's entries in place (row order: pages written once, in order);
            # those past the input's end go in end().
            self._db.execute(f"INSERT OR REPLACE INTO {schema}.rows SELECT * FROM temp.batch")
        self._last_row = rows[-1]
        return occurrences, first

    def end(self, identity: str | None = None) -> None:
        """The pass reached the input's end (or its limit): drop the last pass's rows past it,
        and record `identity` (what was indexed; None: nothing to trust it by) with it."""
        with self._transaction():
            self._db.execute(f"DELETE FROM {self._schema}.rows WHERE row > ?", (self._last_row,))
            if identity is not None and self._schema == "main":
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('input', ?)", (identity,))

    def finished(self, first_row: int, last_row: int, columns: str = "status") -> dict[int, tuple[Any, ...]]:
        """The rows between `first_row` and `last_row` of the batch last added that have a result:
        row -> `columns` (none: the rows only, found in the results' key index alone)."""
        select = ", ".join(["b.row", *filter(None, [columns])])
        query = (
            f"SELECT {select} FROM temp.batch b JOIN results USING (request_key, occurrence)"
            " WHERE b.row BETWEEN ? AND ?"
        )
        return {row: tuple(rest) for row, *rest in self._db.execute(query, (first_row, last_row))}

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return transaction(self._db, self._path, self._begin)


class ToDo:
    """The rows still to do as `rows` indexes them, a page at a time in row order: each page a
    short read, so no snapshot outlives it (a long one would keep the WAL from being reset)."""

    def __init__(self, db: sqlite3.Connection, path: Path):
        self._db = db
        self._path = path

    def page(self, after: int, n: int, failed: bool) -> list[tuple[int, bytes, int]]:
        """Up to `n` rows past `after` with no result (`failed`: with a failed one):
        (row, request_key, occurrence). A row's result is looked up by row (RESULT_OF_ROW), in
        row order, so SQLite's default page cache does: by key it took a 64 MB cache, held to
        the end of the run (1M rows, all done but one: 250 MB at the end of the run, now 190)."""
        if failed:
            where = f"(SELECT status FROM results WHERE rowid = {RESULT_OF_ROW}) = 'failed'"
        else:
            where = f"{RESULT_OF_ROW} IS NULL"
        query = (
            f"SELECT r.row, r.request_key, r.occurrence FROM rows r WHERE r.row > ? AND {where}"
            " ORDER BY r.row LIMIT ?"
        )
        return self._db.execute(query, (after, n)).fetchall()

    def forget(self) -> None:
        """`rows` was found not to match the input it names: the next run makes the key pass."""
        with transaction(self._db, self._path):
            self._db.execute("DELETE FROM meta WHERE key = 'input'")


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, path: Path, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """A write that lands whole or not at all; a failed write stops the job, never passes. One
    begun inside another (a migration step's key pass) is part of it, and lands with it."""
    if db.in_transaction:
        yield
        return
    try:
        db.execute(begin)
        yield
        db.execute("COMMIT")
    except BaseException as exc:  # a migration step's refusal too: nothing of it stays
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from None
        raise
