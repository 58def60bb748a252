"""Reports on a job's usage: the run report left beside the output, and `batchrun cost`.

The run report (`OUTPUT.report.json`) is for machines: rows by outcome, retries and 429s,
achieved throughput, latency percentiles, tokens and cost against the estimate made before the
run, and online and batch rows side by side. The cost report sums rows, tokens and cost per
model and status, grouped by any column.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from batchrun.checkpoint import Fingerprint
from batchrun.cost import Price
from batchrun.display import Shown, cost_line, errors_lines, tokens_line
from batchrun.errors import BatchrunError, ExitCode, InputError
from batchrun.output import NO_USAGE, USAGE_COLUMNS, write_atomically, write_output
from batchrun.results import ANSWER_COLUMNS, OUTPUT_RESULT_COLUMNS, RESULT_SCHEMA
from batchrun.sources import scan_table
from batchrun.storage import Location

if TYPE_CHECKING:
    from batchrun.core import Outcome
    from batchrun.plan import PreparedJob

PERCENTILES = (50, 90, 99)
SENT = pl.col("status").is_in(["ok", "failed"])  # rows a request was sent for, and answered or failed
ONLINE = pl.col("batch_id").is_null()  # sent as a chat request; else in a provider batch


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short stable name for a job version, to match an estimate with the run it was made for."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


OUTCOMES = {"stopped_by_budget": "stopped by the budget"}  # Outcome in words, where they differ


@dataclass(frozen=True, repr=False)
class RunResult(Shown):
    """A job's figures after a run: rows by status (the whole job), this run's requests, retries
    and tokens, cost, and how the run ended; `table` is the output table as written. Shown as
    lines (repr) and as a table in a notebook."""

    total: int
    ok: int
    failed: int
    skipped: int
    pending: int
    prompt_tokens: int | None  # None: the endpoint reported no usage (rows_without_usage says for how many)
    completion_tokens: int | None
    failures_by_kind: dict[str, int]
    retries: dict[str, int]
    rate_limited: int  # answers that were 429s (each retried)
    wall_s: float
    output_path: Location
    interrupted: bool
    cost_usd: float | None = None  # the whole job's, earlier runs included; None if unpriced
    budget_usd: float | None = None
    budget_stopped: bool = False
    requests: int = 0  # sent by this run, retries included
    run_tokens: int | None = 0  # of the rows this run finished; None: no usage reported
    report_path: Path | None = None
    rows_without_usage: int = 0  # answered, but the endpoint reported no usage
    top_errors: list[tuple[str, int]] = field(default_factory=list)  # commonest messages of failed rows
    outcome: Outcome = "finished"
    workers: list[dict[str, int]] | None = None  # on Ray: each worker's rows, requests, retries, 429s
    checkpoint_path: Path | None = None
    table: pl.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def exit_code(self) -> ExitCode:
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if self.budget_stopped:
            return ExitCode.BUDGET
        return ExitCode.ROWS_FAILED if self.failed or self.pending else ExitCode.OK

    def figures(self) -> list[str]:
        """Rows by status and why rows failed, tokens, time, cost and the output: the CLI's
        summary, less what to do next (which the CLI and Python say each their own way)."""
        failures = ", ".join(f"{kind}: {n}" for kind, n in self.failures_by_kind.items())
        lines = [
            f"rows: {self.ok} ok, {self.failed} failed"
            + (f" ({failures})" if failures else "")
            + (f", {self.skipped} skipped" if self.skipped else "")
            + (f", {self.pending} pending" if self.pending else "")
            + f" of {self.total}",
            *errors_lines(self.top_errors, self.failed),
            tokens_line(self.prompt_tokens, self.completion_tokens, self.rows_without_usage),
            f"time: {self.wall_s:.1f} s"
            + (f"; retries: {sum(self.retries.values())}" if self.retries else "")
            + (f"; 429s: {self.rate_limited}" if self.rate_limited else ""),
        ]
        if self.cost_usd is not None:
            budget = f" of a ${self.budget_usd:g} budget" if self.budget_usd is not None else ""
            cost = cost_line(self.cost_usd, self.prompt_tokens is None, self.rows_without_usage)
            lines.append(cost + budget)
        lines.append(f"output: {self.output_path}")
        return lines

    def title(self) -> str:
        return f"RunResult: {OUTCOMES.get(self.outcome, self.outcome)}"

    def next_step(self) -> str | None:
        if self.budget_stopped:
            return (
                f"stopped by the budget: {self.pending} rows pending; run the cell again with a "
                "larger max_cost_usd= to resume"
            )
        if self.pending:
            return f"pending: {self.pending} rows; run the cell again to resume"
        if self.failed:
            return "to resend the failed rows: run again with retry_failed=True"
        return None

    def interrupted_message(self) -> str:
        """What a KeyboardInterrupt says once the run it stopped has written what it had."""
        done = self.ok + self.failed + self.skipped
        where = f" in {self.checkpoint_path}" if self.checkpoint_path is not None else ""
        return f"{done} of {self.total} rows done, checkpointed{where}; run again to resume"


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_run_report(
    job: PreparedJob,
    result: RunResult,
    price: Price | None,
    fingerprint: dict[str, Any],
    aborted: BatchrunError | None,
    usage: dict[str, int | None],
) -> None:
    """Write OUTPUT.report.json; scopes: the whole job (rows, tokens, cost, latency) or this run.
    `usage`: token sums by USAGE_COLUMNS (Tally.usage)."""
    minutes = max(result.wall_s, 1e-9) / 60
    actual = None if result.prompt_tokens is None else result.cost_usd  # None: no usage, or unpriced
    # Read back from the output as written, one column at a time: never the whole table.
    table = scan_table(job.output_path, job.spec.output.format)
    answered = table.filter(SENT & ONLINE)  # a batch row's latency is its batch's turnaround
    latency = answered.select(pl.col("latency_ms").cast(pl.Float64).drop_nulls()).collect()["latency_ms"]
    outcome = result.outcome
    report: dict[str, Any] = {
        "job": str(job.spec.job_path),
        "output": str(job.output_path),
        "model": job.spec.model,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "outcome": outcome,
        "error": str(aborted) if aborted is not None else None,
        "rows": {
            "total": result.total,
            "ok": result.ok,
            "failed": result.failed,
            "skipped": result.skipped,
            "pending": result.pending,
            "failed_by_kind": result.failures_by_kind,
            "top_errors": [{"error": error, "rows": n} for error, n in result.top_errors],
        },
        "this_run": {
            "wall_s": round(result.wall_s, 3),
            "requests": result.requests,
            "retries": sum(result.retries.values()),
            "retries_by_kind": dict(result.retries),
            "responses_429": result.rate_limited,
            **({"workers": result.workers} if result.workers is not None else {}),
            "requests_per_min": round(result.requests / minutes, 1),
            "tokens_per_min": None if result.run_tokens is None else round(result.run_tokens / minutes, 1),
        },
        "latency_ms": {f"p{p}": _percentile(latency, p) for p in PERCENTILES},
        "by_mode": by_mode(typed_output(table)),
        "tokens": {
            **{c.removesuffix("_tokens"): usage[c] for c in USAGE_COLUMNS},
            "rows_without_usage": result.rows_without_usage,
        },
        "cost_usd": {
            "actual": None if actual is None else round(actual, 6),
            "pricing": price.describe() if price is not None else None,
            "budget": result.budget_usd,
            "estimate": _estimate_before(job.estimate_path, fingerprint),
        },
    }
    estimate = report["cost_usd"]["estimate"]
    if estimate is not None and actual is not None and estimate["expected"]:
        report["cost_usd"]["actual_vs_expected_pct"] = round(100 * (actual / estimate["expected"] - 1), 1)
    write_json(job.report_path, report)


def by_mode(table: pl.LazyFrame) -> dict[str, dict[str, Any]]:
    """Online and batch rows side by side, of the rows sent: ok and failed, their cost (None if
    one is unpriced), and the time from sending to the answer: an online request's latency (ms),
    a batch row's batch, from its submission to its collection (s)."""
    if "batch_id" not in table.collect_schema().names():  # an output from before batch mode
        table = table.with_columns(pl.lit(None, pl.String).alias("batch_id"))
    latency = pl.col("latency_ms").cast(pl.Float64)
    found = (
        table.filter(SENT)
        .group_by(ONLINE.alias("online"))
        .agg(
            (pl.col("status") == "ok").sum().alias("ok"),
            (pl.col("status") == "failed").sum().alias("failed"),
            pl.when(pl.col("cost_usd").null_count() == 0).then(pl.col("cost_usd").sum()).alias("cost_usd"),
            *(latency.quantile(p / 100, "linear").alias(f"p{p}") for p in PERCENTILES),
        )
        .collect(engine="streaming")
    )
    modes: dict[str, dict[str, Any]] = {}
    for name, online, unit, scale in (
        ("online", True, "latency_ms", 1),
        ("batch", False, "submit_to_answer_s", 1000),
    ):
        row = next((r for r in found.iter_rows(named=True) if r["online"] == online), None)
        cost = 0.0 if row is None else row["cost_usd"]
        modes[name] = {
            "ok": 0 if row is None else row["ok"],
            "failed": 0 if row is None else row["failed"],
            "cost_usd": None if cost is None else round(cost, 6),
            unit: {
                f"p{p}": None if row is None or row[f"p{p}"] is None else round(row[f"p{p}"] / scale, 1)
                for p in PERCENTILES
            },
        }
    return modes


def _percentile(values: pl.Series, p: int) -> float | None:
    value = values.quantile(p / 100, "linear")  # None for no values
    return None if value is None else round(value, 1)


def _estimate_before(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The whole-job figures of the last `batchrun estimate` for this very job version, if any."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if saved.get("fingerprint") != fingerprint_digest(fingerprint):
        return None
    return dict(saved.get("job", {}), made_at=saved.get("made_at"))


def job_table(
    job: PreparedJob, by: tuple[str, ...], made_for: tuple[Fingerprint, ...], workdir: Path
) -> pl.LazyFrame:
    """A job's output table as its checkpoint has it now, with the input columns named in `by`,
    written to a Parquet file in `workdir` (flat memory) and scanned; the checkpoint must be the
    job's (`made_for`, as `open_checkpoint` checks)."""
    from batchrun.plan import read_checkpoint

    extra = [c for c in by if c in job.source.columns and c not in OUTPUT_RESULT_COLUMNS]
    columns = tuple(dict.fromkeys((*job.spec.output.include_columns, *extra)))
    path = workdir / "table.parquet"
    checkpoint = read_checkpoint(job, made_for)
    try:
        write_output(job.source, columns, checkpoint.output_rows(job.spec.dedupe), path, "parquet")
    finally:
        checkpoint.close()
    return pl.scan_parquet(path)


def read_output_table(path: Path) -> pl.LazyFrame:
    """An output table written by batchrun, scanned for a cost report."""
    if not path.is_file():
        raise InputError(f"output table not found: {path}")
    try:
        table = scan_table(path)
        columns = table.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
    missing = [c for c in ("status", "model", "prompt_tokens", "completion_tokens") if c not in columns]
    if missing:
        raise InputError(f"{path} is not a batchrun output table: it has no '{missing[0]}' column")
    summed = (*USAGE_COLUMNS, "cost_usd", *ANSWER_COLUMNS)  # an older table may lack them: null
    table = table.with_columns(pl.lit(None, RESULT_SCHEMA[c]).alias(c) for c in summed if c not in columns)
    return typed_output(table)


def typed_output(table: pl.LazyFrame) -> pl.LazyFrame:
    """An output table read back with its result columns typed as batchrun writes them: CSV and
    JSON lines keep no types, and a column empty throughout (`cached_tokens`) reads back as text."""
    columns = set(table.collect_schema().names())
    return table.with_columns(pl.col(c).cast(RESULT_SCHEMA[c]) for c in OUTPUT_RESULT_COLUMNS if c in columns)


def cost_report(table: pl.LazyFrame, by: tuple[str, ...]) -> pl.DataFrame:
    """Rows, tokens and cost per (by..., model, status), and a last `total` row; the table is
    summed by polars' streaming engine, never held whole.

    A group's cost is null when one of its answered rows has no price, and its tokens are null
    when one of them reported no usage: a partial sum would pass for the whole.
    """
    columns = table.collect_schema().names()
    for column in by:
        if column not in columns:
            raise InputError(f"no column {column} to group by; the columns are: {', '.join(columns)}")
    keys = [*dict.fromkeys((*by, "model", "status"))]
    priced = pl.when(pl.col("cost_usd").null_count() == 0).then(pl.col("cost_usd").sum()).alias("cost_usd")
    sums = [
        pl.len().alias("rows"),
        *(pl.when(NO_USAGE.sum() == 0).then(pl.col(c).sum()).alias(c) for c in USAGE_COLUMNS),
        priced,
    ]
    table = table.with_columns(pl.col(k).cast(pl.String) for k in keys)
    groups, total = pl.collect_all(
        [
            table.group_by(keys).agg(sums).sort(keys, nulls_last=True),
            table.select(
                *sums[:-1],
                pl.when(pl.col("cost_usd").filter(pl.col("status").is_in(["ok", "failed"])).null_count() == 0)
                .then(pl.col("cost_usd").filter(pl.col("status").is_in(["ok", "failed"])).sum())
                .cast(pl.Float64)
                .alias("cost_usd"),
            ),
        ],
        engine="streaming",
    )
    total = total.with_columns(pl.lit("total" if k == keys[0] else None, pl.String).alias(k) for k in keys)
    return pl.concat([groups, total.select(groups.columns)])


def format_cost_report(report: pl.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return report.write_csv()
    if fmt == "json":
        return json.dumps(report.to_dicts(), indent=2) + "\n"
    header = list(report.columns)
    lines = [[name.removesuffix("_tokens").removesuffix("_usd") for name in header]]
    for row in report.iter_rows():
        lines.append([_cell(name, value) for name, value in zip(header, row, strict=True)])
    numeric = [report[c].dtype.is_numeric() for c in header]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return (
        "\n".join(
            "  ".join(
                cell.rjust(width) if is_number else cell.ljust(width)
                for cell, width, is_number in zip(line, widths, numeric, strict=True)
            ).rstrip()
            for line in lines
        )
        + "\n"
    )


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "cost_usd":
        return f"${value:,.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)
