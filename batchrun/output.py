"""The output table: every input row once, in input order, written whole or not at all, to a
local file (temp file + rename) or to an object-store URL (one upload, published whole)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from batchrun.errors import BatchrunError
from batchrun.job import FieldType, TableFormat, table_format
from batchrun.results import OUTPUT_RESULT_COLUMNS, RESULT_SCHEMA
from batchrun.sources import ROW, Source
from batchrun.storage import Location, Url, cloud_reason
from batchrun.structured import polars_type

OUTPUT_ROWS = 16_384  # rows per part of the output: the input's ids, their results, as one frame
# Fetches the next n rows' results from the checkpoint, in row order (Checkpoint.output_rows).
FetchResults = Callable[[int], list[tuple[Any, ...]]]


def write_output(
    source: Source,
    include_columns: tuple[str, ...],
    fetch: FetchResults,
    path: Location,
    format: TableFormat | None = None,
    *,
    limit: int | None = None,
    fields: Mapping[str, FieldType] | None = None,
) -> dict[str, int]:
    """Write the output table (every input row once, in input order, rows without a result
    `pending`) to `path` atomically, in `format` or as its suffix says; returns rows by status.

    Flat memory: the input (its id and include_columns) and the checkpoint's results are both in
    row order, so they are zipped a batch at a time, no join and no table held whole; each batch
    goes to the file as it is made (Parquet: parts in a temp folder, then one streaming sink).
    """
    try:
        found = table_format(path, format, "output.path", "output.format")
    except ValueError as exc:
        raise BatchrunError(str(exc)) from None
    counts: dict[str, int] = {}
    batches = _output_batches(source, include_columns, fetch, limit, fields or {}, counts)

    def build(target: Path) -> None:
        if found == "parquet":
            _write_parquet(batches, target)
        else:
            _write_text(batches, target, found)

    if isinstance(path, Path):
        write_atomically(path, build)
        return counts
    with tempfile.TemporaryDirectory(prefix="batchrun-output-") as folder:  # built here, then uploaded
        built = Path(folder) / f"output.{found}"
        build(built)
        write_to(path, lambda url: _upload(built, found, url))
    return counts


def _upload(built: Path, format: TableFormat, url: str) -> None:
    """Stream a table built locally to `url` with polars' sinks (one object, published whole)."""
    if format == "parquet":
        pl.scan_parquet(built).sink_parquet(url)
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
    counts: dict[str, int],
) -> Iterator[pl.DataFrame]:
    id_expr = pl.col(source.id_column) if source.id_column else pl.col(ROW)
    extra = [c for c in include_columns if c != "id"]
    rows = source.lazy().select(pl.col(ROW), id_expr.alias("id"), *extra)
    struct = pl.Struct({name: polars_type(field) for name, field in fields.items()})
    for frame in source.frames(rows, limit, OUTPUT_ROWS):
        results = pl.DataFrame(fetch(frame.height), schema=RESULT_SCHEMA, orient="row")
        if results.height != frame.height or (
            results.height and results["row"][0] != frame[ROW][0]
        ):  # the index covers every row the run reached; the runner finishes it before this
            raise BatchrunError("the checkpoint's index of the input's rows is incomplete; rerun the job")
        results = _reused(results, frame["id"].cast(pl.String)).drop("id", "row", "request_key", "occurrence")
        if fields:
            results = results.with_columns(pl.col("fields").str.json_decode(struct)).unnest("fields")
        table = pl.concat([frame.select("id", *extra), results], how="horizontal").with_columns(
            pl.col("status").fill_null("pending"), pl.col("attempts").fill_null(0)
        )
        for status, n in table["status"].value_counts().iter_rows():
            counts[status] = counts.get(status, 0) + n
        yield table.select("id", *extra, *fields, *OUTPUT_RESULT_COLUMNS)


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
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as parts:
        for i, batch in enumerate(batches):
            batch.write_parquet(Path(parts) / f"{i:08d}.parquet")
        pl.scan_parquet(Path(parts) / "*.parquet").sink_parquet(path)


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
    a reader sees the old file or the new one, never half of one."""
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
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise BatchrunError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
