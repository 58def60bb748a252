"""A job-level change (#13 item 2): batchrun says how many finished rows it would send again and
what that should cost, and goes on only with --yes (yes=True in Python); the old answers stay, so
changing back sends nothing; `prune` drops the answers no row uses; --fresh drops them all."""

from __future__ import annotations

import os
import pty
import re
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import batchrun
from batchrun.simulator import RunningSimulator
from tests.conftest import article_rows, checkpoint_path, invoke, read_output, write_job

RESEND = (
    r"Error: the job's prompt changed since its last run: (\d+) finished rows would be sent again, "
    r"expected to cost \$(\d+\.\d{4}) \(at most \$(\d+\.\d{4})\); pass --yes "
    r"to send them, or restore the job as it was to send none\n"
)


def edit_job(job: Path, **changes: Any) -> None:
    spec = yaml.safe_load(job.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        target = spec
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    job.write_text(yaml.safe_dump(spec, sort_keys=False))


def sent_by(simulator: RunningSimulator, *args: str, exit_code: int = 0) -> int:
    before = simulator.stats.requests
    result = invoke("run", *args)
    assert result.exit_code == exit_code, result.output
    return simulator.stats.requests - before


def test_a_changed_prompt_asks_and_changing_back_sends_nothing(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = article_rows(6)
    job = write_job(tmp_path, rows, simulator.base_url)
    assert sent_by(simulator, str(job)) == 6
    first_answers = read_output(job)["content"].to_list()
    write_job(tmp_path, [*rows, *article_rows(8)[6:]], simulator.base_url)  # 2 rows appended
    edit_job(job, **{"prompt.user": "Headline only: {title}"})

    refused = invoke("run", str(job))

    assert refused.exit_code == 2 and simulator.stats.requests == 6  # nothing sent
    found = re.fullmatch(RESEND, refused.stderr)
    assert found is not None, refused.stderr
    assert found[1] == "6" and 0 < float(found[2]) <= float(found[3])  # the appended 2 are not "again"
    status = invoke("status", str(job))
    assert status.exit_code == 0 and status.stdout.splitlines()[:4:3] == ["ok: 0", "pending: 8"]
    estimate = invoke("estimate", str(job))
    assert estimate.exit_code == 0, estimate.output
    assert estimate.stdout.splitlines()[0] == "rows: 8 to do of 8"  # the current job's rows
    assert (
        f"the job changed since its last run: 6 finished rows would be sent again, expected to cost "
        f"${found[2]} (at most ${found[3]})"
    ) in estimate.stdout.splitlines()

    write_job(tmp_path, rows, simulator.base_url)  # without the appended rows again
    edit_job(job, **{"prompt.user": "Headline only: {title}"})
    assert sent_by(simulator, str(job), "--yes") == 6
    assert read_output(job)["content"].to_list() != first_answers

    edit_job(job, **{"prompt.user": "{title}\n\n{text}"})  # back: the old answers are still there
    assert sent_by(simulator, str(job)) == 0  # nothing sent, nothing asked
    assert read_output(job)["content"].to_list() == first_answers


def test_settings_that_do_not_change_requests_never_ask(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(5), simulator.base_url)
    assert sent_by(simulator, str(job)) == 5
    edit_job(
        job,
        concurrency=3,
        **{"rate_limit.requests_per_minute": 6000, "retry.max_attempts": 2},
        pricing={"input_per_million": 1.0, "output_per_million": 2.0},
    )

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    assert simulator.stats.requests == 5
    assert "pricing changed since the checkpoint was made: repriced 5 rows" in result.stderr


def test_the_python_api_raises_unless_yes(tmp_path: Path, simulator: RunningSimulator) -> None:
    data = [{"id": r["id"], "text": r["text"]} for r in article_rows(4)]
    keys: dict[str, Any] = {
        "model": "grok-4.3",
        "checkpoint": tmp_path / "c.sqlite",
        "endpoint": {"base_url": simulator.base_url, "api_key_env": "BATCHRUN_TEST_KEY"},
        "input": {"id_column": "id"},
        "quiet": True,
    }
    import polars as pl

    batchrun.run(pl.DataFrame(data), prompt="Summarize: {text}", **keys)
    with pytest.raises(batchrun.JobChanged) as raised:
        batchrun.run(pl.DataFrame(data), prompt="Title: {text}", **keys)
    assert (raised.value.rows, simulator.stats.requests) == (4, 4)
    assert raised.value.cost_usd is not None and raised.value.cost_usd > 0

    out = batchrun.run(pl.DataFrame(data), prompt="Title: {text}", yes=True, **keys)
    assert simulator.stats.requests == 8 and (out["status"] == "ok").all()


def test_prune_drops_the_answers_no_row_uses(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(5)
    job = write_job(tmp_path, rows, simulator.base_url)
    assert invoke("prune", str(job)).stdout == f"nothing to prune: {job} has no checkpoint yet\n"
    assert sent_by(simulator, str(job)) == 5
    write_job(tmp_path, rows[:4], simulator.base_url)  # one row removed
    assert sent_by(simulator, str(job)) == 0

    pruned = invoke("prune", str(job))

    assert (pruned.exit_code, pruned.stdout) == (0, "pruned 1 answers no row of the job uses; 4 kept\n")
    edit_job(job, **{"prompt.user": "Headline only: {title}"})
    assert sent_by(simulator, str(job), "--yes") == 4
    assert invoke("prune", str(job)).stdout == "pruned 4 answers no row of the job uses; 4 kept\n"
    edit_job(job, **{"prompt.user": "{title}\n\n{text}"})
    assert sent_by(simulator, str(job), "--yes") == 4  # pruned: changing back pays again


def test_fresh_drops_every_answer_and_the_index(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(4), simulator.base_url)
    assert sent_by(simulator, str(job)) == 4
    edit_job(job, **{"prompt.user": "Headline only: {title}"})

    assert sent_by(simulator, str(job), "--fresh") == 4

    with sqlite3.connect(checkpoint_path(job)) as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4
        assert db.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 4
    edit_job(job, **{"prompt.user": "{title}\n\n{text}"})
    assert sent_by(simulator, str(job), "--yes") == 4  # the first prompt's answers went with --fresh


def test_a_terminal_is_asked(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(3), simulator.base_url)
    assert sent_by(simulator, str(job)) == 3
    edit_job(job, **{"prompt.user": "Headline only: {title}"})
    terminal, ours = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(job)], stdin=ours, stderr=ours)
    os.close(ours)
    seen = b""
    deadline = time.monotonic() + 30
    while b"send them? [y/N]" not in seen:
        assert time.monotonic() < deadline and process.poll() is None, seen
        if select.select([terminal], [], [], 0.5)[0]:
            seen += os.read(terminal, 4096)
    os.write(terminal, b"y\n")
    assert process.wait(timeout=30) == 0
    os.close(terminal)
    assert b"3 finished rows would be sent again" in seen
    assert simulator.stats.requests == 6
