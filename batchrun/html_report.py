"""The run report as a page to look at: `OUTPUT.report.html`, one file that needs no network.

What it shows comes from three places, each read in flat memory however many rows the job has:
the output table (rows by status, tokens, cost, latency, failures: polars, grouped or binned by
its streaming engine, over a copy without the answers' text), the checkpoint's record of runs
and attempts (throughput, retries and 429s over time, binned in SQL; history.py) and the JSON
run report beside it (the estimate made before the run, the Ray workers' figures), when there
is one. A handful of answered rows is shown as the job produced them: each one's input (the
text of its last user message, its images as small inline thumbnails), answer and cost. Every
chart is inline SVG drawn by charts.py from at most a few hundred binned points: no script,
font or image is fetched when the page is opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from batchrun import charts
from batchrun.job import TableFormat
from batchrun.output import ANSWERED, sink_frames, write_atomically
from batchrun.report import ONLINE, PERCENTILES, by_mode, cost_report, typed_output
from batchrun.sources import input_format, scan_table

if TYPE_CHECKING:
    from batchrun.events import Events
    from batchrun.plan import PreparedJob

BINS = 60  # bars per histogram, points per throughput line
RUNS_DRAWN = 8  # the last runs get a throughput segment each
EXAMPLES = 3  # failed rows shown per kind
ROWS_SHOWN = 5  # answered rows shown with their input, answer and cost
THUMBNAIL_SIDE = 64  # pixels, a thumbnail's longer side
THUMBNAIL_BYTES = 16_000  # without Pillow, an image is shown whole if it is this small, else named
SHOWN_CHARS = 300  # of a row's input text or answer
TOP_VALUES = 15  # values of a --by column in its cost chart
STATUS_COLORS = {"ok": charts.COLORS[0], "failed": charts.COLORS[2]}  # in the cost chart
PAGE_SWITCH = "BATCHRUN_REPORT_PAGE"  # "0": runs draw no page (`batchrun report` draws it)
ANSWER_TEXT = ("content", "tool_calls")  # the output's widest columns; the page needs their nulls only
PAGE_SLICE_ROWS = 65_536  # rows of the output decoded at a time for the page
NO_RECORD = "No record of attempts: no checkpoint beside the output, or one made before batchrun 0.3."


@dataclass(frozen=True)
class Sources:
    """Where a page's figures come from."""

    table: pl.LazyFrame  # the output table (or the checkpoint's rows as one)
    checkpoint: Path | None  # for the record of runs and attempts
    json_report: Path | None
    job_file: str | None  # for the command that resends failed rows
    by: tuple[str, ...] = ()
    format: TableFormat = "parquet"  # the table's: Parquet is read by slices, others in one pass
    job: PreparedJob | None = None  # to show the rows' input; without it, their answers alone
    rows: tuple[ShownRow, ...] = ()  # the answered rows shown (ROWS_SHOWN), taken by write_page


@dataclass(frozen=True)
class ShownRow:
    """An answered row as the page shows it."""

    id: str
    text: str | None  # its input: the last user message's text (None: the job is not known)
    images: tuple[str, ...]  # thumbnails as data URLs, or the names of images not shown
    answer: str
    cost_usd: float | None


def page_path(report_json: Path) -> Path:
    """The page beside a run's JSON report: OUTPUT.report.html."""
    return report_json.with_suffix(".html")


def write_page_or_warn(job: PreparedJob, events: Events) -> None:
    """A run's page; a page that cannot be drawn costs a warning, never the run's output or exit code."""
    if os.environ.get(PAGE_SWITCH) == "0":
        return
    path = page_path(job.report_path)
    try:
        sources = Sources(
            typed_output(scan_table(job.output_path, job.spec.output.format)),
            job.checkpoint_path,
            job.report_path,
            str(job.spec.job_path),
            format=input_format(job.output_path, job.spec.output.format),
            job=job,
        )
        write_page(sources, path)
    except Exception as exc:  # anything at all: the run's output and exit code stand
        reason = (str(exc).strip().splitlines() or [""])[0]
        events.say(f"warning: no HTML report written to {path}: {type(exc).__name__}: {reason}", "warning")


def write_page(sources: Sources, path: Path) -> int:
    """Draw the page and write it atomically; its size in bytes."""
    with tempfile.TemporaryDirectory(prefix="batchrun-page-") as folder:
        rows = _shown_rows(sources.table, sources.job)
        table = _without_answers(sources.table, sources.format, Path(folder) / "table.parquet")
        data = render(dataclasses.replace(sources, table=table, rows=rows)).encode()
    write_atomically(path, lambda tmp: tmp.write_bytes(data))
    return len(data)


def _without_answers(table: pl.LazyFrame, format: TableFormat, path: Path) -> pl.LazyFrame:
    """The table as the page reads it: each answer's text and tool calls as "" (the page asks
    only whether a row has them: ANSWERED), copied to `path` a slice at a time (Parquet: each
    from the row groups it touches; CSV and JSON lines, which a slice parses from the start:
    polars' batches). Each of the page's ten scans then reads a few bytes a row; a streaming scan
    that decodes the answers held ~175 MB at 1M rows of ~300 characters."""
    present = [c for c in ANSWER_TEXT if c in table.collect_schema()]
    marked = table.with_columns(pl.when(pl.col(c).is_not_null()).then(pl.lit("")).alias(c) for c in present)
    slices: Iterable[pl.DataFrame]
    if format == "parquet":
        rows = int(table.select(pl.len()).collect().item())
        slices = (marked.slice(at, PAGE_SLICE_ROWS).collect() for at in range(0, rows, PAGE_SLICE_ROWS))
    else:
        slices = marked.collect_batches(chunk_size=PAGE_SLICE_ROWS)
    sink_frames(slices, marked.collect_schema(), path)
    return pl.scan_parquet(path)


def render(sources: Sources) -> str:
    table = sources.table
    if "batch_id" not in table.collect_schema().names():  # an output from before batch mode
        table = table.with_columns(pl.lit(None, pl.String).alias("batch_id"))
    answered = table.filter(ANSWERED)
    # as the JSON report's latency: online rows only, a batch row's being its batch's turnaround
    sent = table.filter(pl.col("status").is_in(["ok", "failed"]) & ONLINE)
    modes = by_mode(table)
    saved = _read_json(sources.json_report)
    costs = cost_report(table, ())
    by_status = costs.filter(pl.col("model") != "total").group_by("status").agg(pl.col("rows").sum())
    rows = dict(by_status.iter_rows())
    total = costs.row(-1, named=True)
    runs, throughput = _history(sources.checkpoint)
    latency = _percentiles(sent, "latency_ms")
    ttft = _percentiles(sent, "ttft_ms")
    sections = [
        _summary(rows, total, saved, runs),
        _rows_section(sources.rows),
        _section(
            "Throughput",
            _throughput_chart(throughput) if throughput.height else _note(NO_RECORD),
            "Rows finished, retries and HTTP 429s per second, binned; each run is its own segment.",
        ),
        _section(
            "Latency",
            _distribution(sent, "latency_ms", "latency (ms)", latency)
            + (_distribution(sent, "ttft_ms", "time to first token (ms)", ttft) if ttft else ""),
            "Of each row sent online, its last request; the lines mark p50, p90 and p99.",
        ),
        *([_modes_table(modes)] if modes["batch"]["ok"] or modes["batch"]["failed"] else []),
        _section(
            "Tokens per row",
            _distribution(answered, "prompt_tokens", "prompt tokens", {})
            + _distribution(answered, "completion_tokens", "completion tokens", {}),
            "Over every answer a row was billed for.",
        ),
        _section("Cost", _cost(costs, table, sources.by), ""),
        _failures(table, sources.job_file),
    ]
    if runs:
        sections.append(_runs_table(runs, saved))
    title = f"batchrun report: {saved.get('output') or 'output'}"
    return _PAGE.format(title=html.escape(title), body="\n".join(sections))


# --- reading ----------------------------------------------------------------------------------


def _read_json(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _history(checkpoint: Path | None) -> tuple[list[dict[str, Any]], pl.DataFrame]:
    """The runs, and rows finished, retries and 429s per second in BINS bins of each of the last
    RUNS_DRAWN runs that sent requests (SQL: the attempts are never read into memory)."""
    empty = pl.DataFrame(
        schema={"run": pl.String, "t_s": pl.Float64, "series": pl.String, "per_s": pl.Float64}
    )
    if checkpoint is None or not checkpoint.exists():
        return [], empty
    db = sqlite3.connect(f"file:{checkpoint}?mode=ro", uri=True)
    with contextlib.closing(db):
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "runs" not in tables:
            return [], empty
        db.row_factory = sqlite3.Row
        runs = [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY run")]
        db.row_factory = None
        spans = db.execute(
            "SELECT run, MIN(sent), MAX(MAX(answered) - MIN(sent), 1e-3), COUNT(*) FROM attempts GROUP BY run"
            " ORDER BY run DESC LIMIT ?",
            (RUNS_DRAWN,),
        ).fetchall()
        if not spans:
            return runs, empty
        # A short run gets fewer bins (about 10 requests each), so that its line is not all gaps.
        spans = [(run, t0, span, max(10, min(BINS, n // 10))) for run, t0, span, n in spans]
        db.execute("CREATE TEMP TABLE spans (run INTEGER PRIMARY KEY, t0 REAL, span REAL, bins INTEGER)")
        db.executemany("INSERT INTO temp.spans VALUES (?, ?, ?, ?)", spans)
        binned = db.execute(
            "SELECT a.run, MIN(CAST((a.answered - s.t0) * s.bins / s.span AS INTEGER), s.bins - 1) AS bin,"
            # `IS`, not `=`: an attempt without an HTTP status (a reset, an unreadable answer)
            # counts 0, where `=` makes the bin's sum NULL when no attempt in it had one.
            " SUM(a.final), SUM(a.attempt > 1), SUM(a.status IS 429)"
            " FROM attempts a JOIN temp.spans s USING (run) GROUP BY 1, 2"
        ).fetchall()
    started = {r["run"]: r for r in runs}
    counts = {(run, b): c for run, b, *c in binned}
    points: list[tuple[str, float, str, float]] = []
    for run, _, span, bins in spans:
        label = _run_label(started[run])
        width = span / bins
        for b in range(bins):
            finished, retries, limited = counts.get((run, b), (0, 0, 0))
            for series, n in (("rows finished", finished), ("retries", retries), ("429s", limited)):
                points.append((label, round((b + 0.5) * width, 3), series, n / width))
    return runs, pl.DataFrame(points, schema=empty.schema, orient="row")


def _run_label(run: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(run["started"]).strftime("%Y-%m-%d %H:%M:%S")
    return f"run {run['run']}, {when}: {run['outcome'] or 'did not end'}"


def _percentiles(answered: pl.LazyFrame, column: str) -> dict[int, float]:
    """p50/p90/p99 as the JSON report computes them; empty when the column has no value."""
    values = pl.col(column).cast(pl.Float64).drop_nulls()
    found = answered.select(values.quantile(p / 100, "linear").alias(str(p)) for p in PERCENTILES)
    row = found.collect(engine="streaming").row(0)
    return {} if row[0] is None else {p: round(v, 1) for p, v in zip(PERCENTILES, row, strict=True)}


def _histogram(answered: pl.LazyFrame, column: str) -> pl.DataFrame:
    """Rows per bin of `column` (BINS equal bins from its least to its greatest value), in two
    streaming passes: the range, then the counts."""
    value = pl.col(column).cast(pl.Float64)
    low, high = (
        answered.select(value.min().alias("low"), value.max().alias("high"))
        .collect(engine="streaming")
        .row(0)
    )
    if low is None:
        return pl.DataFrame(schema={"start": pl.Float64, "end": pl.Float64, "rows": pl.UInt32})
    width = max((high - low) / BINS, 1e-9)
    bin_ = ((value - low) / width).floor().clip(0, BINS - 1).alias("bin")
    counts = answered.select(bin_).drop_nulls().group_by("bin").len().collect(engine="streaming")
    return counts.select(
        (pl.col("bin") * width + low).alias("start"),
        ((pl.col("bin") + 1) * width + low).alias("end"),
        pl.col("len").alias("rows"),
    ).sort("start")


def _shown_rows(table: pl.LazyFrame, job: PreparedJob | None) -> tuple[ShownRow, ...]:
    """The first ROWS_SHOWN answered rows: their answer and cost from the table (read until
    they are found), their input rendered again from the job's input, where the job is known."""
    present = set(table.collect_schema().names())
    answer = pl.coalesce(*(pl.col(c).cast(pl.String) for c in ANSWER_TEXT if c in present), pl.lit(""))
    cost = pl.col("cost_usd").cast(pl.Float64) if "cost_usd" in present else pl.lit(None, pl.Float64)
    found = (
        table.with_row_index("row")
        .filter(pl.col("status") == "ok")
        .head(ROWS_SHOWN)
        .select("row", pl.col("id").cast(pl.String), answer.alias("answer"), cost.alias("cost"))
        .collect(engine="streaming")
    )
    inputs = _inputs(job, found["row"].to_list()) if job is not None else {}
    shown = []
    for row, row_id, answer, cost in found.iter_rows():
        text, images = inputs.get(row, (None, ()))
        shown.append(ShownRow(row_id, text, images, _cut(answer, SHOWN_CHARS), cost))
    return tuple(shown)


def _inputs(job: PreparedJob, rows: list[int]) -> dict[int, tuple[str, tuple[str, ...]]]:
    """The rows' input as shown: the text of each one's last user message and its images."""
    from batchrun.images import ImageRef, thumbnail
    from batchrun.sources import ROW

    settings = job.prompts.images
    shown: dict[int, tuple[str, tuple[str, ...]]] = {}
    for batch in job.source.rows_at(job.row_columns, iter([rows])) if rows else ():
        for row in batch:
            body = job.rendered(row)
            if body is None:
                continue
            messages: list[dict[str, Any]] = body["messages"]
            user: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
            content = user.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            text = " ".join(p["text"] for p in parts if p.get("type") == "text")
            images = []
            for part in parts:
                image = part.get("image_url")
                if isinstance(image, ImageRef) and settings is not None:
                    small = thumbnail(image, settings, THUMBNAIL_SIDE, THUMBNAIL_BYTES)
                    images.append(small or image.name)
                elif isinstance(image, dict):  # a URL sent as it is: named, never fetched by the page
                    images.append(_cut(str(image.get("url")), 80))
            shown[row[ROW]] = (_cut(text, SHOWN_CHARS), tuple(images))
    return shown


# --- drawing ----------------------------------------------------------------------------------


def _figure(svg: str) -> str:
    return f'<figure class="chart">{svg}</figure>'


def _throughput_chart(points: pl.DataFrame) -> str:
    """A panel a run, the last first (as _history lists them), its series as _history names them."""
    panels = [
        (
            str(run),
            [
                charts.Series(str(name), line["t_s"].to_list(), line["per_s"].to_list())
                for (name,), line in part.group_by("series", maintain_order=True)
            ],
        )
        for (run,), part in points.group_by("run", maintain_order=True)
    ]
    return _figure(charts.step_lines(panels, "seconds into the run", "per second"))


def _distribution(answered: pl.LazyFrame, column: str, title: str, marks: dict[int, float]) -> str:
    bins = _histogram(answered, column)
    if not bins.height:
        return _note(f"No {title}: no answered row has one.")
    shown = [(v, f"p{p} {v:,.0f}") for p, v in marks.items()]
    return _figure(charts.histogram(bins.rows(), title, shown))


def _cost(costs: pl.DataFrame, table: pl.LazyFrame, by: tuple[str, ...]) -> str:
    groups = costs.filter(pl.col("model") != "total")
    priced = groups.filter(pl.col("cost_usd").is_not_null() & (pl.col("cost_usd") > 0))
    parts = []
    if priced.height:
        models = priced["model"].unique(maintain_order=True).to_list()
        stacks = []
        for (status,), part in priced.group_by("status", maintain_order=True):
            cost = dict(part.group_by("model").agg(pl.col("cost_usd").sum()).iter_rows())
            stacks.append((str(status), [cost.get(m) for m in models]))
        colors = [STATUS_COLORS.get(status, charts.COLORS[3]) for status, _ in stacks]
        labels = [str(m) for m in models]
        parts.append(_figure(charts.bars(labels, stacks, "cost (USD)", colors=colors, legend=True)))
    else:
        parts.append(_note("No cost: the model has no price, or no answer reported usage."))
    parts.append(_cost_table(groups))
    for column in by:
        parts.append(_cost_by(table, column))
    return "\n".join(parts)


def _cost_by(table: pl.LazyFrame, column: str) -> str:
    top = (
        cost_report(table, (column,))
        .filter(pl.col(column) != "total")
        .group_by(column)
        .agg(pl.col("cost_usd").sum(), pl.col("rows").sum())
        .sort("cost_usd", descending=True, nulls_last=True)
        .head(TOP_VALUES)
    )
    title = f"cost by {column} (top {TOP_VALUES})"
    values = [("cost", top["cost_usd"].to_list())]
    return _figure(charts.bars(top[column].to_list(), values, "cost (USD)", title, [charts.COLORS[3]]))


def _failures(table: pl.LazyFrame, job_file: str | None) -> str:
    failed = table.filter(pl.col("status") == "failed")
    kinds = (
        failed.group_by(pl.col("error_kind").fill_null("unknown"))
        .agg(
            pl.len().alias("rows"),
            pl.col("id").cast(pl.String).head(EXAMPLES).alias("ids"),
            pl.col("error").head(EXAMPLES).alias("errors"),
        )
        .sort(["rows", "error_kind"], descending=[True, False])
        .collect(engine="streaming")
    )
    if not kinds.height:
        return _section("Failures", _note("No row failed."), "")
    chart = charts.bars(
        kinds["error_kind"].to_list(),
        [("rows", kinds["rows"].to_list())],
        "rows",
        colors=[STATUS_COLORS["failed"]],
    )
    examples = "".join(
        f"<tr><td>{_e(kind)}</td><td class=num>{rows:,}</td><td>{_e(row_id)}</td>"
        f"<td>{_e(_cut(error))}</td></tr>"
        for kind, rows, ids, errors in kinds.iter_rows()
        for row_id, error in zip(ids, errors, strict=True)
    )
    resend = f"batchrun {job_file} --retry-failed" if job_file else "batchrun JOB --retry-failed"
    body = (
        _figure(chart)
        + "<table>"
        + _header_row("kind", "rows", "example id", "error")
        + examples
        + f"</table><p>To send the failed rows again: <code>{_e(resend)}</code>, "
        "or <code>job.run(retry_failed=True)</code> in Python</p>"
    )
    return _section("Failures", body, f"Up to {EXAMPLES} example rows of each kind.")


def _summary(
    rows: dict[str, int], total: dict[str, Any], saved: dict[str, Any], runs: list[dict[str, Any]]
) -> str:
    outcome = runs[-1]["outcome"] if runs and runs[-1]["outcome"] else saved.get("outcome", "unknown")
    wall = sum((r["ended"] or r["started"]) - r["started"] for r in runs) if runs else None
    if wall is None and isinstance(saved.get("this_run"), dict):
        wall = saved["this_run"].get("wall_s")
    line = f"Outcome of the last run: <b>{_e(outcome)}</b>"
    if saved.get("error"):
        line += f": {_e(_cut(saved['error']))}"
    figures = [
        *(
            (f"rows {status}", f"rows-{status}", f"{rows.get(status, 0):,}")
            for status in ("ok", "failed", "skipped", "pending")
        ),
        ("rows in all", "rows-total", f"{sum(rows.values()):,}"),
        ("prompt tokens", "tokens-prompt", _count(total["prompt_tokens"])),
        ("completion tokens", "tokens-completion", _count(total["completion_tokens"])),
        ("cost", "cost-total", _usd(total["cost_usd"], "unknown")),
    ]
    cost = saved.get("cost_usd") or {}
    estimate = (cost.get("estimate") or {}).get("expected")
    if estimate is not None:
        figures.append(("estimated cost before the run", "cost-estimate", _usd(estimate)))
    if wall is not None:
        figures.append(("wall time, all runs", "wall-time", f"{wall:,.1f} s"))
    if runs:
        figures.append(("runs", "runs", f"{len(runs)}"))
    cells = "".join(
        f'<tr><th>{name}</th><td id="{key}" class=num>{value}</td></tr>' for name, key, value in figures
    )
    return f'<h1>batchrun run report</h1><p class="outcome">{line}</p><table class="summary">{cells}</table>'


def _modes_table(modes: dict[str, dict[str, Any]]) -> str:
    """Online and batch rows side by side (report.by_mode)."""
    online, batch = modes["online"], modes["batch"]
    lines = [
        ("rows ok", "ok", _count(online["ok"]), _count(batch["ok"])),
        ("rows failed", "failed", _count(online["failed"]), _count(batch["failed"])),
        ("cost", "cost", _usd(online["cost_usd"]), _usd(batch["cost_usd"])),
        *(
            (
                f"p{p} from sending to the answer",
                f"p{p}",
                _time(online["latency_ms"][f"p{p}"], "ms"),
                _time(batch["submit_to_answer_s"][f"p{p}"], "s"),
            )
            for p in PERCENTILES
        ),
    ]
    body = "".join(
        f'<tr><th>{name}</th><td id="online-{key}" class=num>{a}</td>'
        f'<td id="batch-{key}" class=num>{b}</td></tr>'
        for name, key, a, b in lines
    )
    caption = (
        "Rows sent as chat requests and in provider batches; a batch row waits from its batch's "
        "submission to its collection."
    )
    return _section("Online and batch", f"<table>{_header_row('', 'online', 'batch')}{body}</table>", caption)


def _time(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:,.1f} {unit}"


def _rows_section(rows: tuple[ShownRow, ...]) -> str:
    if not rows:
        return _section("Rows", _note("No row was answered."), "")
    with_input = any(r.text is not None for r in rows)
    head = _header_row("id", *(["input"] if with_input else []), "answer", "cost")
    body = "".join(
        f"<tr><td>{_e(r.id)}</td>"
        + (f"<td>{_input_cell(r)}</td>" if with_input else "")
        + f"<td>{_e(r.answer)}</td><td class=num>{_usd(r.cost_usd)}</td></tr>"
        for r in rows
    )
    caption = f"The first {len(rows)} answered rows" + (
        ": the text of each one's last user message and its images, its answer and its cost."
        if with_input
        else ", their answers and cost (the input is shown when the page is drawn from the job)."
    )
    return _section("Rows", f'<table class="rows">{head}{body}</table>', caption)


_THUMBNAIL = re.compile(r"data:image/(?:jpeg|png|gif|webp);base64,[A-Za-z0-9+/]+=*")


def _input_cell(row: ShownRow) -> str:
    """A row's thumbnails (data URLs made by images.thumbnail), the names of the images not
    shown, and its text."""
    images = "".join(
        f'<img class=thumb src="{image}" alt="image {i}">'
        if _THUMBNAIL.fullmatch(image)
        else f"<span class=image>[{_e(image)}]</span>"
        for i, image in enumerate(row.images, 1)
    )
    return images + _e(row.text or "")


def _cost_table(groups: pl.DataFrame) -> str:
    head = _header_row("model", "status", "rows", "prompt", "completion", "cost")
    body = "".join(
        f"<tr><td>{_e(g['model'])}</td><td>{_e(g['status'])}</td><td class=num>{g['rows']:,}</td>"
        f"<td class=num>{_count(g['prompt_tokens'])}</td><td class=num>{_count(g['completion_tokens'])}</td>"
        f"<td class=num>{_usd(g['cost_usd'])}</td></tr>"
        for g in groups.iter_rows(named=True)
    )
    return f"<table>{head}{body}</table>"


def _runs_table(runs: list[dict[str, Any]], saved: dict[str, Any]) -> str:
    head = _header_row("run", "started", "seconds", "outcome", "driver", "workers", "requests")
    body = "".join(
        f"<tr><td class=num>{r['run']}</td><td>{datetime.fromtimestamp(r['started']):%Y-%m-%d %H:%M:%S}</td>"
        f"<td class=num>{'-' if r['ended'] is None else format(r['ended'] - r['started'], ',.1f')}</td>"
        f"<td>{_e(r['outcome'] or 'did not end')}</td><td>{_e(r['driver'])}</td>"
        f"<td class=num>{r['workers'] or '-'}</td><td class=num>{_count(r['requests'])}</td></tr>"
        for r in runs
    )
    workers = (saved.get("this_run") or {}).get("workers")
    extra = ""
    if workers:
        columns = list(workers[0])
        extra = (
            "<h3>Ray workers, last run</h3><table>"
            + _header_row("worker", *columns)
            + "".join(
                f"<tr><td class=num>{i}</td>"
                + "".join(f"<td class=num>{w[c]:,}</td>" for c in columns)
                + "</tr>"
                for i, w in enumerate(workers, 1)
            )
            + "</table>"
        )
    return _section("Runs", f"<table>{head}{body}</table>{extra}", "")


def _header_row(*names: str) -> str:
    return "<tr>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"


def _section(title: str, body: str, caption: str) -> str:
    caption_html = f"<p class=caption>{_e(caption)}</p>" if caption else ""
    return f"<section><h2>{_e(title)}</h2>{caption_html}{body}</section>"


def _note(text: str) -> str:
    return f"<p class=note>{_e(text)}</p>"


def _count(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def _usd(value: float | None, none: str = "-") -> str:
    return none if value is None else f"${value:,.6f}"


def _cut(text: str | None, width: int = 200) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _e(value: Any) -> str:
    return html.escape(str(value))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 760px; color: #222; }}
body {{ padding: 0 1em; }} h1 {{ font-size: 1.5em; margin-bottom: .2em; }}
h2 {{ font-size: 1.2em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
th, td {{ padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }} .caption, .note {{ color: #666; }}
figure.chart {{ margin: .5em 0; }} code {{ background: #f4f4f4; padding: 1px 4px; }}
table.rows td {{ max-width: 330px; overflow-wrap: anywhere; }} table.rows td.num {{ white-space: nowrap; }}
.image {{ color: #666; }}
img.thumb {{ max-width: 64px; max-height: 64px; float: left; margin: 0 8px 4px 0; }}
</style></head>
<body>
{body}
</body></html>
"""
