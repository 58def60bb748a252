"""Cost (issue #5): prices, per-row cost, the budget guard, estimate, the cost and run reports.

Figures are computed by hand from the rates in /work/shared/reference/relaydance-facts.md
(grok-4.3: $1.25 in, $0.20 cached in, $2.50 out per million tokens; a prompt of 200k tokens
or more bills the whole request at $2.50 / $0.40 / $5.00). The simulator's usage markers fix
each row's prompt tokens; the answer "One two three." is 4 completion tokens.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import genai_prices
import polars as pl
import pytest
import yaml
from click.testing import CliRunner
from genai_prices import data_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.budget import BudgetGuard
from batchrun.cli import main
from batchrun.cost import Price, Rates, billed_output_tokens, job_price, list_price
from batchrun.events import RunStarted
from batchrun.job import load_job
from batchrun.progress import Progress
from batchrun.results import RowResult
from batchrun.simulator import RunningSimulator, count_tokens
from tests.conftest import TEST_KEY, article_rows, invoke, read_output, write_job
from tests.stub_server import Reply, completion, serve_stub
from tests.test_job_validation import JOB, Case, tree, write_case

REPO = Path(__file__).resolve().parent.parent
ANSWER = "One two three."  # 4 completion tokens

# (row text, prompt tokens, cached tokens, list-price cost in USD), computed by hand.
PRICED_ROWS = [
    (f"[[prompt_tokens:1000]] {ANSWER}", 1000, None, (1000 * 1.25 + 4 * 2.50) / 1e6),  # 0.00126
    (
        f"[[prompt_tokens:1000]] [[cached:400]] {ANSWER}",
        1000,
        400,
        (600 * 1.25 + 400 * 0.20 + 4 * 2.50) / 1e6,
    ),
    (f"[[prompt_tokens:199999]] {ANSWER}", 199_999, None, (199_999 * 1.25 + 4 * 2.50) / 1e6),
    (f"[[prompt_tokens:200000]] {ANSWER}", 200_000, None, (200_000 * 2.50 + 4 * 5.00) / 1e6),  # 0.50002
    (
        f"[[prompt_tokens:250000]] [[cached:50000]] {ANSWER}",
        250_000,
        50_000,
        (200_000 * 2.5 + 50_000 * 0.4 + 20) / 1e6,
    ),
]


def priced_job(tmp_path: Path, base_url: str, **overrides: Any) -> Path:
    rows = [{"id": i, "title": f"t{i}", "text": text} for i, (text, *_) in enumerate(PRICED_ROWS)]
    rows.append({"id": 90, "title": "rejected", "text": f"[[fail:400]] {ANSWER}"})
    rows.append({"id": 91, "title": "throttled", "text": f"[[fail:429x2]] [[prompt_tokens:1000]] {ANSWER}"})
    return write_job(tmp_path, rows, base_url, prompt={"user": "{text}"}, **overrides)


# --- prices, unit


def test_list_price_of_grok_4_3_matches_the_published_rates() -> None:
    price = list_price("grok-4.3")
    assert price is not None
    assert price.rates(1000) == Rates(1.25, 0.20, 2.50)
    assert price.rates(199_999) == Rates(1.25, 0.20, 2.50)
    assert price.rates(200_000) == Rates(2.50, 0.40, 5.00)


@pytest.mark.parametrize(("text", "prompt", "cached", "expected"), PRICED_ROWS)
def test_request_cost_by_hand_and_as_genai_prices_computes_it(
    text: str, prompt: int, cached: int | None, expected: float
) -> None:
    price = list_price("grok-4.3")
    assert price is not None
    assert price.cost(prompt, cached or 0, 4) == pytest.approx(expected, rel=1e-12)
    usage = genai_prices.Usage(input_tokens=prompt, cache_read_tokens=cached or 0, output_tokens=4)
    reference = genai_prices.calc_price(usage, "grok-4.3", provider_id="x-ai").total_price
    assert price.cost(prompt, cached or 0, 4) == pytest.approx(float(reference), rel=1e-12)


def uncached_list_price(model: str) -> Price | None:
    """list_price as a new process would find it (its in-process memo cleared, before and after)."""
    list_price.cache_clear()
    try:
        return list_price(model)
    finally:
        list_price.cache_clear()


def test_only_the_bundled_price_table_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An updated snapshot (what genai-prices' network updater installs) changes nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing kept: the table is read
    monkeypatch.setattr(data_snapshot, "_custom_snapshot", data_snapshot.DataSnapshot([], True))
    price = uncached_list_price("grok-4.3")
    assert price is not None and price.rates(1000).input == 1.25


PRICE_IN_A_PROCESS = """
import sys
from batchrun.cost import list_price
print(repr(list_price("grok-4.3")), repr(list_price("no-such-model")), "genai_prices.data" in sys.modules)
"""


def test_a_list_price_is_read_from_the_table_once_a_day(tmp_path: Path) -> None:
    """The first process reads the table and keeps what it said; the next (same day, same
    genai-prices) gets the same prices, an unpriced model too, without loading the table."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    runs = [
        subprocess.run(
            [sys.executable, "-c", PRICE_IN_A_PROCESS], env=env, capture_output=True, text=True, check=True
        )
        for _ in range(2)
    ]
    first, second = (run.stdout.split() for run in runs)
    assert first[-1] == "True" and second[-1] == "False"
    assert first[:-1] == second[:-1] and "1.25" in runs[0].stdout and "None" in runs[0].stdout
    kept = json.loads((tmp_path / "batchrun" / "list-prices.json").read_text())
    assert kept["stamp"][0] == version("genai-prices") and set(kept["prices"]) == {
        "grok-4.3 online",
        "no-such-model online",
    }


KEPT = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=16), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    held=st.binary(max_size=64)
    | KEPT.map(json.dumps).map(str.encode)
    | st.builds(
        lambda prices, today: json.dumps(
            {"stamp": [version("genai-prices"), today], "prices": {"grok-4.3 online": prices}}
        ).encode(),
        KEPT,
        st.sampled_from(["2001-01-01", "9999-12-31"]),
    )
)
def test_whatever_the_price_cache_holds_the_table_decides(tmp_path: Path, held: bytes) -> None:
    """A cache file someone else wrote (another version, another day, or not ours at all) is
    read again from the table, and replaced by a good one."""
    cache = tmp_path / "batchrun" / "list-prices.json"
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(held)
    os.environ["XDG_CACHE_HOME"] = str(tmp_path)  # clean_env restores it after the test
    price = uncached_list_price("grok-4.3")
    assert price is not None and price.rates(1000) == Rates(1.25, 0.20, 2.50)
    assert json.loads(cache.read_bytes())["prices"]["grok-4.3 online"] == [
        [0, 1.25, 0.2, 2.5],
        [199_999, 2.5, 0.4, 5.0],
    ]


@pytest.mark.parametrize("kept", [[[True, 1, 2, 3]], [[0, 1, 2]], "1.25", [[0, "1.25", 0.2, 2.5]]])
def test_todays_cache_entry_that_is_no_tier_list_is_read_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kept: object
) -> None:
    today = datetime.now(UTC).date().isoformat()
    cache = tmp_path / "batchrun" / "list-prices.json"
    cache.parent.mkdir()
    stamp = [version("genai-prices"), today]
    cache.write_text(json.dumps({"stamp": stamp, "prices": {"grok-4.3 online": kept}}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    price = uncached_list_price("grok-4.3")
    assert price is not None and price.rates(1000) == Rates(1.25, 0.20, 2.50)


def test_a_cache_folder_that_cannot_be_written_changes_no_price(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    price = uncached_list_price("grok-4.3")
    assert price is not None and price.rates(1000) == Rates(1.25, 0.20, 2.50)


def test_discount_override_and_unknown_model(tmp_path: Path) -> None:
    def spec(**extra: Any) -> Any:
        path = write_job(tmp_path, article_rows(1), "http://127.0.0.1:9/v1", **extra)
        return load_job(path)

    discounted = job_price(spec(pricing={"discount": 0.3}))
    assert discounted is not None
    assert discounted.cost(1000, 400, 4) == pytest.approx(0.7 * (600 * 1.25 + 400 * 0.2 + 10) / 1e6)
    assert discounted.cost(250_000, 0, 4) == pytest.approx(0.7 * (250_000 * 2.5 + 20) / 1e6)
    own = job_price(
        spec(pricing={"input_per_million": 2, "output_per_million": 4, "cached_input_per_million": 0.5})
    )
    assert own == Price(((0, Rates(2, 0.5, 4)),), "the job's pricing")
    assert own.cost(1000, 400, 4) == pytest.approx((600 * 2 + 400 * 0.5 + 16) / 1e6)
    assert own.cost(250_000, 0, 4) == pytest.approx((250_000 * 2 + 16) / 1e6)  # no tiers of its own
    no_cache_rate = job_price(spec(pricing={"input_per_million": 2, "output_per_million": 4}))
    assert no_cache_rate is not None and no_cache_rate.rates(1).cached_input == 2
    assert job_price(spec(model="grok-4.3-mini")) is None  # not in the table: no price, no guess


def test_billed_output_counts_reasoning_under_both_conventions() -> None:
    assert billed_output_tokens(100, 30, 130) == 30  # no reasoning
    assert billed_output_tokens(100, 30, 230) == 130  # xAI: 100 reasoning tokens beside completion
    assert billed_output_tokens(100, 130, 230) == 130  # OpenAI: reasoning inside completion_tokens
    assert billed_output_tokens(100, 30, None) == 30
    assert billed_output_tokens(None, None, None) is None


# --- the budget guard, unit


def test_budget_guard_reserves_worst_cases_and_stops_for_good() -> None:
    guard = BudgetGuard(1.0, spent_usd=0.25)
    assert guard.reserve(0.5)  # 0.25 spent + 0.5 held
    assert not guard.reserve(0.3)  # would be 1.05
    assert guard.stopped
    guard.settle(0.5, 0.1)  # the answer cost less than its worst case
    assert guard.spent_usd == pytest.approx(0.35) and guard.reserved_usd == 0
    assert not guard.reserve(0.01)  # once stopped, stopped: no picking cheaper rows
    fresh = BudgetGuard(1.0)
    assert fresh.reserve(0.4) and fresh.reserve(0.6)  # exactly the budget fits
    assert not fresh.reserve(1e-9)


# --- per-row cost end to end


def test_per_row_cost_cached_tokens_and_run_report(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = priced_job(tmp_path, simulator.base_url)

    result = invoke("run", str(job))

    assert result.exit_code == 1, result.output  # the [[fail:400]] row failed
    out = read_output(job)
    expected = [cost for *_, cost in PRICED_ROWS] + [0.0, (1000 * 1.25 + 4 * 2.5) / 1e6]
    assert out["cost_usd"].to_list() == pytest.approx(expected, rel=1e-12)
    assert out["status"].to_list() == ["ok"] * 5 + ["failed", "ok"]
    assert out["cached_tokens"].to_list() == [None, 400, None, None, 50_000, None, None]
    total = sum(expected)
    assert f"cost: ${total:.4f}" in result.stderr

    report_path = job.parent / "out" / "result.parquet.report.json"
    assert f"report: {report_path}" in result.stderr
    text = report_path.read_text()
    assert TEST_KEY not in text
    report = json.loads(text)
    assert report["outcome"] == "finished"
    assert report["rows"] == {
        "total": 7,
        "ok": 6,
        "failed": 1,
        "skipped": 0,
        "pending": 0,
        "failed_by_kind": {"http_400": 1},
        "top_errors": [{"error": "http_400: HTTP 400: Simulated HTTP 400 error.", "rows": 1}],
    }
    assert report["this_run"]["responses_429"] == 2
    assert report["this_run"]["retries_by_kind"] == {"rate_limited": 2}
    assert report["this_run"]["requests"] == 7 + 2
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    assert report["tokens"]["cached"] == 50_400
    assert report["tokens"]["completion"] == 6 * 4
    assert report["cost_usd"]["actual"] == pytest.approx(total, abs=1e-6)
    assert report["cost_usd"]["estimate"] is None  # no estimate was made before this run


def test_a_reask_for_output_fields_is_billed_too(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = [{"id": 1, "title": "t", "text": f"[[fail:badoutputx1]] [[prompt_tokens:1000]] {ANSWER}"}]
    output = {"path": "out/result.parquet", "fields": {"topic": "string"}}
    job = write_job(tmp_path, rows, simulator.base_url, prompt={"user": "{text}"}, output=output)

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    row = read_output(job).row(0, named=True)
    prose = "I would rather answer in prose."
    correction = (
        f"Your answer did not fit: the answer is not valid JSON: {prose!r}. "
        "Answer again with only the JSON object."
    )
    reask = sum(count_tokens(text) + 4 for text in (rows[0]["text"], prose, correction))
    assert row["prompt_tokens"] == 1000 + reask  # two answers, both billed; the re-ask is longer
    assert row["cost_usd"] == pytest.approx(((1000 + reask) * 1.25 + row["completion_tokens"] * 2.5) / 1e6)


def test_a_changed_discount_reprices_finished_rows(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = priced_job(tmp_path, simulator.base_url)
    invoke("run", str(job))
    list_costs = read_output(job)["cost_usd"].to_list()
    sent = simulator.stats.requests

    spec = yaml.safe_load(job.read_text())
    spec["pricing"] = {"discount": 0.3}
    job.write_text(yaml.safe_dump(spec))
    result = invoke("run", str(job))

    assert "pricing changed since the checkpoint was made: repriced 6 rows" in result.stderr
    assert simulator.stats.requests == sent  # nothing sent again: finished rows stay finished
    assert read_output(job)["cost_usd"].to_list() == pytest.approx([c * 0.7 for c in list_costs])


def test_unknown_model_gets_null_cost_and_one_warning(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(5), simulator.base_url, model="grok-4.3-mini")

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning: no price known for model 'grok-4.3-mini'") == 1
    assert read_output(job)["cost_usd"].null_count() == 5
    assert "cost:" not in result.stderr


def test_progress_shows_the_running_cost() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress(quiet=False, stream=screen)
    progress.started(RunStarted(3, {}, cost_usd=0.5, budget_usd=2.0))
    progress.row_finished(RowResult(row=0, id="a", status="ok", total_tokens=10, cost_usd=0.25))
    progress.row_finished(RowResult(row=1, id="b", status="failed", cost_usd=0.0))
    progress.close()
    assert "cost=$0.7500 of $2" in screen.getvalue()


# --- the budget


def budget_job(tmp_path: Path, base_url: str, **overrides: Any) -> Path:
    """40 rows at $1,000 per million tokens: a row costs about $0.05, a worst case about $0.3."""
    pricing = {"input_per_million": 1000, "output_per_million": 1000}
    return write_job(tmp_path, article_rows(40), base_url, pricing=pricing, concurrency=4, **overrides)


def test_budget_stops_within_one_worst_case_exits_3_and_resumes(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    """Every answer is cut at max_tokens (5) and only output is priced ($1,000 per million), so
    each request costs exactly its worst case, $0.005: 20 fit in $0.1025, however many are in
    flight at once, and a guard that did not hold back the in-flight ones would overshoot."""
    pricing = {"input_per_million": 0, "output_per_million": 1000}
    params = {"max_tokens": 5}
    budget = {"max_cost_usd": 0.1025}
    rows = article_rows(40)
    job = write_job(
        tmp_path, rows, simulator.base_url, pricing=pricing, params=params, concurrency=8, budget=budget
    )

    stopped = invoke("run", str(job))

    assert stopped.exit_code == 3, stopped.output
    out = read_output(job)
    assert out["status"].value_counts().sort("status").rows() == [("ok", 20), ("pending", 20)]
    assert out["cost_usd"].sum() == pytest.approx(0.1)
    assert simulator.stats.requests == 20
    assert "stopped by the budget: $0.1000 spent of $0.1025" in stopped.stderr
    assert "20 rows pending; rerun with a larger budget (--max-cost N) to resume" in stopped.stderr
    report = json.loads((job.parent / "out" / "result.parquet.report.json").read_text())
    assert report["outcome"] == "stopped_by_budget"
    assert report["cost_usd"]["budget"] == 0.1025

    resumed = invoke("run", str(job), "--max-cost", "1")

    assert resumed.exit_code == 0, resumed.output
    assert set(read_output(job)["status"]) == {"ok"}
    assert set(simulator.stats.ok_by_user_message.values()) == {1}  # no row paid twice
    assert "cost: $0.2000 of a $1 budget" in resumed.stderr


def test_budget_already_spent_sends_nothing(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = budget_job(tmp_path, simulator.base_url)

    result = invoke("run", str(job), "--max-cost", "0.01")  # below one worst case

    assert result.exit_code == 3, result.output
    assert simulator.stats.requests == 0
    assert set(read_output(job)["status"]) == {"pending"}


def test_budget_needs_a_price(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(3), simulator.base_url, model="grok-4.3-mini")

    result = invoke("run", str(job), "--max-cost", "1")

    assert result.exit_code == 2
    assert "a budget needs a price, and model 'grok-4.3-mini' is not in the price table" in result.stderr
    assert simulator.stats.requests == 0


BAD_COST_KEYS = [
    Case(
        "pricing-rates-and-discount",
        "job.yaml:18: pricing: give either rates or a discount off the list price, not both",
        JOB + "pricing:\n  discount: 0.3\n  input_per_million: 1\n",
    ),
    Case(
        "pricing-half-rates",
        "job.yaml:18: pricing: give input_per_million and output_per_million, or a discount",
        JOB + "pricing:\n  input_per_million: 1\n",
    ),
    Case(
        "pricing-typo",
        "job.yaml:19: unknown key 'discont' in pricing; did you mean 'discount'?",
        JOB + "pricing:\n  discont: 0.3\n",
    ),
    Case(
        "pricing-discount-of-100-percent",
        "job.yaml:19: pricing.discount: Input should be less than 1",
        JOB + "pricing:\n  discount: 1\n",
    ),
    Case(
        "budget-not-positive",
        "job.yaml:19: budget.max_cost_usd: Input should be greater than 0",
        JOB + "budget:\n  max_cost_usd: 0\n",
    ),
    Case(
        "budget-without-price",
        "job.yaml: a budget needs a price, and model 'test-model' is not in the price table",
        JOB + "budget:\n  max_cost_usd: 5\n",
        commands=("run",),
    ),
]


@pytest.mark.parametrize("case", BAD_COST_KEYS, ids=[c.id for c in BAD_COST_KEYS])
def test_bad_pricing_and_budget_keys(case: Case, tmp_path: Path) -> None:
    job_path = write_case(tmp_path, case)
    before = tree(tmp_path)
    for command in case.commands:
        result = invoke(command, str(job_path))
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [result.stderr.strip()]
        assert case.expect in result.stderr
    assert tree(tmp_path) == before


# --- estimate


def test_estimate_before_any_row_is_uncalibrated(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = article_rows(40)
    job = budget_job(tmp_path, simulator.base_url)

    result = invoke("estimate", str(job))

    assert result.exit_code == 0, result.output
    chars = sum(len("Summarize.") + len(f"{r['title']}\n\n{r['text']}") for r in rows)
    lines = result.stdout.splitlines()
    assert lines[0] == "rows: 40 to do of 40"
    assert f"({chars:,} characters at 4.00 per token, uncalibrated default;" in lines[1]
    assert lines[2].startswith("output tokens: 800 expected (assumed: half of max_tokens")
    assert "1,600 worst case (max_tokens 40)" in lines[2]
    worst = (chars / 4 + 40 * 40) * 1000 / 1e6
    low = chars / 4 * 1000 / 1e6
    assert lines[4].startswith(f"cost of the rows to do: low ${low:.4f},")
    assert lines[4].endswith(f"worst case ${worst:.4f}")
    assert lines[5].startswith("batch price: $500.00 in,") and lines[5].endswith("less 50% (batch))")
    assert lines[6] == (  # the same rows in batch mode: pricing.batch_discount's half
        f"cost in batch mode: low ${low / 2:.4f}, expected ${(chars / 4 + 800) * 500 / 1e6:.4f}, "
        f"high ${worst / 2:.4f}; worst case ${worst / 2:.4f}"
    )
    assert simulator.stats.requests == 0
    assert not (job.parent / "out" / "result.parquet.checkpoint.sqlite").exists()


def test_estimate_after_a_pilot_projects_the_rest(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = budget_job(tmp_path, simulator.base_url)

    piloted = invoke("estimate", str(job), "--sample", "10", "--yes")

    assert piloted.exit_code == 0, piloted.output
    assert simulator.stats.requests == 10
    assert "rows: 30 to do of 40 (10 done, $" in piloted.stdout
    assert "calibrated on 10 finished rows" in piloted.stdout
    assert "projection rests on 10 finished rows" in piloted.stdout
    saved = json.loads((job.parent / "out" / "result.parquet.estimate.json").read_text())
    assert saved["calibrated_on"] == 10

    run = invoke("run", str(job))

    assert run.exit_code == 0, run.output
    assert "resuming: 10 of 40 rows already done" in run.stderr
    report = json.loads((job.parent / "out" / "result.parquet.report.json").read_text())
    estimate, actual = report["cost_usd"]["estimate"], report["cost_usd"]["actual"]
    assert estimate["low"] <= estimate["expected"] <= estimate["high"] <= estimate["worst"]
    assert abs(report["cost_usd"]["actual_vs_expected_pct"]) < 10
    assert actual == pytest.approx(estimate["expected"], rel=0.1)


def test_estimate_pilot_declined_sends_nothing(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = budget_job(tmp_path, simulator.base_url)

    result = CliRunner().invoke(main, ["estimate", str(job), "--sample", "5"], input="n\n")

    assert result.exit_code == 0, result.output
    assert "send a pilot of 5 random rows (about $" in result.stderr
    assert simulator.stats.requests == 0
    assert "uncalibrated" in result.stdout


def test_pilot_of_100_on_sample_data_projects_the_full_run_within_10_percent(tmp_path: Path) -> None:
    spec = yaml.safe_load((REPO / "jobs" / "summarize.yaml").read_text())
    spec["input"]["path"] = str(REPO / "sample_data" / "articles.csv")
    spec["output"]["path"] = str(tmp_path / "summaries.parquet")
    job = tmp_path / "summarize.yaml"
    job.write_text(yaml.safe_dump(spec))

    piloted = invoke("estimate", str(job), "--sample", "100", "--yes", "--simulate")
    assert piloted.exit_code == 0, piloted.output
    run = invoke("run", str(job), "--simulate")
    assert run.exit_code == 0, run.output

    report = json.loads((tmp_path / "summaries.parquet.report.json").read_text())
    assert report["rows"]["ok"] == 300
    assert abs(report["cost_usd"]["actual_vs_expected_pct"]) < 10


# --- the cost report


def test_cost_report_per_model_and_status(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = priced_job(tmp_path, simulator.base_url)
    invoke("run", str(job))
    output = job.parent / "out" / "result.parquet"

    result = invoke("cost", str(output), "--format", "json")

    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)
    ok_cost = sum(cost for *_, cost in PRICED_ROWS) + (1000 * 1.25 + 10) / 1e6
    assert [(g["model"], g["status"], g["rows"]) for g in groups] == [
        ("grok-4.3", "failed", 1),
        ("grok-4.3", "ok", 6),
        ("total", None, 7),
    ]
    by_status = {g["status"]: g for g in groups}
    assert by_status["ok"]["cost_usd"] == pytest.approx(ok_cost)
    assert by_status["ok"]["cached_tokens"] == 50_400
    assert by_status["failed"]["cost_usd"] == 0
    assert groups[-1]["model"] == "total" and groups[-1]["cost_usd"] == pytest.approx(ok_cost)


def test_cost_report_by_an_input_column_from_the_job_file(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = article_rows(6)
    for i, row in enumerate(rows):
        row["topic"] = "sport" if i % 3 else "politics"
    job = write_job(
        tmp_path, rows, simulator.base_url, pricing={"input_per_million": 1000, "output_per_million": 0}
    )
    invoke("run", str(job), "--limit", "4")  # rows 4 and 5 stay pending

    result = invoke("cost", str(job), "--by", "topic", "--format", "csv")

    assert result.exit_code == 0, result.output
    report = pl.read_csv(io.StringIO(result.stdout))
    assert report.columns[:4] == ["topic", "model", "status", "rows"]
    assert report.select("topic", "status", "rows").rows() == [
        ("politics", "ok", 2),
        ("sport", "ok", 2),
        ("sport", "pending", 2),
        ("total", None, 6),
    ]
    sport_ok = report.filter((pl.col("topic") == "sport") & (pl.col("status") == "ok"))
    tokens = read_output(job).filter(pl.col("status") == "ok")["prompt_tokens"]
    assert sport_ok["cost_usd"][0] == pytest.approx(tokens[1:3].sum() * 1000 / 1e6)


def test_cost_report_table_and_errors(tmp_path: Path, simulator: RunningSimulator) -> None:
    pricing = {"input_per_million": 1000, "output_per_million": 1000}  # $0.001 a token
    rows = [{"id": 1, "title": "t", "text": ANSWER}]
    job = write_job(tmp_path, rows, simulator.base_url, prompt={"user": "{text}"}, pricing=pricing)
    invoke("run", str(job))
    output = str(job.parent / "out" / "result.parquet")

    table = invoke("cost", output)
    unknown_column = invoke("cost", output, "--by", "topic")
    not_a_table = invoke("cost", str(tmp_path / "input.csv"))

    # prompt: the answer's 4 tokens and 4 for the message; $0.001 for each of 8 + 4 tokens
    assert table.stdout == (
        "model     status  rows  prompt  cached  completion  reasoning     cost\n"
        "grok-4.3  ok         1       8       0           4          0  $0.0120\n"
        "total     -          1       8       0           4          0  $0.0120\n"
    )
    assert unknown_column.exit_code == 2
    assert "Error: no column topic to group by; the columns are: id, title, content" in unknown_column.stderr
    assert not_a_table.exit_code == 2
    assert "is not a batchrun output table: it has no 'status' column" in not_a_table.stderr


def test_budget_guard_counts_an_unknown_cost_as_its_whole_reservation() -> None:
    guard = BudgetGuard(1.0)
    assert guard.reserve(0.3) and guard.reserve(0.3)

    guard.settle(0.3, None)  # an answer without usage
    guard.settle(0.3, 0.1)

    assert guard.spent_usd == pytest.approx(0.4) and guard.reserved_usd == 0


def test_a_budget_stops_an_endpoint_that_sends_no_usage(tmp_path: Path) -> None:
    """llama.cpp's server streams no usage; such answers are counted at their worst case, so a
    budget still stops the job, and cost_usd stays unknown (null) rather than $0."""
    no_usage = completion(ANSWER)
    del no_usage["usage"]
    pricing = {"input_per_million": 1000, "output_per_million": 1000}
    with serve_stub(lambda r: Reply(body=no_usage) if r.method == "POST" else Reply(404)) as stub:
        job = write_job(
            tmp_path,
            article_rows(40),
            stub.base_url,
            pricing=pricing,
            params={"max_tokens": 5},
            concurrency=2,
            budget={"max_cost_usd": 2},
        )
        result = invoke("run", str(job))

    assert result.exit_code == 3, result.output
    # Each request is counted at its worst case: a token per byte of its body, and max_tokens.
    worst = [(len(r.body) + 5) * 1000 / 1e6 for r in stub.chat_requests()]
    assert 0 < len(worst) < 40
    assert sum(worst) <= 2 < sum(worst) + max(worst)  # stopped when the next could not fit
    out = read_output(job)
    assert out["status"].value_counts().sort("status").rows() == [
        ("ok", len(worst)),
        ("pending", 40 - len(worst)),
    ]
    assert out["cost_usd"].null_count() == 40
    assert result.stderr.count("the budget counts each at its worst case") == 1
