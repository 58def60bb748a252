"""Tables given in Python: a polars DataFrame or LazyFrame, a pandas DataFrame or a pyarrow Table,
read as polars for the run; and the run's result columns put beside the rows given, in the type
given (or the one asked for). pandas and pyarrow are imported only when such a table comes."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import polars as pl

from batchrun.errors import BatchrunError, InputError

ReturnType = Literal["polars", "pandas", "pyarrow"]
RETURN_TYPES: tuple[str, ...] = get_args(ReturnType)


@dataclass(frozen=True)
class Given:
    """A table given in memory, as polars; `called` is how messages name it."""

    frame: pl.DataFrame
    called: str


def given(data: Any) -> Given | None:
    """The table `data` holds, as polars; None for a path (the job reads it where it is)."""
    if isinstance(data, str | Path):
        return None
    if isinstance(data, pl.LazyFrame):
        return Given(data.collect(), "the LazyFrame")
    if isinstance(data, pl.DataFrame):
        return Given(data, "the DataFrame")
    frame: object = None
    kind = kind_of(data)
    if kind == "pandas":
        need_pandas("a pandas DataFrame")
        frame = pl.from_pandas(data)
    elif kind == "pyarrow":
        frame = pl.from_arrow(data)
    if not isinstance(frame, pl.DataFrame):
        raise TypeError(
            f"batchrun cannot read a {type(data).__name__}: give a path, a polars DataFrame or "
            "LazyFrame, a pandas DataFrame or a pyarrow Table"
        )
    return Given(frame, "the DataFrame" if kind == "pandas" else "the Table")


def kind_of(data: Any) -> ReturnType:
    """The library of a table (polars for a path): what `beside` returns by default."""
    module = type(data).__module__.split(".")[0]
    return module if module in ("pandas", "pyarrow") else "polars"  # type: ignore[return-value]


def need_pandas(what: str) -> None:
    """pandas and pyarrow (polars converts through Arrow), or one line naming the extra that has them."""
    missing = [name for name in ("pandas", "pyarrow") if importlib.util.find_spec(name) is None]
    if missing:
        raise BatchrunError(
            f"{what} needs {' and '.join(missing)}, which the base install leaves out: "
            "pip install 'batchrun[pandas]'"
        )


def checked_return_type(value: object) -> ReturnType | None:
    """`return_type=` as given: None (the input's type), or one of RETURN_TYPES that is installed."""
    if value is not None and value not in RETURN_TYPES:
        raise ValueError(f"return_type= takes {', '.join(map(repr, RETURN_TYPES))}, not {value!r}")
    if value == "pandas":
        need_pandas("return_type='pandas'")
    return value  # type: ignore[return-value]


def own_id(table: Given) -> str | None:
    """The table's own `id` column, to name its rows by (the output's `id` is then the input's);
    None without one. One that cannot name rows (empty or repeated somewhere) is refused in a
    line that names a column that can, rather than naming a row number `id` beside it."""
    frame = table.frame
    if "id" not in frame.columns:
        return None
    why = _why_not_ids(frame["id"])
    if why is None:
        return "id"
    usable = [name for name in frame.columns if name != "id" and _why_not_ids(frame[name]) is None]
    choice = f"'{usable[0]}'" if usable else "NAME"
    raise InputError(
        f"{table.called}'s column 'id' {why}, so it cannot name the rows: pass "
        f"input={{'id_column': {choice}}} (a column with a different value in each row), or rename 'id'"
    )


def _why_not_ids(column: pl.Series) -> str | None:
    """Why `column` cannot name rows, or None when it can."""
    if column.null_count():
        return "is empty in places"
    try:
        repeated = column.filter(column.is_duplicated())
    except pl.exceptions.PolarsError:  # a type that cannot be compared (Python objects)
        return "holds values that cannot be compared"
    return f"repeats {repeated[0]!r}" if len(repeated) else None


def beside(
    data: Any, results: pl.DataFrame, read_input: Callable[[int], pl.DataFrame], as_type: ReturnType | None
) -> Any:
    """The rows given (the first `results.height`: a run's `limit` takes the first), with the
    columns of `results` beside them as `with_columns` puts them (one of the same name is
    replaced in place), as `as_type`, by default the type given. `read_input(n)`: the input's
    first n rows as polars, for data that is not a polars DataFrame."""
    given_kind = kind_of(data)
    kind = as_type or given_kind
    if kind == given_kind == "pandas":
        return _pandas_beside(data, results)
    if kind == given_kind == "pyarrow" and hasattr(data, "append_column"):
        return _arrow_beside(data, results)
    frame = data.head(results.height) if isinstance(data, pl.DataFrame) else read_input(results.height)
    table = frame.with_columns(results.get_columns())
    if kind == "pandas":
        return table.to_pandas()
    if kind == "pyarrow":
        return table.to_arrow(compat_level=pl.CompatLevel.oldest())  # large_string: what most readers take
    return table


def _pandas_beside(data: Any, results: pl.DataFrame) -> Any:
    rows = data.iloc[: results.height]
    columns = results.to_pandas()
    columns.index = rows.index  # the rows' own labels, so that they align with the input's
    return rows.assign(**{name: columns[name] for name in results.columns})


def _arrow_beside(data: Any, results: pl.DataFrame) -> Any:
    table = data.slice(0, results.height)
    arrow = results.to_arrow(compat_level=pl.CompatLevel.oldest())
    for name, column in zip(results.columns, arrow.columns, strict=True):
        at = table.schema.get_field_index(name)
        table = table.set_column(at, name, column) if at >= 0 else table.append_column(name, column)
    return table
