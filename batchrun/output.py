"""The output table: every input row once, in input order, written whole or not at all, to a
local file (temp file + rename) or to an object-store URL (one upload, published whole)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
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


def build_table(
    source: Source,
    include_columns: tuple[str, ...],
    results: list[tuple[Any, ...]],
    limit: int | None,
    fields: Mapping[str, FieldType] | None = None,
) -> pl.DataFrame:
    """Join results onto the input's rows; rows without a result are `pending`. Declared
    output.fields become typed columns (null where a row has none)."""
    fields = fields or {}
    done = pl.DataFrame(results, schema=RESULT_SCHEMA, orient="row").drop("id")
    if fields:
        struct = pl.Struct({name: polars_type(field) for name, field in fields.items()})
        done = done.with_columns(pl.col("fields").str.json_decode(struct)).unnest("fields")
    else:
        done = done.drop("fields")
    id_expr = pl.col(source.id_column) if source.id_column else pl.col(ROW)
    extra = [c for c in include_columns if c != "id"]
    rows = source.lazy().select(pl.col(ROW), id_expr.alias("id"), *extra)
    if limit is not None:
        rows = rows.head(limit)
    table = (
        rows.join(
            done.lazy().rename({"row": ROW}).with_columns(pl.col(ROW).cast(pl.UInt32)),
            on=ROW,
            how="left",
        )
        .with_columns(pl.col("status").fill_null("pending"), pl.col("attempts").fill_null(0))
        .sort(ROW)
        .select("id", *extra, *fields, *OUTPUT_RESULT_COLUMNS)
        .collect()
    )
    return table


def _lists_as_json(table: pl.DataFrame) -> pl.DataFrame:
    """CSV has no lists: write them as JSON text (`["a", "b"]`)."""
    lists = [name for name, dtype in table.schema.items() if isinstance(dtype, pl.List)]
    return table.with_columns(
        pl.Series(name, [None if v is None else orjson.dumps(v).decode() for v in table[name].to_list()])
        for name in lists
    )


def write_table(table: pl.DataFrame, path: Location, format: TableFormat | None = None) -> None:
    """Write in `format` (output.format), else as the path's suffix says, atomically."""
    try:
        found = table_format(path, format, "output.path", "output.format")
    except ValueError as exc:
        raise BatchrunError(str(exc)) from None
    if found == "parquet":
        write_to(path, table.write_parquet)
    elif found == "csv":
        write_to(path, _lists_as_json(table).write_csv)
    else:
        write_to(path, table.write_ndjson)


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
