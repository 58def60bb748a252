"""The Python API explains itself: every job key and run option is a named, typed, documented
keyword of `run`, `arun`, `Job.define` and `Job.run` (generated from the schema by cog, which
tests/test_cli_docs.py checks; `arun` and `Job.arun` take `run`'s and `Job.run`'s), and `dir(batchrun)` offers the names it loads on first use."""

from __future__ import annotations

import dataclasses
import inspect
import pydoc
from collections.abc import Callable
from typing import Any

import batchrun
from batchrun.job import JobSpec
from batchrun.runner import RunOptions

JOB_KEYS = set(JobSpec.model_fields) - {"job_path"}  # job_path is set by batchrun
# RunOptions' fields (its checkpoint is the Job's), and two that api.py turns into them
OPTIONS = {f.name for f in dataclasses.fields(RunOptions)} - {"checkpoint"} | {"workers", "check_model"}
DOCUMENTED: list[Callable[..., Any]] = [batchrun.run, batchrun.Job.define, batchrun.Job.run]


def keywords(function: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p for p in parameters if p.kind is p.KEYWORD_ONLY}


def test_the_keywords_are_the_job_keys_and_the_run_options() -> None:
    assert set(keywords(batchrun.Job.define)) == JOB_KEYS | {"folder"}
    assert set(keywords(batchrun.Job.run)) == set(keywords(batchrun.Job.arun)) == OPTIONS
    assert set(keywords(batchrun.run)) == set(keywords(batchrun.arun)) == JOB_KEYS | {"folder"} | OPTIONS


def test_a_keyword_has_one_type_and_default_wherever_it_is_taken() -> None:
    """run's job keys are Job.define's, its options Job.run's (concurrency and output are job keys
    there: a job key takes more forms than the option)."""
    define, job_run = keywords(batchrun.Job.define), keywords(batchrun.Job.run)
    for function in (batchrun.run, batchrun.arun):
        for name, parameter in keywords(function).items():
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
