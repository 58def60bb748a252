"""The one record of a row: its result (RowResult), each request sent for it (Attempt), its status,
and the result columns, each declared once: the checkpoint's table, the output table's columns
and their types, and the reports' sums all derive from `COLUMNS`. Every executor hands the
checkpoint RowResults, and every count of finished rows adds them up by one rule (RowTally).
No batchrun import, so that the core, the storage and the drivers can all share it.

A column with no SQL type (`reused_from`) is not stored: it says how a row of the output came by
its result, and is made as the output is built (Checkpoint.output_rows, output.py).

Adding a column: declare it here (in its place in the output), add it to `RowResult` below, fill it
where rows finish, and append a step that adds it to migrations.MIGRATIONS; existing checkpoints
get the column (null for the rows they hold) when they are next opened.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import KW_ONLY, dataclass, field
from enum import StrEnum
from typing import NamedTuple

import polars as pl


@dataclass(frozen=True)
class Column:
    name: str
    sql: str | None  # its type in the checkpoint's `results` table; None: made as the output is built
    polars: pl.DataType  # its type in the output table
    in_output: bool  # output columns follow `id`, include_columns and fields, in `COLUMNS` order
    meaning: str


_INT, _REAL, _TEXT = "INTEGER", "REAL", "TEXT"
COLUMNS: tuple[Column, ...] = (
    Column("request_key", "BLOB", pl.Binary(), False, "sha256 (16 bytes) of the request as declared"),
    Column("occurrence", _INT, pl.Int64(), False, "identical requests before this one in the input"),
    Column("row", _INT, pl.Int64(), False, "0-based position in the input of the row that was sent"),
    Column("id", _TEXT, pl.String(), False, "the row's id as sent; the output takes `id` from the input"),
    Column("fields", _TEXT, pl.String(), False, "JSON of the output.fields; typed columns in the output"),
    Column("content", _TEXT, pl.String(), True, "the answer's text (of the last answer kept)"),
    Column("tool_calls", _TEXT, pl.String(), True, "JSON list of {id, name, arguments} the answer called"),
    Column("finish_reason", _TEXT, pl.String(), True, "why the answer ended: stop, length, tool_calls ..."),
    Column("prompt_tokens", _INT, pl.Int64(), True, "prompt tokens billed, over every answer of the row"),
    Column("completion_tokens", _INT, pl.Int64(), True, "completion tokens billed, over every answer"),
    Column("total_tokens", _INT, pl.Int64(), True, "total tokens billed, over every answer"),
    Column("cached_tokens", _INT, pl.Int64(), True, "prompt tokens billed at the cached-input rate"),
    Column("reasoning_tokens", _INT, pl.Int64(), True, "completion tokens spent on reasoning"),
    Column("cost_usd", _REAL, pl.Float64(), True, "what the row's answers cost; null without a price"),
    Column("status", _TEXT, pl.String(), True, "ok, failed or skipped; pending in the output: none yet"),
    Column("error_kind", _TEXT, pl.String(), True, "why a row failed, as a code: http_400, timeout ..."),
    Column("error", _TEXT, pl.String(), True, "why a row failed or was skipped, in words"),
    Column("attempts", _INT, pl.Int64(), True, "requests sent for the row"),
    Column("latency_ms", _REAL, pl.Float64(), True, "time the last attempt took"),
    Column("ttft_ms", _REAL, pl.Float64(), True, "time to the first token (streamed requests only)"),
    Column("model", _TEXT, pl.String(), True, "the model as the server reports it; the job's when none did"),
    Column("response_id", _TEXT, pl.String(), True, "the server's id of the answer"),
    Column("reused_from", None, pl.String(), True, "dedupe: id of the row whose answer it got; cost 0"),
)  # fmt: skip

# A result belongs to a request: the same request again in a later input reuses it.
RESULT_KEY = ("request_key", "occurrence")
STORED = tuple(c for c in COLUMNS if c.sql is not None)  # a result's: the checkpoint's table
NAMES = tuple(c.name for c in STORED)
SQL_TYPES = {c.name: c.sql for c in STORED}
RESULT_SCHEMA = {c.name: c.polars for c in COLUMNS}  # a row's result, as Checkpoint.output_rows gives it
OUTPUT_RESULT_COLUMNS = tuple(c.name for c in COLUMNS if c.in_output)

# A row with any of these got an answer, and so was billed (ok, or failed on an answer).
ANSWER_COLUMNS = ("content", "tool_calls", "finish_reason")
# An answered row reported usage when both of these came; else it is "without usage" (unknown, not
# zero). One rule, for RowTally here, the checkpoint's SQL and the output's polars sums.
USAGE_REPORTED = ("prompt_tokens", "completion_tokens")


class RowStatus(StrEnum):
    """A row's status: in the checkpoint (ok, failed, skipped) and in the output (pending too)."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"
    PENDING = "pending"  # no result yet: only in the output


class Attempt(NamedTuple):
    """One request sent for a row, as the core saw it (a tuple: one per request, on 10M rows)."""

    sent: float  # Unix seconds
    answered: float  # when its answer or failure came (Unix seconds)
    status: int | None  # the HTTP status; None: no answer (refused, reset, timed out)
    error_kind: str | None  # None: answered and read; else as RowResult.error_kind
    ttft_ms: float | None  # streamed requests only
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True, slots=True)
class RowResult:
    """What one row came to: a row of COLUMNS (a test keeps them equal)."""

    row: int
    id: str
    status: str  # RowStatus.OK, FAILED or SKIPPED
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
    request_key: bytes = b""  # sha256 of the request as the job declares it (plan.RequestKeys)
    occurrence: int = 0  # identical requests before this row's in the input
    tries: tuple[Attempt, ...] = ()  # every request sent for it, for the `attempts` table (not a column)

    @property
    def answered(self) -> bool:
        """Whether the row got an answer (ok, or failed on one), and so was billed."""
        return self.status == RowStatus.OK or any(getattr(self, c) is not None for c in ANSWER_COLUMNS)


@dataclass
class RowTally:
    """Finished rows added up one by one, by one rule wherever they are counted (the core, the Ray
    driver, the progress line): tokens where usage came, `without_usage` for answers without it
    (unknown, not zero), cost where priced."""

    by_status: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    without_usage: int = 0
    cost_usd: float = 0.0

    def add(self, result: RowResult) -> None:
        self.by_status[result.status] += 1
        prompt, completion = result.prompt_tokens, result.completion_tokens  # USAGE_REPORTED
        if prompt is not None and completion is not None:
            self.tokens += result.total_tokens or prompt + completion
        elif result.answered:
            self.without_usage += 1
        self.cost_usd += result.cost_usd or 0.0

    @property
    def rows(self) -> int:
        return sum(self.by_status.values())

    @property
    def known_tokens(self) -> int | None:
        """The tokens, or None when answers came and none reported usage."""
        return None if self.without_usage and not self.tokens else self.tokens
