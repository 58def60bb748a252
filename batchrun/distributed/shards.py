"""Shards a worker reads from the job's input itself: Parquet in object storage.

The driver still reads every row for the key pass (a row's request key, and its occurrence among
identical requests, come from the checkpoint's index, which lives beside the driver), but what
crosses Ray is which rows of the input and their keys, not the rendered messages: the worker reads
that row range with polars' cloud I/O (credentials from its own environment), renders each row as
the driver did, and checks the key it gets against the driver's, so an input overwritten since the
driver read it stops the job instead of filing answers under the wrong requests. Other inputs (a
local file the workers may not see, CSV or JSON lines that cannot be read from the middle) travel
from the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from batchrun.errors import InputError
from batchrun.job import table_format
from batchrun.plan import Planned, PreparedJob, RequestKeys
from batchrun.sources import ROW
from batchrun.storage import Url, cloud_reason

KEY_BYTES = 16  # a request key's length (plan.RequestKeys)


@dataclass(frozen=True)
class RowsToRead:
    """A shard by reference: rows of the input (ascending) with their keys and occurrences."""

    rows: list[int]
    keys: bytes  # KEY_BYTES a row, in the order of `rows`
    occurrences: list[int]

    @classmethod
    def of(cls, shard: list[Planned]) -> RowsToRead:
        return cls(
            [p.row for p in shard], b"".join(p.request_key for p in shard), [p.occurrence for p in shard]
        )

    def __len__(self) -> int:
        return len(self.rows)


def workers_read(job: PreparedJob) -> bool:
    """Whether the workers read their shards' rows themselves: Parquet at an object-store URL
    (a file, a glob of files or a folder of them)."""
    path = job.source.path
    if not isinstance(path, Url):
        return False
    if path.is_folder:
        return job.source.format in (None, "parquet")
    try:
        return table_format(path, job.source.format, "input.path", None) == "parquet"
    except ValueError:
        return False


def read_rows(job: PreparedJob, shard: RowsToRead, keys: RequestKeys) -> list[Planned]:
    """The shard's rows, read from the input and rendered, as the driver's plan made them."""
    prompt_columns = job.prompts.columns
    id_column = job.source.id_column
    columns = list(dict.fromkeys([*prompt_columns, *filter(None, [id_column])]))
    first, last = shard.rows[0], shard.rows[-1]

    def query() -> pl.LazyFrame:
        return job.source.lazy().select(ROW, *columns).slice(first, last - first + 1)

    try:
        try:
            frame = query().collect()
        except (pl.exceptions.PolarsError, OSError):
            # An object overwritten while it was read can come half old, half new (the footer of
            # one version, pages of the other): read it again, through a new scan, since a scan
            # keeps the footer it read first; the keys below then tell the change.
            frame = query().collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(
            f"a worker cannot read rows {first + 1}-{last + 1} of {job.source.path}: {cloud_reason(exc)}"
        ) from None
    by_position = {row[ROW]: row for row in frame.iter_rows(named=True)}
    planned = []
    for i, position in enumerate(shard.rows):
        row = by_position.get(position)
        if row is None:
            raise _changed(job, position)
        body, key = job.keyed_body(row, keys)
        if key != shard.keys[i * KEY_BYTES : (i + 1) * KEY_BYTES]:
            raise _changed(job, position)
        planned.append(job.planned(row, key, shard.occurrences[i], body))
    return planned


def _changed(job: PreparedJob, position: int) -> InputError:
    return InputError(
        f"row {position + 1} of {job.source.path} is not what the driver read: the input changed "
        "during the run; rerun once it no longer changes (the checkpoint is kept)"
    )
