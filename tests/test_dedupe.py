"""`dedupe: true` (#13 item 3): each distinct request is sent once and every row with it gets its
answer; the output says which row's answer a row reused (cost 0 there); the cost is counted once
in the output, the summary, report.json, status, `cost JOB` and the budget."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl

import batchrun
from batchrun.simulator import RunningSimulator, SimulatorConfig, serve_in_thread
from tests.conftest import TEST_KEY, TEST_KEY_ENV, article_rows, invoke, read_output, write_job
from tests.test_reporting import run_in_terminal


def duplicated_rows() -> list[dict[str, Any]]:
    """Six rows, three requests: 1001 and 1003 repeat 1000's title and text, 1005 repeats 1002's."""
    rows = article_rows(6)
    for copy, of in ((1, 0), (3, 0), (5, 2)):
        rows[copy] = {**rows[of], "id": rows[copy]["id"]}
    return rows


def test_each_distinct_request_is_sent_once_and_paid_once(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = write_job(tmp_path, duplicated_rows(), simulator.base_url, dedupe=True, budget={"max_cost_usd": 5})

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    assert simulator.stats.requests == 3  # 1000, 1002, 1004
    out = read_output(job)
    assert out["reused_from"].to_list() == [None, "1000", None, "1000", None, "1002"]
    assert out["status"].to_list() == ["ok"] * 6
    assert out["content"][1] == out["content"][0] and out["content"][5] == out["content"][2]
    reused = out.filter(pl.col("reused_from").is_not_null())
    assert reused["cost_usd"].to_list() == [0.0] * 3 and reused["prompt_tokens"].to_list() == [0] * 3
    assert reused["attempts"].to_list() == [0] * 3
    cost = out["cost_usd"].sum()
    assert cost > 0
    report = json.loads((job.parent / "out" / "result.parquet.report.json").read_text())
    assert report["cost_usd"]["actual"] == round(cost, 6)
    assert report["tokens"]["prompt"] == out["prompt_tokens"].sum()
    assert f"cost: ${cost:.4f} of a $5 budget" in result.stderr
    status = invoke("status", str(job))
    assert status.stdout.splitlines()[0] == "ok: 6" and f"cost: ${cost:.4f}" in status.stdout
    by_job = invoke("cost", str(job), "--format", "json")
    total = [r for r in json.loads(by_job.stdout) if r["model"] == "total"]
    assert total[0]["rows"] == 6 and abs(total[0]["cost_usd"] - cost) < 1e-12
    assert total[0]["prompt_tokens"] == out["prompt_tokens"].sum()

    write_job(tmp_path, [*duplicated_rows(), {**duplicated_rows()[2], "id": 1006}], simulator.base_url,
              dedupe=True)  # fmt: skip
    again = invoke("run", str(job))
    assert again.exit_code == 0 and simulator.stats.requests == 3  # a copy of a request answered
    assert read_output(job)["reused_from"][6] == "1002"


def test_without_dedupe_identical_rows_are_separate_samples(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = write_job(tmp_path, duplicated_rows(), simulator.base_url)

    assert invoke("run", str(job)).exit_code == 0

    assert simulator.stats.requests == 6
    assert read_output(job)["reused_from"].null_count() == 6


def test_dedupe_is_a_python_keyword(tmp_path: Path, simulator: RunningSimulator) -> None:
    data = pl.DataFrame([{"id": r["id"], "text": r["text"]} for r in duplicated_rows()])

    out = batchrun.run(data, model="grok-4.3", prompt="Summarize: {text}", dedupe=True, quiet=True,
                       checkpoint=tmp_path / "c.sqlite", input={"id_column": "id"},
                       endpoint={"base_url": simulator.base_url, "api_key_env": TEST_KEY_ENV})  # fmt: skip

    assert simulator.stats.requests == 3
    assert out["reused_from"].to_list() == [None, "1000", None, "1000", None, "1002"]


def test_the_bar_ends_at_its_total_with_the_reused_rows(tmp_path: Path) -> None:
    """Rows that reuse another row's answer are in the bar's total and never sent: the bar
    counts them (reused=), so that it ends at its total."""
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, latency_ms=20)) as sim:
        job = write_job(tmp_path, duplicated_rows(), sim.base_url, dedupe=True)
        code, screen = run_in_terminal("run", str(job))

    assert code == 0, screen
    last = [line for line in re.split(r"[\r\n]", screen) if "row/s" in line][-1]
    assert "6/6 [" in last and "ok=3 failed=0 reused=3" in last, last
