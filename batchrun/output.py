"""The output table: every input row once, in input order, written whole or not at all, to a
local file (temp file + rename) or to an object-store URL (one upload, published whole)."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from polars.io.plugins import register_io_source

from batchrun.checkpoint import OUTPUT_ROW_COLUMNS
from batchrun.errors import BatchrunError
from batchrun.job import FieldType, TableFormat, table_format
from batchrun.results import ANSWER_COLUMNS, OUTPUT_RESULT_COLUMNS, RESULT_SCHEMA, USAGE_REPORTED
from batchrun.sources import ROW, Source
from batchrun.storage import Location, Url, cloud_reason
from batchrun.structured import polars_type

# Rows per part of the output (the input's ids, their results, as one frame) and per Parquet row
# group: a reader of the output (the run's report page, `cost`, the user's own scans) decodes a
# few row groups at a time; at 81,920 rows a group (polars' default here) the page's scan of 1M
# rows peaked at 418 MB, at 16,384 at 200 MB, for a file 0.3% larger.
OUTPUT_ROWS = 16_384
# Fetches the next n rows' results from the checkpoint, in row order (Checkpoint.output_rows),
# as tuples of OUTPUT_ROW_COLUMNS.
FetchResults = Callable[[int], list[tuple[Any, ...]]]
_FETCHED = {c: RESULT_SCHEMA[c] for c in OUTPUT_ROW_COLUMNS}
USAGE_COLUMNS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")
ERRORS_KEPT = 10_000  # distinct messages of failed rows counted; past it top_errors() gives up


def _file_mode() -> int:
    """The mode open() gives a new file (0o666 less the umask), for files written through a temp
    file, which mkstemp makes 0600 whatever the umask. Read once, at import: reading the umask
    means setting it, which would race another thread creating a file while a job runs."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


# Rows that got an answer (so were billed), and those among them without usage: as in checkpoint.py.
ANSWERED = (pl.col("status") == "ok") | pl.any_horizontal(pl.col(c).is_not_null() for c in ANSWER_COLUMNS)
NO_USAGE = ANSWERED & pl.any_horizontal(pl.col(c).is_null() for c in USAGE_REPORTED)
_SENT = pl.col("status").is_in(["ok", "failed"])


def _billed_sums(own: pl.Expr) -> list[pl.Expr]:
    """The sums of Checkpoint.used_sums (same names, same meanings) over the rows where `own`:
    each result once, where it was sent."""
    sent = own & _SENT
    return [
        pl.col("cost_usd").filter(own).sum().alias("cost_usd"),
        *(pl.col(c).filter(own).sum().alias(c) for c in USAGE_REPORTED),
        *(pl.col(c).filter(own).count().alias(f"{c}_known") for c in USAGE_REPORTED),
        (own & NO_USAGE).sum().alias("without_usage"),
        sent.sum().alias("sent"),
        (sent & NO_USAGE).sum().alias("sent_without_usage"),
        *(pl.col(c).filter(sent).sum().alias(f"sent_{c}") for c in USAGE_COLUMNS),
    ]


@dataclass
class Tally:
    """What the output's rows come to, summed part by part as they are written: the run's
    summary and report, without another pass over the checkpoint.

    Rows by status, failures by kind and by message count every row (in --limit's scope).
    Tokens and cost (`sums`, named as Checkpoint.used_sums) count each result once, however many
    rows share it: at the row it was sent for; a row that reused another's answer (dedupe)
    carries 0 and is not counted. A row without usage is unknown, not zero."""

    by_status: Counter[str] = field(default_factory=Counter)
    failures_by_kind: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] | None = field(default_factory=Counter)  # None: over ERRORS_KEPT messages
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, table: pl.DataFrame) -> None:
        """Count one part of the output (its `status` filled: `pending` where no result)."""
        for status, n in table["status"].value_counts().iter_rows():
            self.by_status[status] += n
        own = pl.col("reused_from").is_null() & (pl.col("status") != "pending")
        for name, value in table.select(_billed_sums(own)).row(0, named=True).items():
            self.sums[name] = self.sums.get(name, 0) + value
        failed = table.filter(pl.col("status") == "failed")
        if not failed.height:
            return
        for kind, n in failed.group_by("error_kind").len().iter_rows():
            self.failures_by_kind[kind or "unknown"] += n
        if self.errors is not None:
            for error, n in failed.group_by("error").len().iter_rows():
                self.errors[error or "(no message)"] += n
            if len(self.errors) > ERRORS_KEPT:
                self.errors = None

    def kinds(self) -> dict[str, int]:
        """Failed rows by error kind, commonest first (as Checkpoint.failures_by_kind)."""
        return dict(sorted(self.failures_by_kind.items(), key=lambda kv: (-kv[1], kv[0])))

    def top_errors(self, n: int = 3) -> list[tuple[str, int]] | None:
        """The `n` commonest messages of failed rows (as Checkpoint.top_errors); None: too many
        distinct messages were seen to keep count of them all (ask the checkpoint)."""
        if self.errors is None:
            return None
        return sorted(self.errors.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def tokens(self, column: str) -> int | None:
        """Prompt or completion tokens of the results used (as Checkpoint.totals): None when
        answers came and none reported them, 0 when nothing was answered."""
        if self.sums.get(f"{column}_known"):
            return int(self.sums[column])
        return None if self.sums.get("without_usage") else 0

    @property
    def without_usage(self) -> int:
        return int(self.sums.get("without_usage", 0))

    @property
    def cost_usd(self) -> float:
        return float(self.sums.get("cost_usd", 0.0))

    def usage(self) -> dict[str, int | None]:
        """Token sums by USAGE_COLUMNS over the sent results (ok or failed): None for
        all of them when answers came and none reported usage."""
        sent = self.sums.get("sent", 0)
        unknown = bool(sent) and self.sums.get("sent_without_usage") == sent
        return {c: None if unknown else int(self.sums.get(f"sent_{c}", 0)) for c in USAGE_COLUMNS}


def write_output(
    source: Source,
    include_columns: tuple[str, ...],
    fetch: FetchResults,
    path: Location,
    format: TableFormat | None = None,
    *,
    limit: int | None = None,
    fields: Mapping[str, FieldType] | None = None,
) -> Tally:
    """Write the output table (every input row once, in input order, rows without a result
    `pending`) to `path` atomically, in `format` or as its suffix says; returns its Tally.

    Flat memory: the input (its id and include_columns) and the checkpoint's results are both in
    row order, so they are zipped a batch at a time, no join and no table held whole; each batch
    goes to the file as it is made (Parquet: parts in a temp folder, then one streaming sink).
    """
    try:
        found = table_format(path, format, "output.path", "output.format")
    except ValueError as exc:
        raise BatchrunError(str(exc)) from None
    tally = Tally()
    batches = _output_batches(source, include_columns, fetch, limit, fields or {}, tally)

    def build(target: Path) -> None:
        if found == "parquet":
            _write_parquet(batches, target)
        else:
            _write_text(batches, target, found)

    if isinstance(path, Path):
        write_atomically(path, build)
        return tally
    with tempfile.TemporaryDirectory(prefix="batchrun-output-") as folder:  # built here, then uploaded
        built = Path(folder) / f"output.{found}"
        build(built)
        write_to(path, lambda url: _upload(built, found, url))
    return tally


def _upload(built: Path, format: TableFormat, url: str) -> None:
    """Stream a table built locally to `url` with polars' sinks (one object, published whole)."""
    if format == "parquet":
        pl.scan_parquet(built).sink_parquet(url, row_group_size=OUTPUT_ROWS)
    elif format == "csv":
        pl.scan_csv(built, infer_schema=False).sink_csv(url)
    else:
        pl.scan_ndjson(built, infer_schema_length=None).sink_ndjson(url)


def _output_batches(
    source: Source,
    include_columns: tuple[str, ...],
    fetch: FetchResults,
    limit: int | None,
    fields: Mapping[str, FieldType],
    tally: Tally,
) -> Iterator[pl.DataFrame]:
    id_expr = pl.col(source.id_column) if source.id_column else pl.col(ROW)
    extra = [c for c in include_columns if c != "id"]
    rows = source.lazy().select(pl.col(ROW), id_expr.alias("id"), *extra)
    struct = pl.Struct({name: polars_type(field) for name, field in fields.items()})
    for frame in source.frames(rows, limit, OUTPUT_ROWS):
        results = _frame(fetch(frame.height))
        if results.height != frame.height or (
            results.height and results["row"][0] != frame[ROW][0]
        ):  # the index covers every row the run reached; the runner finishes it before this
            raise BatchrunError("the checkpoint's index of the input's rows is incomplete; rerun the job")
        results = _reused(results, frame["id"].cast(pl.String)).drop("row")
        if fields:
            results = results.with_columns(pl.col("fields").str.json_decode(struct)).unnest("fields")
        table = pl.concat([frame.select("id", *extra), results], how="horizontal").with_columns(
            pl.col("status").fill_null("pending"), pl.col("attempts").fill_null(0)
        )
        tally.add(table)
        yield table.select("id", *extra, *fields, *OUTPUT_RESULT_COLUMNS)


def _frame(rows: list[tuple[Any, ...]]) -> pl.DataFrame:
    """Rows fetched from the checkpoint as a frame, built a column at a time: polars' row-wise
    constructor took 40% longer (20,000 rows: 41 ms against 24)."""
    columns = zip(*rows, strict=True) if rows else ([] for _ in _FETCHED)
    return pl.DataFrame(dict(zip(_FETCHED, columns, strict=True)), schema=_FETCHED)


# What a row that reused another row's answer (dedupe) was not billed for: counted once, there.
_BILLED = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
)


def _reused(results: pl.DataFrame, ids: pl.Series) -> pl.DataFrame:
    """`reused_from` where a row's answer was sent for another row (not where its own row was
    moved in the input), and that row's cost, tokens and attempts at 0: billed once."""
    if results["reused_from"].is_null().all():
        return results
    reused = pl.col("reused_from").is_not_null()
    results = results.with_columns(
        pl.when(pl.col("reused_from") != ids).then(pl.col("reused_from")).alias("reused_from")
    )
    zero = [pl.when(reused & pl.col(c).is_not_null()).then(0).otherwise(pl.col(c)).alias(c) for c in _BILLED]
    return results.with_columns(
        *zero, pl.when(reused).then(0).otherwise(pl.col("attempts")).alias("attempts")
    )


def _write_parquet(batches: Iterator[pl.DataFrame], path: Path) -> None:
    first = next(batches)  # there is one: an input has rows (sources.py refuses an empty one)
    sink_frames(itertools.chain([first], batches), first.schema, path)


def sink_frames(frames: Iterable[pl.DataFrame], schema: pl.Schema, path: Path) -> None:
    """Write `frames`, in order, to one Parquet file by polars' streaming sink, which pulls each
    as it writes (an IO source): no frame held past its turn, each row encoded once, in row
    groups of OUTPUT_ROWS. Writing parts to files and sinking those into one took twice as
    long (1M rows of output: 3.9 s against 1.8 s on one core)."""

    def source(*_pushdown: object) -> Iterator[pl.DataFrame]:  # sunk whole: nothing to push down
        yield from frames

    register_io_source(source, schema=schema).sink_parquet(path, row_group_size=OUTPUT_ROWS)


def _write_text(batches: Iterator[pl.DataFrame], path: Path, format: TableFormat) -> None:
    with path.open("wb") as f:
        for i, batch in enumerate(batches):
            if format == "csv":
                _lists_as_json(batch).write_csv(f, include_header=i == 0)
            else:
                batch.write_ndjson(f)


def _lists_as_json(table: pl.DataFrame) -> pl.DataFrame:
    """CSV has no lists: write them as JSON text (`["a", "b"]`)."""
    lists = [name for name, dtype in table.schema.items() if isinstance(dtype, pl.List)]
    return table.with_columns(
        pl.Series(name, [None if v is None else orjson.dumps(v).decode() for v in table[name].to_list()])
        for name in lists
    )


def write_to(destination: Location, write: Callable[[str], object]) -> None:
    """`write(target)` a whole table (e.g. `frame.write_parquet` or `lazy.sink_parquet`) so that a
    reader sees the old table or the new one, never part of one: a local file through a temp file
    and a rename; a URL by polars' own upload, which the object store publishes only once it is
    complete (a PUT, or a multipart upload made visible by its last call)."""
    if isinstance(destination, Path):
        write_atomically(destination, lambda tmp: write(str(tmp)))
        return
    try:
        write(str(destination))
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise BatchrunError(f"cannot write {destination}: {cloud_reason(exc)}") from None


PROBE_NAME = ".batchrun-write-test"


def probe_destination(url: Url) -> None:
    """Check before the first request that the output's bucket takes writes: a one-line object
    named PROBE_NAME beside the output (polars can write objects but not delete them, so it
    stays, and each run writes it again)."""
    probe = url.beside(PROBE_NAME)
    try:
        pl.DataFrame({"batchrun": ["write test"]}).write_csv(str(probe))
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise BatchrunError(f"cannot write to {url}: {cloud_reason(exc)}") from None


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temp file in the same folder, then an atomic rename onto `path`:
    a reader sees the old file or the new one, never half of one. It gets _FILE_MODE, as a file
    the user made would."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise BatchrunError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise BatchrunError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
