"""The Python API explains itself: every job key and run option is a named, typed, documented
keyword of `run`, `arun`, `Job.define` and `Job.run` (generated from the schema by cog, which
tests/test_cli_docs.py checks; `arun` and `Job.arun` take `run`'s and `Job.run`'s), and
`dir(batchrun)` offers the names it loads on first use. RunResult, Status and Estimate show
themselves to a person, as text and as HTML."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import pydoc
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import batchrun
from batchrun.job import JobSpec
from batchrun.runner import RunOptions

from .conftest import article_rows
from .test_api import rows_in

JOB_KEYS = set(JobSpec.model_fields) - {"job_path", "image_folder"}  # both set by batchrun
# RunOptions' fields (its checkpoint is the Job's), and two that api.py turns into them
OPTIONS = {f.name for f in dataclasses.fields(RunOptions)} - {"checkpoint"} | {"workers", "check_model"}
DOCUMENTED: list[Callable[..., Any]] = [batchrun.run, batchrun.Job.define, batchrun.Job.run]


def keywords(function: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p for p in parameters if p.kind is p.KEYWORD_ONLY}


def test_the_keywords_are_the_job_keys_and_the_run_options() -> None:
    assert set(keywords(batchrun.Job.define)) == JOB_KEYS | {"folder"}
    assert set(keywords(batchrun.Job.run)) == set(keywords(batchrun.Job.arun)) == OPTIONS
    assert (
        set(keywords(batchrun.run))
        == set(keywords(batchrun.arun))
        == JOB_KEYS | {"folder", "return_type"} | OPTIONS
    )


def test_a_keyword_has_one_type_and_default_wherever_it_is_taken() -> None:
    """run's job keys are Job.define's, its options Job.run's (concurrency and output are job keys
    there: a job key takes more forms than the option)."""
    define, job_run = keywords(batchrun.Job.define), keywords(batchrun.Job.run)
    for function in (batchrun.run, batchrun.arun):
        for name, parameter in keywords(function).items():
            if name != "return_type":  # run's own
                assert parameter == define.get(name, job_run.get(name)), (function.__name__, name)
    # the async twins take the same keywords, shown by help() as theirs
    assert inspect.signature(batchrun.arun) == inspect.signature(batchrun.run)
    assert inspect.signature(batchrun.Job.arun) == inspect.signature(batchrun.Job.run)
    assert "model: 'str | None' = None" in pydoc.render_doc(batchrun.arun, renderer=pydoc.plaintext)


def test_every_keyword_is_typed_and_explained_in_help() -> None:
    for function in DOCUMENTED:
        shown = pydoc.render_doc(function, renderer=pydoc.plaintext)
        for name, parameter in keywords(function).items():
            assert parameter.annotation is not inspect.Parameter.empty, (function.__qualname__, name)
            assert str(parameter) in shown, (function.__qualname__, name)  # name: 'type' = default
            assert f"\n    {name}: " in (inspect.getdoc(function) or ""), (function.__qualname__, name)
    shown = pydoc.render_doc(batchrun.run, renderer=pydoc.plaintext)
    assert "model: 'str | None' = None" in shown
    assert "prompt: The user template alone" in shown
    assert "simulate: Send to the built-in simulator" in shown


def test_dir_offers_the_names_loaded_on_first_use() -> None:
    assert {"run", "arun", "Job", "RunResult", "__version__"} <= set(dir(batchrun))
    assert dir(batchrun) == sorted(dir(batchrun))


# --- what a run, a status and an estimate show (#26 item 5)


def test_a_result_shows_rounded_figures_the_checkpoint_and_how_to_resume(tmp_path: Path) -> None:
    df = pl.DataFrame(article_rows(6))
    job = batchrun.Job.define(
        df, model="grok-4.3", prompt="Summarize: {text}", checkpoint=tmp_path / "c.sqlite"
    )

    assert repr(job.status()).splitlines()[:2] == [
        "Status: 0 of 6 rows done",
        "not started: 0 of 6 rows done",
    ]
    estimate = job.estimate()
    assert repr(estimate).splitlines()[:2] == ["Estimate", "rows: 6 to do of 6"]
    assert any(line.startswith("cost in batch mode: low $") for line in repr(estimate).splitlines())
    assert "<th" in estimate._repr_html_()

    part = job.run(simulate=True, quiet=True, rows=frozenset({0, 1}))
    shown = repr(part).splitlines()
    assert shown[0] == "RunResult: finished"
    assert shown[1] == "rows: 2 ok, 0 failed, 4 pending of 6"
    assert re.fullmatch(r"time: \d+\.\d s", shown[3]), shown  # one decimal, not 0.07102886800021224
    assert f"checkpoint: {tmp_path / 'c.sqlite'}" in shown
    assert shown[-1] == "pending: 4 rows; run the cell again to resume"
    page = part._repr_html_()
    assert '<th style="text-align:left">checkpoint</th>' in page
    assert "run the cell again to resume" in page

    status = repr(job.status()).splitlines()
    assert status[:2] == ["Status: 2 of 6 rows done", "ok: 2"]
    assert f"checkpoint: {tmp_path / 'c.sqlite'}" in status

    whole = job.run(simulate=True, quiet=True)
    assert repr(whole).splitlines()[1] == "rows: 6 ok, 0 failed of 6"
    assert "pending" not in repr(whole) and "resume" not in whole._repr_html_()


def test_a_cancelled_arun_says_how_many_rows_are_kept(tmp_path: Path) -> None:
    df = pl.DataFrame([{**row, "text": row["text"] + " [[sleep:300]]"} for row in article_rows(100)])
    checkpoint = tmp_path / "run.sqlite"

    async def cell() -> str:
        task = asyncio.create_task(
            batchrun.arun(df, model="grok-4.3", prompt="Summarize: {text}", simulate=True, concurrency=2,
                          checkpoint=checkpoint, quiet=True)
        )  # fmt: skip
        while not (checkpoint.exists() and rows_in(checkpoint) >= 2):
            await asyncio.sleep(0.01)  # polling the checkpoint: it has no event to wait on
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as cancelled:
            await task
        return str(cancelled.value)

    said = asyncio.run(cell())
    done = rows_in(checkpoint)
    assert said == f"{done} of 100 rows done, checkpointed in {checkpoint}; run again to resume"
