"""The one record of a row: its result (RowResult), each request sent for it (Attempt), its status,
and the result columns, each declared once, as a field of RowResult: the checkpoint's table, the
output table's columns and their types, the reports' sums and the docs' column table all derive
from them (`COLUMNS`). Every executor hands the checkpoint RowResults, and every count of finished
rows adds them up by one rule (RowTally). No batchrun import, so that the core, the storage and
the drivers can all share it.

A column with no SQL type (`reused_from`) is not stored: it says how a row of the output came by
its result, and is made as the output is built (Checkpoint.output_rows, output.py).

Adding a column: declare it as a field of RowResult (in its place in the output), append
`migrations.added_column("name")` to migrations.MIGRATIONS, and fill it where rows finish;
existing checkpoints get the column (null for the rows they hold) when they are next opened.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections import Counter
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Annotated, NamedTuple

import polars as pl


@dataclass(frozen=True)
class Column:
    name: str
    sql: str | None  # its type in the checkpoint's `results` table; None: made as the output is built
    polars: pl.DataType  # its type in the output table
    in_output: bool  # output columns follow `id`, include_columns and fields, in `COLUMNS` order
    meaning: str


_INT, _REAL, _TEXT = "INTEGER", "REAL", "TEXT"


_POLARS = {"BLOB": pl.Binary(), _INT: pl.Int64(), _REAL: pl.Float64(), _TEXT: pl.String()}


def _column(sql: str, meaning: str, in_output: bool = True) -> Column:
    """A RowResult field's column (named after the field as COLUMNS is built)."""
    return Column("", sql, _POLARS[sql], in_output, meaning)


_blob, _int, _real, _text = (functools.partial(_column, sql) for sql in ("BLOB", _INT, _REAL, _TEXT))


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


@dataclass(frozen=True, slots=True, kw_only=True)
class RowResult:
    """What one row came to. Each field but `tries` declares the result column of its name, in
    the output's order: the checkpoint's table, the output's columns and types, the reports' sums
    and the docs' column table all derive from these declarations (COLUMNS)."""

    request_key: Annotated[bytes, _blob("sha256 (16 bytes) of the request as declared", False)] = b""
    occurrence: Annotated[int, _int("identical requests before this one in the input", False)] = 0
    row: Annotated[int, _int("0-based position in the input of the row that was sent", False)]
    id: Annotated[str, _text("the row's id as sent; the output takes `id` from the input", False)]
    fields: Annotated[str | None, _text("JSON of output.fields; typed columns in the output", False)] = None
    content: Annotated[str | None, _text("the answer's text (of the last answer kept)")] = None
    tool_calls: Annotated[str | None, _text("JSON list of {id, name, arguments} the answer called")] = None
    finish_reason: Annotated[str | None, _text("why the answer ended: stop, length, tool_calls ...")] = None
    prompt_tokens: Annotated[int | None, _int("prompt tokens billed, over every answer of the row")] = None
    completion_tokens: Annotated[int | None, _int("completion tokens billed, over every answer")] = None
    total_tokens: Annotated[int | None, _int("total tokens billed, over every answer")] = None
    cached_tokens: Annotated[int | None, _int("prompt tokens billed at the cached-input rate")] = None
    reasoning_tokens: Annotated[int | None, _int("completion tokens spent on reasoning")] = None
    cost_usd: Annotated[float | None, _real("what the row's answers cost; null without a price")] = None
    status: Annotated[str, _text("ok, failed or skipped; pending in the output: none yet")]
    error_kind: Annotated[str | None, _text("why a row failed, as a code: http_400, timeout ...")] = None
    error: Annotated[str | None, _text("why a row failed or was skipped, in words")] = None
    attempts: Annotated[int, _int("requests sent for the row")] = 0
    latency_ms: Annotated[float | None, _real("time the last attempt took")] = None
    ttft_ms: Annotated[float | None, _real("time to the first token (streamed requests only)")] = None
    model: Annotated[str | None, _text("the model as the server reports it; the job's when none did")] = None
    response_id: Annotated[str | None, _text("the server's id of the answer")] = None
    system_fingerprint: Annotated[str | None, _text("the server's build that answered, when it says")] = None
    batch_id: Annotated[str | None, _text("the provider batch that answered it; null: sent online")] = None
    tries: tuple[Attempt, ...] = ()  # every request sent for the row, for the `attempts` table (not a column)

    @property
    def answered(self) -> bool:
        """Whether the row got an answer (ok, or failed on one), and so was billed."""
        return self.status == RowStatus.OK or any(getattr(self, c) is not None for c in ANSWER_COLUMNS)


def _declared_columns() -> tuple[Column, ...]:
    """RowResult's columns, in its order, then the output's own (`reused_from`)."""
    hints = typing.get_type_hints(RowResult, include_extras=True)
    declared = [
        dataclasses.replace(column, name=f.name)
        for f in fields(RowResult)
        for column in getattr(hints[f.name], "__metadata__", ())
    ]
    reused = Column(
        "reused_from", None, pl.String(), True, "dedupe: id of the row whose answer it got; cost 0"
    )
    return (*declared, reused)


COLUMNS = _declared_columns()

# A result belongs to a request: the same request again in a later input reuses it.
RESULT_KEY = ("request_key", "occurrence")
STORED = tuple(c for c in COLUMNS if c.sql is not None)  # a result's: the checkpoint's table
NAMES = tuple(c.name for c in STORED)
SQL_TYPES = {c.name: c.sql for c in STORED}
RESULT_SCHEMA = {c.name: c.polars for c in COLUMNS}  # a row's result, as Checkpoint.output_rows gives it
OUTPUT_RESULT_COLUMNS = tuple(c.name for c in COLUMNS if c.in_output)


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
