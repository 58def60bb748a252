"""The run report as a page (#15): the record of runs and attempts in the checkpoint, the page
written after every run that sent a request, `batchrun report`, and the page in a real browser;
the answered rows it shows with their input, images as inline thumbnails (#23)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from html import unescape
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from PIL import Image

from batchrun.html_report import PAGE_SWITCH
from batchrun.migrations import SCHEMA_VERSION
from batchrun.simulator import RunningSimulator
from tests.conftest import TEST_KEY, article_rows, checkpoint_path, invoke, read_output, write_job
from tests.stub_server import Reply, Request, completion, serve_stub
from tests.test_startup import HEAVY, imported

FIXTURE_V2 = Path(__file__).parent / "fixtures" / "checkpoint_v2"
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
CHARTS = 6  # throughput, latency, prompt and completion tokens, cost, failures


@pytest.fixture(autouse=True)
def pages_drawn(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other tests switch the page off (conftest.py); here every run draws it."""
    monkeypatch.delenv(PAGE_SWITCH)


def sql(job: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(checkpoint_path(job)) as db:
        return db.execute(query).fetchall()


def page(job: Path) -> Path:
    return job.parent / "out" / "result.parquet.report.html"


def run_with_failures_retries_and_a_resume(tmp_path: Path, simulator: RunningSimulator) -> Path:
    """Two runs of 12 rows: rows 1001 and 1004 fail (HTTP 400), 1002 gets two 503s before its
    answer, 1007 one 429; the first run stops after 6 rows (--limit), the second does the rest."""
    rows = article_rows(12)
    markers = {1: "[[fail:400]]", 4: "[[fail:400]]", 2: "[[fail:503x2]]", 7: "[[fail:429x1]]"}
    for i, marker in markers.items():
        rows[i]["text"] += f" {marker}"
    job = write_job(tmp_path, rows, simulator.base_url)
    assert invoke("run", str(job), "--limit", "6").exit_code == 1
    assert invoke("run", str(job)).exit_code == 1
    return job


def shown_figures(html: str) -> dict[str, str]:
    """The summary's figures as the page shows them, by their cell's id."""
    return dict(re.findall(r'<td id="([\w-]+)"[^>]*>([^<]*)</td>', html))


def assert_figures_match_the_output(html: str, job: Path) -> None:
    """The summary shows rows by status, tokens and cost as the output table itself sums them."""
    shown = shown_figures(html)
    out = read_output(job)
    by_status = dict(out.group_by("status").len().iter_rows())
    for status in ("ok", "failed", "skipped", "pending"):
        assert shown[f"rows-{status}"] == f"{by_status.get(status, 0):,}", status
    assert shown["rows-total"] == f"{out.height:,}"
    assert shown["tokens-prompt"] == f"{out['prompt_tokens'].sum():,}"
    assert shown["tokens-completion"] == f"{out['completion_tokens'].sum():,}"
    cost = float(shown["cost-total"].removeprefix("$").replace(",", ""))
    assert cost == pytest.approx(out["cost_usd"].sum(), abs=1e-6)  # shown to the micro-dollar
    assert cost > 0


def test_every_request_and_each_run_are_recorded(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = run_with_failures_retries_and_a_resume(tmp_path, simulator)

    runs = sql(job, "SELECT run, outcome, driver, workers, requests, ended >= started FROM runs")
    assert runs == [(1, "finished", "local", 1, 8, 1), (2, "finished", "local", 1, 7, 1)]
    attempts = sql(
        job, "SELECT run, row, attempt, final, status, error_kind FROM attempts ORDER BY run, row, attempt"
    )
    assert len(attempts) == simulator.stats.requests == 15  # 12 rows, two 503s and a 429 again
    assert [a for a in attempts if a[1] == 2] == [
        (1, 2, 1, 0, 503, "http_503"),
        (1, 2, 2, 0, 503, "http_503"),
        (1, 2, 3, 1, 200, None),
    ]
    assert [a for a in attempts if a[1] == 7] == [(2, 7, 1, 0, 429, "rate_limited"), (2, 7, 2, 1, 200, None)]
    assert [a for a in attempts if a[1] == 1] == [(1, 1, 1, 1, 400, "http_400")]
    tokens = sql(job, "SELECT SUM(prompt_tokens), SUM(completion_tokens) FROM attempts")
    out = read_output(job)
    assert tokens == [(out["prompt_tokens"].sum(), out["completion_tokens"].sum())]
    assert sql(job, "SELECT COUNT(*) FROM attempts WHERE answered < sent") == [(0,)]


def test_the_page_of_a_run_with_failures_retries_and_a_resume(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = run_with_failures_retries_and_a_resume(tmp_path, simulator)

    html = page(job).read_text()
    assert_figures_match_the_output(html, job)
    charts = chart_documents(html)
    assert len(charts) == CHARTS
    throughput, failures = charts[0], charts[-1]
    panels = [t for t in chart_texts(throughput) if t.startswith("run ")]
    assert [p.split(",")[0] for p in panels] == ["run 2", "run 1"]  # each run its own panel, the last first
    assert "http_400" in html and "1001" in html and "1004" in html  # failures with example rows
    assert [t.text for t in failures.iter(f"{SVG}title")] == ["http_400", "http_400, rows: 2"]
    assert f"batchrun {job} --retry-failed" in html
    assert_self_contained(html)
    assert len(html) < 200_000
    rows = shown_rows(html)
    assert [r[0] for r in rows] == ["1000", "1002", "1003", "1005", "1006"]  # the first 5 answered
    out = read_output(job).filter(pl.col("id").is_in([1000, 1002]))
    assert rows[0][1] == "Story 0 Lead sentence of story 0. A second sentence follows. A third is dropped."
    assert [r[2] for r in rows[:2]] == out["content"].to_list()
    assert [r[3] for r in rows[:2]] == [f"${c:,.6f}" for c in out["cost_usd"]]


def assert_self_contained(html: str) -> None:
    """Nothing outside the page: no script, stylesheet, image or font to fetch; an image is
    inline (a data URL); the one address in the page names the charts' XML namespace."""
    assert not re.search(r"<script|<link|<iframe|@import|url\(", html, re.IGNORECASE)
    assert not re.search(r"""<img(?![^>]*\bsrc="data:image/)""", html, re.IGNORECASE)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:image/(jpeg|png|gif|webp);base64,)""", html, re.I)
    assert set(re.findall(r"\w+://[^\s\"'<>]*", html)) <= {"http://www.w3.org/2000/svg"}


SVG = "{http://www.w3.org/2000/svg}"


def chart_documents(html: str) -> list[ET.Element]:
    """The page's charts, each parsed as the XML document it must be."""
    return [ET.fromstring(svg) for svg in re.findall(r"<svg.*?</svg>", html, re.DOTALL)]


def chart_texts(chart: ET.Element) -> list[str]:
    """The labels a chart shows, without their tooltips."""
    return [(t.text or "") + "".join(c.tail or "" for c in t) for t in chart.iter(f"{SVG}text")]


def shown_rows(html: str) -> list[list[str]]:
    """The Rows section's cells, a row each (id, [input,] answer, cost), as text."""
    section = re.search(r"<h2>Rows</h2>.*?</table>", html, re.DOTALL)
    assert section is not None
    cells = [
        re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)
        for row in re.findall(r"<tr>(.*?)</tr>", section.group(0), re.DOTALL)[1:]
    ]
    return [[unescape(re.sub(r"<[^>]+>", "", cell)) for cell in row] for row in cells]


def test_the_page_shows_an_image_jobs_rows_with_thumbnails(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    """The sample job of product pictures: each row shown with a small inline thumbnail."""
    shutil.copytree(REPO / "sample_data", tmp_path / "sample_data")
    (tmp_path / "jobs").mkdir()
    spec = yaml.safe_load((REPO / "jobs" / "describe_images.yaml").read_text())
    spec["endpoint"] = {"base_url": simulator.base_url, "api_key_env": "BATCHRUN_TEST_KEY"}
    job = tmp_path / "jobs" / "describe_images.yaml"
    job.write_text(yaml.safe_dump(spec))

    assert invoke("run", str(job), "-q").exit_code == 0
    html = (tmp_path / "out" / "descriptions.parquet.report.html").read_text()

    assert_self_contained(html)
    thumbnails = re.findall(r'<img class=thumb src="data:image/jpeg;base64,([^"]+)"', html)
    assert len(thumbnails) == 5
    for data in thumbnails:
        picture = Image.open(io.BytesIO(base64.b64decode(data)))
        assert max(picture.size) == 64 and len(data) < 4000
    rows = shown_rows(html)
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[0][1] == "Describe this mug for the catalogue. It is sold as: Stoneware mug."

    from_output = invoke("report", str(tmp_path / "out" / "descriptions.parquet"))
    assert from_output.exit_code == 0, from_output.output
    html = (tmp_path / "out" / "descriptions.parquet.report.html").read_text()
    assert "<img" not in html and len(shown_rows(html)[0]) == 3  # no job: id, answer and cost


def test_without_pillow_a_small_image_is_shown_whole_and_a_large_one_named(
    tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "photos").mkdir()
    small = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(small, format="PNG")
    (tmp_path / "photos" / "small.png").write_bytes(small.getvalue())
    (tmp_path / "photos" / "large.png").write_bytes(small.getvalue() + bytes(20_000))
    names = ["small", "large"]
    rows = [{**r, "photo": f"photos/{name}.png"} for r, name in zip(article_rows(2), names, strict=True)]
    prompt = {"user": "{title}", "images": ["photo"]}
    job = write_job(tmp_path, rows, simulator.base_url, prompt=prompt)
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if not installed

    assert invoke("run", str(job), "-q").exit_code == 0

    html = page(job).read_text()
    assert_self_contained(html)
    inline = base64.b64encode(small.getvalue()).decode()
    assert html.count(f'<img class=thumb src="data:image/png;base64,{inline}"') == 1
    assert shown_rows(html)[1][1] == "[photos/large.png]Story 1"


def test_a_stopped_run_writes_its_page_too(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(30), simulator.base_url, concurrency=1)

    result = invoke("run", str(job), "--max-cost", "0.001")

    assert result.exit_code == 3, result.output
    assert "Outcome of the last run: <b>stopped_by_budget</b>" in page(job).read_text()
    assert sql(job, "SELECT outcome FROM runs") == [("stopped_by_budget",)]


def test_a_page_that_cannot_be_written_costs_a_warning_not_the_run(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = write_job(tmp_path, article_rows(3), simulator.base_url)
    page(job).mkdir(parents=True)  # a folder where the page goes: it cannot be replaced

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "no HTML report" in line]
    assert len(warnings) == 1 and str(page(job)) in warnings[0]
    assert read_output(job)["status"].to_list() == ["ok"] * 3


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_an_output_without_types_gets_its_page_and_its_cost(
    tmp_path: Path, simulator: RunningSimulator, suffix: str
) -> None:
    """CSV and JSON lines keep no types: a column empty throughout reads back as text."""
    job = write_job(tmp_path, article_rows(5), simulator.base_url)
    output = tmp_path / "out" / f"result.{suffix}"

    result = invoke("run", str(job), "--output", str(output))

    assert result.exit_code == 0, result.output
    assert "no HTML report" not in result.stderr
    html = Path(f"{output}.report.html").read_text()
    assert shown_figures(html)["rows-ok"] == "5" and html.count("<svg") == CHARTS - 1  # no failures
    cost = invoke("cost", str(output), "--format", "csv")
    assert cost.exit_code == 0, cost.output
    assert cost.stdout.splitlines()[-1].startswith("total,,5,")


def test_report_command_draws_the_page_from_the_checkpoint_or_the_output(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = run_with_failures_retries_and_a_resume(tmp_path, simulator)
    page(job).unlink()

    from_job = invoke("report", str(job), "--by", "title")

    assert from_job.exit_code == 0, from_job.output
    assert from_job.stdout.startswith(f"report: {page(job)} (")
    html = page(job).read_text()
    assert_figures_match_the_output(html, job)
    assert "cost by title" in html and html.count("<svg") == CHARTS + 1

    output = job.parent / "out" / "result.parquet"
    from_output = invoke("report", str(output))
    assert from_output.exit_code == 0, from_output.output
    assert_figures_match_the_output(page(job).read_text(), job)


@pytest.mark.parametrize("name", ["job.yaml", "out.parquet"])
def test_report_command_without_checkpoint_or_output_names_the_path(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".yaml"):
        path = write_job(tmp_path, article_rows(2), "http://127.0.0.1:1/v1")

    result = invoke("report", str(path))

    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert str(path) in result.stderr


def test_a_schema_2_checkpoint_gets_the_record_and_resumes(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE_V2, tmp_path / "job")
    job = tmp_path / "job" / "job.yaml"
    assert sql(job, "PRAGMA user_version") == [(2,)]
    assert sql(job, "SELECT name FROM sqlite_master WHERE name IN ('runs', 'attempts')") == []

    resumed = invoke("run", str(job), "--simulate")

    assert resumed.exit_code == 1, resumed.output  # two rows failed, as recorded
    assert "resuming: 8 of 12 rows already done" in resumed.stderr
    assert sql(job, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(job, "SELECT run, outcome, requests FROM runs") == [(1, "finished", 4)]
    assert sql(job, "SELECT row FROM attempts ORDER BY row") == [(8,), (9,), (10,), (11,)]
    assert read_output(job)["status"].value_counts().sort("status").rows() == [("failed", 2), ("ok", 10)]
    assert_figures_match_the_output(page(job).read_text(), job)


# Answers that fail a row without an HTTP status on its attempts (status null in `attempts`).
NO_STATUS = {
    "no choices": Reply(body={"id": "x", "object": "chat.completion", "model": "m", "choices": []}),
    "invalid UTF-8": Reply(body=b'{"choices": [{"message": {"content": "\xff\xfe"}}]}'),
    "reset": Reply(raw=b""),
}


def test_attempts_without_an_http_status_get_their_page_and_report(tmp_path: Path) -> None:
    """#20 item 6: a run whose attempts all lack a status (the first 3 rows, one run), then a
    run of good answers: both pages are drawn and `batchrun report` exits 0."""
    replies = list(NO_STATUS.values())

    def answer(request: Request) -> Reply:
        if request.method != "POST":
            return Reply(404)
        row = int(request.json()["messages"][1]["content"].split()[1])  # "Story N"
        return replies[row] if row < len(replies) else Reply(body=completion())

    with serve_stub(answer) as stub:
        job = write_job(
            tmp_path,
            article_rows(6),
            stub.base_url,
            concurrency=1,
            retry={"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.01},
        )
        first = invoke("run", str(job), "--limit", "3")
        assert first.exit_code == 1, first.output
        assert "no HTML report" not in first.stderr
        assert page(job).exists()
        assert sql(job, "SELECT COUNT(*), COUNT(status) FROM attempts") == [(6, 0)]
        second = invoke("run", str(job))
        assert second.exit_code == 1, second.output
        assert "no HTML report" not in second.stderr

    page(job).unlink()
    report = invoke("report", str(job))
    assert report.exit_code == 0, report.output
    html = page(job).read_text()
    assert_figures_match_the_output(html, job)
    assert "invalid_response" in html and "connection" in html


HOSTILE = ["</svg><script>alert(1)</script>", 'a "quoted" & <b>', "it's \x01 here"]


def test_by_columns_are_charted_by_name_and_their_values_shown_as_text(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    """#20 item 6: a column's name is shown as it is (Vega-Lite read `a.b` as field b of a, which
    no row has, and the chart said "undefined"); a value from the input is text, whatever it holds."""
    rows = [
        {**r, "a.b": f"group-{i % 2}", "x[0]": f"slot-{i % 3}", "who": HOSTILE[i % 3]}
        for i, r in enumerate(article_rows(6))
    ]
    job = write_job(tmp_path, rows, simulator.base_url)
    assert invoke("run", str(job)).exit_code == 0

    report = invoke("report", str(job), "--by", "a.b", "--by", "x[0]", "--by", "who")

    assert report.exit_code == 0, report.output
    html = page(job).read_text()
    assert_self_contained(html)
    assert "undefined" not in html
    shown = {texts[0]: texts for texts in map(chart_texts, chart_documents(html)) if texts}
    assert {"group-0", "group-1"} <= set(shown["cost by a.b (top 15)"])
    assert {"slot-0", "slot-1", "slot-2"} <= set(shown["cost by x[0] (top 15)"])
    hostile = [value.replace("\x01", "\ufffd") for value in HOSTILE]  # XML cannot hold U+0001
    assert set(hostile) <= set(shown["cost by who (top 15)"])


def test_report_help_imports_no_heavy_library() -> None:
    modules = imported("-m", "batchrun", "report", "--help")
    assert "click" in modules
    assert modules & HEAVY == set()


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "HOME": str(cwd)},  # its profile and crash files stay in the test's folder
    )


@pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it); required when CI=true",
)
def test_the_page_renders_in_chromium(tmp_path: Path, simulator: RunningSimulator) -> None:
    assert CHROMIUM is not None, "CI=true: chromium must be installed (.ci/run installs it)"
    job = run_with_failures_retries_and_a_resume(tmp_path, simulator)
    url = page(job).resolve().as_uri()

    dom = chromium("--dump-dom", url, cwd=tmp_path)
    shot = chromium("--window-size=800,2400", f"--screenshot={tmp_path / 'page.png'}", url, cwd=tmp_path)

    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:] + shot.stderr[-2000:]
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "page.png").stat().st_size > 20_000  # drawn, not blank
    svgs = re.findall(r"<svg.*?</svg>", dom.stdout, re.DOTALL)
    assert len(svgs) == CHARTS
    for svg in svgs:  # each chart's marks are in the document: bars or lines, with axes
        assert re.search(r'<(rect|path) class="(bar|line)"', svg), svg[:300]
        assert '<g class="axis"' in svg
    assert_figures_match_the_output(dom.stdout, job)
    assert TEST_KEY not in dom.stdout


def test_a_ray_run_records_its_attempts_and_workers(ray_session: Any, tmp_path: Path) -> None:
    from batchrun.simulator import SimulatorConfig, serve_in_thread
    from tests.test_ray import ray_job

    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        ray_job(tmp_path, 40, sim.base_url).run(ray=True, workers=2, quiet=True)
        sent = sim.stats.requests
    job = tmp_path / "job.yaml"
    assert sql(job, "SELECT driver, workers, requests FROM runs") == [("ray", 2, sent)]
    assert sql(job, "SELECT COUNT(*), SUM(final), COUNT(DISTINCT row) FROM attempts") == [(sent, 40, 40)]
    html = page(job).read_text()
    assert "Ray workers, last run" in html
    assert_figures_match_the_output(html, job)
