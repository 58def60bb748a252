"""Everything a CLI command does, done through `Job` (#21 item 5), against the simulator; and the
remedies and exit codes that the CLI and Python share."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

import batchrun
from batchrun import BatchrunError, Job, JobChanged
from batchrun.cli import EXIT_CODES, flag, main
from batchrun.errors import ExitCode, Remedy
from batchrun.simulator import RunningSimulator
from tests.conftest import article_rows, invoke, write_job

ROWS = 6


def job_of(tmp_path: Path, simulator: RunningSimulator) -> Job:
    return Job.from_yaml(write_job(tmp_path, article_rows(ROWS), simulator.base_url))


def test_validate_checks_the_job_and_shows_the_first_request(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    checked = job_of(tmp_path, simulator).validate()

    assert (checked.rows, checked.model, checked.note) == (ROWS, "grok-4.3", None)
    assert checked.output == tmp_path / "out" / "result.parquet"
    assert checked.first_request["messages"][0] == {"role": "system", "content": "Summarize."}
    assert simulator.stats.requests == 0  # the model list only


def test_status_cost_report_and_prune_read_what_a_run_left(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = job_of(tmp_path, simulator)
    assert not job.status().started and job.status().pending == ROWS
    assert job.prune() is None

    result = job.run(quiet=True)

    assert result.exit_code is ExitCode.OK
    status = job.status()
    assert (status.ok, status.failed, status.pending, status.total) == (ROWS, 0, 0, ROWS)
    assert status.prompt_tokens and status.completion_tokens and status.spent_usd
    cost = job.cost(by=["title"])
    total = cost.row(-1, named=True)
    assert (total["title"], total["rows"], cost.height) == ("total", ROWS, ROWS + 1)  # a group per title
    page = job.report()
    assert page.exists() and page.read_text().startswith("<!DOCTYPE html>")
    assert job.prune() == (0, ROWS)


def test_cost_and_report_of_an_output_table_match_those_of_its_job(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = job_of(tmp_path, simulator)
    job.run(quiet=True)
    table = tmp_path / "out" / "result.parquet"

    by_table, by_job = batchrun.cost_table(table), batchrun.cost_table(job.spec.job_path)

    assert (
        by_table.select("status", "model", "rows", "cost_usd").rows()
        == by_job.select("status", "model", "rows", "cost_usd").rows()
    )
    assert by_table.row(-1, named=True)["rows"] == ROWS
    page = batchrun.draw_report(table, by=["title"])
    assert page == tmp_path / "out" / "result.parquet.report.html"
    assert page.read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(BatchrunError, match="is an output table: `output=` goes with a job file"):
        batchrun.cost_table(table, output=str(tmp_path / "other.parquet"))


def test_estimate_sends_a_pilot_then_projects_from_it(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = job_of(tmp_path, simulator)
    declined = job.estimate(sample=2, send=lambda pilot: None)
    assert (declined.to_do, declined.observed, simulator.stats.requests) == (ROWS, 0, 0)

    projection = job.estimate(sample=2)

    assert simulator.stats.requests == 2
    assert (projection.to_do, projection.observed) == (ROWS - 2, 2)
    assert job.prepared().estimate_path.exists()  # for the next run's report to compare with


def test_models_lists_the_endpoint_and_the_simulator(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = job_of(tmp_path, simulator)
    assert "grok-4.3" in job.models()
    assert "grok-4.3" in job.models(simulate=True)


def test_a_changed_job_names_its_remedy_as_a_keyword_and_the_cli_as_a_flag(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job_file = write_job(tmp_path, article_rows(ROWS), simulator.base_url)
    Job.from_yaml(job_file).run(quiet=True)
    changed = write_job(
        tmp_path, article_rows(ROWS), simulator.base_url, prompt={"system": "Shorter.", "user": "{title}"}
    )

    with pytest.raises(JobChanged) as raised:
        Job.from_yaml(changed).run(quiet=True)

    assert raised.value.remedy == Remedy("yes", True, raised.value.remedy.effect)  # type: ignore[union-attr]
    assert "; pass yes=True to send them" in str(raised.value)
    assert "--" not in str(raised.value)
    refused = invoke("run", str(changed))
    assert (refused.exit_code, "; pass --yes to send them" in refused.stderr) == (ExitCode.USAGE, True)


@pytest.mark.parametrize(
    ("remedy", "command"),
    [
        (Remedy("yes", True, ""), "run"),
        (Remedy("fresh", True, ""), "run"),
        (Remedy("simulate", True, ""), "run"),
        (Remedy("check_model", False, ""), "run"),
        (Remedy("yes", True, ""), "estimate"),
    ],
)
def test_every_remedy_the_library_gives_is_a_flag_of_the_cli(remedy: Remedy, command: str) -> None:
    options = main.commands[command].params  # type: ignore[attr-defined]
    assert any(isinstance(o, click.Option) and flag(remedy) in o.opts for o in options)


def test_the_help_lists_every_exit_code() -> None:
    listed = [line.split()[0] for line in EXIT_CODES.splitlines()[2:]]
    assert [int(word) for word in listed if word.isdigit()] == [code.value for code in ExitCode]
