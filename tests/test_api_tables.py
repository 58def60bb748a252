"""A table given from Python comes back as given: its own rows and columns, in order, the results
beside them, in its own library (polars, pandas, pyarrow); a mistake in the call is one line
raised from the call, naming the table as it was given. Against the simulator (simulate=True)."""

from __future__ import annotations

import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import batchrun
from batchrun.results import OUTPUT_RESULT_COLUMNS

from .conftest import article_rows

PROMPT = "Summarize: {text}"
BATCHRUN = Path(batchrun.__file__).parent


def run(data: Any, tmp_path: Path, **keys: Any) -> Any:
    keys = {"model": "grok-4.3", "prompt": PROMPT, **keys}
    return batchrun.run(data, checkpoint=tmp_path / "runs" / "r.sqlite", simulate=True, quiet=True, **keys)


def leads(texts: Any) -> list[str]:
    """The first sentence of each text, or of each answer: the simulator answers with the prompt,
    its first two sentences."""
    return [str(text).removeprefix("Summarize: ").split(". ")[0] for text in texts]


def test_the_rows_given_come_back_in_order_with_their_answers_beside_them(tmp_path: Path) -> None:
    df = pl.DataFrame(article_rows(6)).reverse()  # ids that are not the row numbers

    out = run(df.head(3), tmp_path)

    assert out.columns == [*df.columns, *OUTPUT_RESULT_COLUMNS]
    assert out.select(df.columns).equals(df.head(3))
    assert leads(out["content"].to_list()) == leads(df.head(3)["text"])  # each row its own answer
    joined = df.head(3).join(out.select("id", "content"), on="id")  # a join, for who still makes one
    assert joined["content"].to_list() == out["content"].to_list()
    written = pl.read_parquet(tmp_path / "runs" / "r.sqlite.output.parquet")
    assert written["id"].to_list() == df.head(3)["id"].to_list()  # the file's id is the input's

    first = run(df, tmp_path / "limited", limit=2)
    assert first.select(df.columns).equals(df.head(2))


def test_a_table_without_an_id_gets_none_made_up(tmp_path: Path) -> None:
    df = pl.DataFrame(article_rows(3)).drop("id")

    out = run(df, tmp_path)

    assert out.columns == [*df.columns, *OUTPUT_RESULT_COLUMNS]
    assert leads(out["content"].to_list()) == leads(df["text"])
    # The file, as a job file's output: the row number is the id where the input has none.
    assert pl.read_parquet(tmp_path / "runs" / "r.sqlite.output.parquet")["id"].to_list() == [0, 1, 2]


def test_an_id_that_cannot_name_the_rows_is_refused_naming_a_column_that_can(tmp_path: Path) -> None:
    df = pl.DataFrame(article_rows(3)).with_columns(pl.Series("id", [7, 8, 7]))

    with pytest.raises(batchrun.InputError) as refused:
        run(df, tmp_path)

    assert str(refused.value) == (
        "the DataFrame's column 'id' repeats 7, so it cannot name the rows: pass "
        "input={'id_column': 'title'} (a column with a different value in each row), or rename 'id'"
    )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    out = run(df, tmp_path, input={"id_column": "title"})
    assert out["id"].to_list() == [7, 8, 7]  # the input's own, as given


def test_pandas_in_pandas_out_with_its_own_index(tmp_path: Path) -> None:
    given = pd.DataFrame(article_rows(4), index=pd.Index([7, 3, 9, 1], name="n"))

    out = run(given, tmp_path)

    assert isinstance(out, pd.DataFrame)
    pd.testing.assert_frame_equal(out[list(given.columns)], given)  # its index and dtypes too
    assert leads(out["content"].tolist()) == leads(given["text"])
    assert list(out.columns) == [*given.columns, *OUTPUT_RESULT_COLUMNS]


def test_a_pyarrow_table_in_a_pyarrow_table_out(tmp_path: Path) -> None:
    given = pa.Table.from_pylist(article_rows(3))

    out = run(given, tmp_path)

    assert isinstance(out, pa.Table)
    assert out.select(given.column_names).equals(given)
    assert leads(out.column("content").to_pylist()) == leads(given.column("text").to_pylist())


def test_return_type_chooses_the_library(tmp_path: Path) -> None:
    df = pl.DataFrame(article_rows(3))
    as_pandas = run(df, tmp_path / "a", return_type="pandas")
    as_arrow = run(df.to_pandas(), tmp_path / "b", return_type="pyarrow")
    as_polars = run(df.to_arrow(), tmp_path / "c", return_type="polars")

    assert isinstance(as_pandas, pd.DataFrame) and isinstance(as_arrow, pa.Table)
    for out in (pl.from_pandas(as_pandas), pl.from_arrow(as_arrow), as_polars):
        assert isinstance(out, pl.DataFrame)
        assert out.select(df.columns).equals(df)
        assert leads(out["content"].to_list()) == leads(df["text"])
    with pytest.raises(ValueError, match="return_type= takes 'polars', 'pandas', 'pyarrow', not 'arrow'"):
        run(df, tmp_path / "d", return_type="arrow")
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_a_pandas_table_without_pyarrow_says_which_extra_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['pyarrow'] = None  # as if not installed\n"
        "import batchrun, pandas\n"
        "batchrun.run(pandas.DataFrame({'text': ['a']}), model='grok-4.3', prompt='{text}', "
        "simulate=True, quiet=True, checkpoint=sys.argv[1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c.sqlite")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "batchrun.errors.BatchrunError: a pandas DataFrame needs pyarrow, which the base install "
        "leaves out: pip install 'batchrun[pandas]'"
    )
    assert not any(tmp_path.iterdir())


MISTAKES = {
    "misspelled-param": (
        {"params": {"temprature": 1}},
        "<python>: unknown key 'temprature' in params; did you mean 'temperature'?",
    ),
    "missing-column": (
        {"prompt": "Summarize: {txt}"},
        "prompt.user names column 'txt', which the DataFrame does not have; did you mean 'text'? "
        "its columns are: id, title, text",
    ),
    "empty-value": (
        {},
        "column 'text' used by the prompt is empty in row(s) 2 of the DataFrame; fill it, or set "
        "input.on_null: skip (leave those rows unsent) or empty (render as '')",
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_is_one_line_raised_from_the_call_and_leaves_no_file(tmp_path: Path, mistake: str) -> None:
    keys, message = MISTAKES[mistake]
    df = pl.DataFrame(article_rows(3)).with_columns(pl.Series("text", ["a", None, "c"]))

    with pytest.raises(batchrun.BatchrunError) as raised:
        run(df, tmp_path, **keys)

    assert str(raised.value) == message
    frames = traceback.extract_tb(raised.value.__traceback__)
    assert [Path(f.filename).is_relative_to(BATCHRUN) for f in frames][-2:] == [False, True]
    assert sum(Path(f.filename).is_relative_to(BATCHRUN) for f in frames) == 1  # the line called
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_batchrun_debug_keeps_every_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHRUN_DEBUG", "1")
    with pytest.raises(batchrun.InputError) as raised:
        run(pl.DataFrame(article_rows(2)), tmp_path, prompt="{txt}")
    frames = traceback.extract_tb(raised.value.__traceback__)
    assert sum(Path(f.filename).is_relative_to(BATCHRUN) for f in frames) > 3
