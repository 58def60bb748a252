"""End-to-end runs of the real CLI against the simulator on loopback."""

from __future__ import annotations

import collections
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from batchrun.simulator import RunningSimulator, SimulatorConfig, serve_in_thread
from tests.conftest import (
    TEST_KEY,
    answered_not_kept,
    article_rows,
    batchrun_process,
    checkpoint_path,
    invoke,
    read_output,
    run_batchrun,
    wait_for_rows,
    wait_quiet,
    write_job,
)

REPO = Path(__file__).resolve().parent.parent


def test_every_row_once_in_input_order(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(120)
    random.Random(1).shuffle(rows)  # input order differs from id order
    job = write_job(tmp_path, rows, simulator.base_url)

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    out = read_output(job)
    assert out["id"].to_list() == [r["id"] for r in rows]
    assert out["title"].to_list() == [r["title"] for r in rows]
    assert set(out["status"]) == {"ok"}
    story = rows[0]["title"].split()[1]
    assert f"Lead sentence of story {story}." in out["content"][0]
    assert (out["prompt_tokens"] + out["completion_tokens"] == out["total_tokens"]).all()
    assert out["prompt_tokens"].min() > 0
    assert simulator.stats.requests == 120
    assert "rows: 120 ok, 0 failed of 120" in result.stderr


def test_retries_recover_injected_5xx_and_429(tmp_path: Path) -> None:
    config = SimulatorConfig(api_key=TEST_KEY, error_rate=0.3, retry_after_s=0.01, seed=7)
    rows = article_rows(80)
    rows[0]["text"] += " [[fail:429x2]]"
    with serve_in_thread(config) as sim:
        job = write_job(
            tmp_path,
            rows,
            sim.base_url,
            retry={"max_attempts": 12, "initial_backoff_s": 0.001, "max_backoff_s": 0.01},
        )
        result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    out = read_output(job)
    assert set(out["status"]) == {"ok"}
    assert out["attempts"][0] >= 3  # two 429s, plus any random 5xx
    injected = sum(n for status, n in sim.stats.by_status.items() if status >= 500)
    assert injected > 5
    assert sim.stats.by_status[429] >= 2
    assert out["attempts"].sum() == sim.stats.requests


def test_permanent_errors_become_failed_rows_and_exit_1(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(30)
    rows[3]["text"] += " [[fail:400]]"
    rows[7]["text"] += " [[fail:422]]"
    job = write_job(tmp_path, rows, simulator.base_url)

    result = invoke("run", str(job))

    assert result.exit_code == 1
    out = read_output(job)
    assert out.height == 30
    failed = out.filter(pl.col("status") == "failed")
    assert failed["id"].to_list() == [rows[3]["id"], rows[7]["id"]]
    assert failed["error_kind"].to_list() == ["http_400", "http_422"]
    assert failed["attempts"].to_list() == [1, 1]
    assert "2 failed (http_400: 1, http_422: 1)" in result.stderr
    assert "--retry-failed" in result.stderr


def test_retry_failed_sends_only_the_failed_rows(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(20)
    rows[5]["text"] += " [[fail:500x5]]"
    job = write_job(
        tmp_path,
        rows,
        simulator.base_url,
        retry={"max_attempts": 4, "initial_backoff_s": 0.001, "max_backoff_s": 0.01},
    )
    assert invoke("run", str(job)).exit_code == 1
    assert simulator.stats.requests == 19 + 4

    result = invoke("run", str(job), "--retry-failed")

    assert result.exit_code == 0, result.output
    assert simulator.stats.requests == 19 + 4 + 2  # attempts 5 (fails) and 6 (ok)
    out = read_output(job)
    assert set(out["status"]) == {"ok"}
    assert out.height == 20


def test_rejected_key_stops_before_any_row_is_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong_key = "sk-wrong-key-must-not-leak"
    monkeypatch.setenv("BATCHRUN_TEST_KEY", wrong_key)
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, latency_ms=5)) as sim:
        job = write_job(tmp_path, article_rows(500), sim.base_url)
        result = invoke("run", str(job))

    assert result.exit_code == 2
    assert result.stderr.startswith("Error: the endpoint rejected the API key (HTTP 401")
    assert sim.stats.requests == 0  # the model list was asked for first, and refused
    assert wrong_key not in result.stderr
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_key_rejected_mid_run_stops_the_whole_job(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(500)
    rows[0]["text"] += " [[fail:401]]"
    job = write_job(tmp_path, rows, simulator.base_url, concurrency=8)

    result = invoke("run", str(job))

    assert result.exit_code == 2
    assert result.stderr.startswith("Error: the endpoint rejected the API key (HTTP 401")
    assert simulator.stats.requests < 100  # stopped early, not 500 rows of errors
    out = read_output(job)
    assert out["status"][0] == "pending" and (out["status"] == "pending").sum() > 400


def test_unknown_model_stops_before_any_row_is_sent(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(50), simulator.base_url, model="grok-4-3")

    result = invoke("run", str(job))

    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {job}:8: model 'grok-4-3' not offered by {simulator.base_url} (did you mean 'grok-4.3'?); "
        "pass --no-check-model to skip this check (endpoint.check_model: false in the job), as for a "
        "gateway that serves models it does not list\n"
    )
    assert simulator.stats.requests == 0


def test_resume_sends_only_unfinished_rows(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(100), simulator.base_url)
    assert invoke("run", str(job), "--limit", "30").exit_code == 0
    assert read_output(job).height == 30

    result = invoke("run", str(job))

    assert result.exit_code == 0
    assert "resuming: 30 of 100 rows already done" in result.stderr
    assert simulator.stats.requests == 100
    assert read_output(job)["id"].to_list() == [r["id"] for r in article_rows(100)]


def test_changed_prompt_and_model_ask_before_resending(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(20), simulator.base_url)
    assert invoke("run", str(job), "--limit", "5").exit_code == 0
    spec = yaml.safe_load(job.read_text())
    spec["prompt"]["user"] = "Headline only: {title}"
    spec["model"] = "grok-3"
    job.write_text(yaml.safe_dump(spec))

    refused = invoke("run", str(job))

    assert refused.exit_code == 2
    assert "Error: the job's prompt, model changed since its last run: 5 finished rows" in refused.stderr
    assert "--yes" in refused.stderr
    assert simulator.stats.requests == 5

    fresh = invoke("run", str(job), "--fresh")

    assert fresh.exit_code == 0
    assert simulator.stats.requests == 25
    assert set(read_output(job)["model"]) == {"grok-3"}


def test_status_and_validate(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(10)
    rows[2]["text"] += " [[fail:400]]"
    job = write_job(tmp_path, rows, simulator.base_url)
    assert "not started: 0 of 10 rows done" in invoke("status", str(job)).output

    validated = invoke("validate", str(job))
    assert validated.exit_code == 0
    assert '"content": "Story 0\\n\\nLead sentence' in validated.stdout
    assert simulator.stats.requests == 0

    invoke("run", str(job), "--limit", "4")
    status = invoke("status", str(job))
    assert status.exit_code == 0
    assert status.stdout.splitlines()[:5] == [
        "ok: 3",
        "failed: 1 (http_400: 1)",
        "  1 row: http_400: HTTP 400: Simulated HTTP 400 error.",
        "skipped: 0",
        "pending: 6",
    ]


def test_kill_9_at_random_moments_loses_nothing_and_repeats_only_answers_not_yet_kept(tmp_path: Path) -> None:
    """A kill -9 loses the answers in flight to the checkpoint (the server answered, the process
    died before writing): those rows are sent again, and no others. "Repeats nothing" is not a
    claim kill -9 allows; this is the whole of what it allows."""
    rows = article_rows(400)
    concurrency = 8
    kills = 4
    lost: collections.Counter[str] = collections.Counter()  # times a row's answer died unkept
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, latency_ms=15)) as sim:
        job = write_job(tmp_path, rows, sim.base_url, concurrency=concurrency)
        rng = random.Random(42)
        for k in range(kills):
            proc = batchrun_process(str(job), "-q")
            wait_for_rows(job, at_least=(k + 1) * 60 + rng.randrange(40))
            proc.kill()
            proc.communicate(timeout=10)
            assert proc.returncode == -9
            wait_quiet(sim)
            lost.update(answered_not_kept(sim, job, rows))
        final = run_batchrun(str(job), "-q")

        assert final.returncode == 0, final.stderr
        out = read_output(job)
        assert out["id"].to_list() == [r["id"] for r in rows]
        assert set(out["status"]) == {"ok"}
        answered = sum(sim.stats.ok_by_user_message.values())
        assert len(sim.stats.ok_by_user_message) == 400
        # Only rows in flight when a kill landed may have been answered twice, each once per such kill.
        assert answered - 400 <= kills * concurrency
        repeats = {m: n - 1 for m, n in sim.stats.ok_by_user_message.items() if n > 1}
        assert all(n <= lost[m] for m, n in repeats.items()), {m: (n, lost[m]) for m, n in repeats.items()}


def test_sigint_stops_promptly_and_resumes(tmp_path: Path) -> None:
    rows = article_rows(300)
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, latency_ms=20)) as sim:
        job = write_job(tmp_path, rows, sim.base_url, concurrency=4)
        proc = batchrun_process(str(job))
        wait_for_rows(job, at_least=20)
        signalled = time.monotonic()
        proc.send_signal(2)
        _, stderr = proc.communicate(timeout=15)
        stop_s = time.monotonic() - signalled

        assert proc.returncode == 130, stderr
        assert stop_s < 5
        assert "rerun `batchrun" in stderr
        out = read_output(job)
        assert out.height == 300
        done = out.filter(pl.col("status") == "ok").height
        assert 20 <= done < 300
        assert set(out["status"]) == {"ok", "pending"}

        resumed = run_batchrun(str(job))
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming: {done} of 300 rows already done" in resumed.stderr
        assert sum(sim.stats.ok_by_user_message.values()) - 300 <= 4


def test_simulate_runs_the_sample_job(tmp_path: Path) -> None:
    output = tmp_path / "summaries.parquet"

    result = run_batchrun(str(REPO / "jobs" / "summarize.yaml"), "--simulate", "--output", str(output))

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(output)
    articles = pl.read_csv(REPO / "sample_data" / "articles.csv")
    assert out["id"].to_list() == articles["id"].to_list()
    assert set(out["status"]) == {"ok"}
    assert out["total_tokens"].min() > 0
    assert f"rows: {articles.height} ok, 0 failed of {articles.height}" in result.stderr


def simulator_child(run: subprocess.Popen[str]) -> int:
    """The pid of the simulator a `--simulate` run started: its one child process."""
    deadline = time.monotonic() + 30
    children = Path(f"/proc/{run.pid}/task/{run.pid}/children")
    while not (pids := children.read_text().split()):
        assert run.poll() is None and time.monotonic() < deadline, "the run started no simulator"
        time.sleep(0.01)
    assert len(pids) == 1, pids
    return int(pids[0])


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state, after the command's name


def test_ctrl_c_at_a_terminal_leaves_the_simulator_answering_the_rows_in_flight(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the terminal's foreground group; the simulator of a
    `--simulate` run is kept out of it, so the run finishes its in-flight rows against it."""
    job = write_job(tmp_path, article_rows(300), "https://unused.invalid/v1", concurrency=8)
    run = batchrun_process(str(job), "--simulate", "--simulate-latency-ms", "200", start_new_session=True)
    simulator_child(run)
    wait_for_rows(job, at_least=16)
    os.killpg(run.pid, signal.SIGINT)  # the whole group, as a terminal's Ctrl-C
    _, stderr = run.communicate(timeout=30)

    assert run.returncode == 130, stderr
    assert "Traceback" not in stderr
    out = read_output(job)
    assert set(out["status"]) == {"ok", "pending"}
    # the 8 rows in flight at the signal were answered: with the simulator gone they fail or stay pending
    with sqlite3.connect(checkpoint_path(job)) as db:
        assert db.execute(
            "SELECT COUNT(*) FROM attempts WHERE status IS NULL OR status != 200"
        ).fetchone() == (0,)


def test_a_killed_simulated_run_leaves_no_simulator_behind(tmp_path: Path) -> None:
    job = write_job(tmp_path, article_rows(300), "https://unused.invalid/v1", concurrency=4)
    run = batchrun_process(str(job), "--simulate", "--simulate-latency-ms", "200")
    simulator = simulator_child(run)
    wait_for_rows(job, at_least=4)
    run.kill()
    run.communicate(timeout=10)

    deadline = time.monotonic() + 10
    while running(simulator):
        assert time.monotonic() < deadline, "the simulator outlived its run"
        time.sleep(0.01)


def test_params_reach_the_request_body(tmp_path: Path, simulator: RunningSimulator) -> None:
    params = {"temperature": 0.2, "max_tokens": 3, "stop": ["zzz"], "seed": 7}
    job = write_job(tmp_path, article_rows(5), simulator.base_url, params=params)

    validated = invoke("validate", str(job))
    result = invoke("run", str(job))

    assert '"max_tokens": 3' in validated.stdout and '"seed": 7' in validated.stdout
    assert result.exit_code == 0
    out = read_output(job)
    assert set(out["finish_reason"]) == {"length"}
    assert set(out["completion_tokens"]) == {3}
