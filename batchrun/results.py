"""The result columns, each declared once: the checkpoint's table, the output table's columns and
their types, and the reports' sums all derive from `COLUMNS`.

A column with no SQL type (`reused_from`) is not stored: it says how a row of the output came by
its result, and is made as the output is built (Checkpoint.output_rows, output.py).

Adding a column: declare it here (in its place in the output), add it to `RowResult`, fill it
where rows finish, and append a step that adds it to migrations.MIGRATIONS; existing checkpoints
get the column (null for the rows they hold) when they are next opened.
"""

from __future__ import annotations

from dataclasses import dataclass

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
