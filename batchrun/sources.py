"""Input tables (CSV, Parquet, JSONL): opened lazily, checked against the job, read in batches.

An input is one file, a glob of files or a folder of Parquet files (read as one table, the files
in sorted order), local or at an object-store URL (storage.py)."""

from __future__ import annotations

import difflib
import glob
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from batchrun.errors import InputError
from batchrun.job import TableFormat, table_format
from batchrun.storage import Location, Url, cloud_reason, is_glob

ROW = "__batchrun_row"  # the 0-based row number, carried through every stage
BATCH_ROWS = 8192


def scan_table(
    path: Location, format: TableFormat | None = None, key: str = "table", format_key: str | None = None
) -> pl.LazyFrame:
    """A lazy scan of `path` in `format`, else the one its suffix names (compressed CSV and JSON
    lines, e.g. `.csv.gz`, read as such given their format); `key` names the path in errors.
    A folder is read as its Parquet files; polars sorts the files a URL's glob or folder lists."""
    found = input_format(path, format, key, format_key)
    source = str(path) if isinstance(path, Url) else local_files(path)
    if found == "csv":
        return pl.scan_csv(source, infer_schema_length=10_000)
    if found == "parquet":
        return pl.scan_parquet(source)
    return pl.scan_ndjson(source, infer_schema_length=10_000)


def input_format(
    path: Location, format: TableFormat | None = None, key: str = "table", format_key: str | None = None
) -> TableFormat:
    """The format of a table at `path`: `format`, else what its suffix says; a folder is Parquet."""
    folder = path.is_folder if isinstance(path, Url) else path.is_dir()
    if folder and format in (None, "parquet"):
        return "parquet"
    try:
        return table_format(path, format, key, format_key)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def local_files(path: Path) -> list[Path]:
    """The files a local input names, sorted: a stable row order however they were listed."""
    if is_glob(path):
        files = sorted(p for p in map(Path, glob.glob(str(path))) if p.is_file())
        if not files:
            raise InputError(f"input {path} matches no files")
        return files
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if p.is_file())
        if not files:
            raise InputError(f"input folder {path} holds no .parquet files")
        return files
    return [path]


@dataclass(frozen=True)
class Source:
    """An input table checked against the columns the job needs."""

    path: Location
    id_column: str | None
    columns: tuple[str, ...]  # every column of the table
    row_count: int
    name: str  # how messages name it: its file's name, or "the DataFrame" for a table given in Python
    format: TableFormat | None = None  # input.format; None: the path's suffix says it

    def lazy(self) -> pl.LazyFrame:
        return scan_table(self.path, self.format).with_row_index(ROW)

    def batches(
        self, columns: tuple[str, ...], limit: int | None, rows: int = BATCH_ROWS
    ) -> Iterator[list[dict[str, Any]]]:
        """Rows as dicts holding `columns` and ROW, in input order, `rows` at a time."""
        for batch in self.frames(self.lazy().select(ROW, *columns), limit, rows):
            yield batch.to_dicts()

    def frames(self, query: pl.LazyFrame, limit: int | None, rows: int) -> Iterator[pl.DataFrame]:
        """`query` (over this input, row for row) `rows` at a time, in order, in bounded memory.
        Parquet by slices, each read from the row groups it touches: polars' collect_batches
        reads ahead of its consumer (1.1 GB held for 10M rows of ~300 characters, 400 MB for
        1M). CSV and JSON lines by collect_batches: a slice of them parses from the start."""
        total = min(self.row_count, self.row_count if limit is None else limit)
        if input_format(self.path, self.format) != "parquet":
            yield from query.head(total).collect_batches(chunk_size=rows)
            return
        for offset in range(0, total, rows):
            yield query.slice(offset, min(rows, total - offset)).collect()

    def rows_at(self, columns: tuple[str, ...], pages: Iterator[list[int]]) -> Iterator[list[dict[str, Any]]]:
        """For each page of row positions (ascending, each page past the last), those rows as
        `batches` gives them. Parquet: each run of near positions read as one slice (only the row
        groups it touches); CSV and JSON lines: one pass over the input, the pages picked from it."""
        query = self.lazy().select(ROW, *columns)
        if input_format(self.path, self.format) == "parquet":
            for page in pages:
                runs = [0, *(i for i in range(1, len(page)) if page[i] - page[i - 1] > BATCH_ROWS), len(page)]
                rows: list[dict[str, Any]] = []
                for a, b in itertools.pairwise(runs):
                    lo, hi = page[a], page[b - 1]
                    frame = query.slice(lo, hi - lo + 1).filter(pl.col(ROW).is_in(page[a:b])).collect()
                    rows += frame.to_dicts()
                yield rows
            return
        frames = self.frames(query, None, BATCH_ROWS)
        frame = next(frames)
        for page in pages:
            picked = [frame.filter(pl.col(ROW).is_in(page))]
            while frame.height == 0 or frame[ROW][-1] < page[-1]:
                frame = next(frames)
                picked.append(frame.filter(pl.col(ROW).is_in(page)))
            yield pl.concat(picked).to_dicts()

    def identity(self) -> list[tuple[str, int, int]] | None:
        """Each local input file's path, size and mtime_ns (what rsync and make trust): while
        they are unchanged, so is the table. None for a URL: no identity, always read whole."""
        if isinstance(self.path, Url):
            return None
        return [(str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in local_files(self.path)]

    def fingerprint(self) -> str:
        """A hash of a single local file's bytes: results are only reused for the very same input.
        Many files or a URL are not read whole for it: their names and sizes (or the URL), columns
        and row count stand in. Used only to migrate a checkpoint of schema 0 or 1 (keyed by row)."""
        if isinstance(self.path, Path) and self.path.is_file():
            with self.path.open("rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256(f"{self.path}\n{self.columns}\n{self.row_count}".encode())
        if isinstance(self.path, Path):
            for file in local_files(self.path):
                digest.update(f"\n{file.name} {file.stat().st_size}".encode())
        return digest.hexdigest()


def open_source(
    path: Location,
    id_column: str | None,
    needed: dict[str, tuple[str, ...]],
    no_nulls: tuple[str, ...] = (),
    format: TableFormat | None = None,
    name: str | None = None,
) -> Source:
    """Open and check the input; `needed` maps a job key (e.g. 'prompt.user') to its columns,
    `no_nulls` names the columns in which an empty value is an error, `format` is input.format,
    `name` how messages call the input (by default, its file's name)."""
    called = name or path.name
    if isinstance(path, Path) and not is_glob(path) and not path.exists():
        raise InputError(f"input file not found: {path}")
    try:
        columns = tuple(scan_table(path, format, "input.path", "input.format").collect_schema().names())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(path, exc) from None
    for key, cols in needed.items():
        for col in cols:
            if col not in columns:
                raise InputError(
                    f"{key} names column '{col}', which {called} does not have; {_hint(col, columns)}"
                )
    if id_column is not None and id_column not in columns:
        raise InputError(
            f"input.id_column '{id_column}' is not a column of {called}; {_hint(id_column, columns)}"
        )
    used = dict.fromkeys([*(c for cols in needed.values() for c in cols), *filter(None, [id_column])])
    try:
        table = scan_table(path, format)
        if input_format(path, format) == "parquet":
            # Typed, and checked when written: nothing to decode. Its row count and (as a filter
            # polars answers from each row group's statistics) its nulls are read from its
            # metadata: 5 ms for 10M rows, where counting them decoded every text (4.9 s).
            row_count = int(table.select(pl.len()).collect().item())
            nulls = [
                c for c in no_nulls if table.filter(pl.col(c).is_null()).select(pl.len()).collect().item()
            ]
        else:
            # Decode every value the job uses now: a bad byte or line deep in the file must stop
            # the job here, not halfway through a run (a bare row count does not parse values).
            counts = table.select(pl.len(), *(pl.col(c).null_count() for c in used)).collect()
            row_count = int(counts.item(0, 0))
            nulls = [c for c in no_nulls if counts[c].item()]
        if id_column is not None:
            _check_ids(path, format, id_column, called)
        for column in nulls[:1]:
            _report_nulls(path, format, column, called)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(path, exc) from None
    if row_count == 0:
        raise InputError(f"{name or f'input {path}'} has no rows")
    return Source(path, id_column, columns, row_count, called, format)


def _hint(column: str, columns: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(column, columns, n=1, cutoff=0.6)
    mean = f"did you mean '{close[0]}'? " if close else ""
    return f"{mean}its columns are: {', '.join(columns)}"


def _unreadable(path: Location, exc: Exception) -> InputError:
    """Polars errors run to many lines (and quote the data or the object store's XML)."""
    return InputError(f"cannot read input {path}: {cloud_reason(exc)}")


def _report_nulls(path: Location, format: TableFormat | None, column: str, called: str) -> None:
    rows = scan_table(path, format).select(pl.col(column)).with_row_index(ROW)
    nulls = rows.filter(pl.col(column).is_null()).select(ROW).head(5).collect()[ROW].to_list()
    shown = ", ".join(str(r + 1) for r in nulls)
    raise InputError(
        f"column '{column}' used by the prompt is empty in row(s) {shown} of {called}; fill it, "
        "or set input.on_null: skip (leave those rows unsent) or empty (render as '')"
    )


def _check_ids(path: Location, format: TableFormat | None, id_column: str, called: str) -> None:
    ids = scan_table(path, format).select(pl.col(id_column)).with_row_index(ROW)
    nulls = ids.filter(pl.col(id_column).is_null()).select(ROW).head(5).collect()[ROW].to_list()
    if nulls:
        rows = ", ".join(str(r + 1) for r in nulls)
        raise InputError(f"input.id_column '{id_column}' is empty in row(s) {rows} of {called}")
    if ids.select((pl.col(id_column) > pl.col(id_column).shift(1)).all()).collect().item():
        return  # ascending, as ids mostly are: no two alike, found without a table of them
    dupes = ids.group_by(id_column).agg(pl.len().alias("n")).filter(pl.col("n") > 1).head(3).collect()
    if dupes.height:
        shown = ", ".join(repr(v) for v in dupes[id_column].to_list())
        raise InputError(f"input.id_column '{id_column}' has duplicate ids in {called}: {shown}")
