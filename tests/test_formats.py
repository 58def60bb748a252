"""Table formats (#12 item 5): an unknown suffix is an error, never a silent NDJSON file;
input.format / output.format name the format where the path does not (e.g. data.csv.gz)."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from batchrun.job import JobSpec
from batchrun.simulator import RunningSimulator
from tests.conftest import article_rows, invoke, write_job

KNOWN = "use .csv, .parquet or .jsonl (or .ndjson)"


def test_run_with_output_of_unknown_suffix_stops_before_sending(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = write_job(tmp_path, article_rows(5), simulator.base_url)
    target = tmp_path / "out" / "answers.xlsx"

    result = invoke("run", str(job), "--output", str(target))

    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: output: '{target}' is not a table type batchrun knows; {KNOWN}, "
        "or name the format with output.format: csv, parquet or jsonl\n"
    )
    assert simulator.stats.requests == 0
    assert not target.exists()


def test_cost_of_a_table_of_unknown_suffix_is_an_error(tmp_path: Path) -> None:
    table = tmp_path / "answers.xlsx"
    table.write_text('{"status": "ok"}\n')  # NDJSON inside, but its name does not say so

    result = invoke("cost", str(table))

    assert result.exit_code == 2
    assert result.stderr == f"Error: table: '{table}' is not a table type batchrun knows; {KNOWN}\n"


def test_a_job_built_in_python_is_refused_like_the_yaml(tmp_path: Path) -> None:
    job = {
        "input": {"path": str(tmp_path / "in.csv")},
        "output": {"path": str(tmp_path / "out.xlsx")},
        "model": "grok-4.3",
        "prompt": {"user": "{text}"},
    }
    with pytest.raises(ValidationError, match=r"output\.path: '.*out\.xlsx' is not a table type"):
        JobSpec.model_validate(job)
    assert JobSpec.model_validate(job | {"output": {"path": job["output"]["path"], "format": "csv"}})


def test_formats_named_in_the_job_read_gzip_and_write_where_the_suffix_does_not_say(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = article_rows(12)
    job = write_job(
        tmp_path,
        rows,
        simulator.base_url,
        input={"path": "input.csv.gz", "id_column": "id", "format": "csv"},
        output={"path": "out/result.log", "format": "jsonl", "include_columns": ["title"]},
    )
    (tmp_path / "input.csv.gz").write_bytes(gzip.compress((tmp_path / "input.csv").read_bytes()))

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    out = pl.read_ndjson(tmp_path / "out" / "result.log")
    assert out["id"].to_list() == [r["id"] for r in rows]
    assert set(out["status"]) == {"ok"}
    assert simulator.stats.requests == 12


def test_a_format_that_contradicts_the_suffix_is_an_error(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = write_job(
        tmp_path,
        article_rows(3),
        simulator.base_url,
        input={"path": "input.csv", "id_column": "id", "format": "parquet"},
    )

    result = invoke("validate", str(job))

    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {job}:2: input.path: 'input.csv' is a csv file by its name, but input.format is parquet\n"
    )
