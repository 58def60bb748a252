"""A notebook session, in a real Jupyter kernel (nbclient driving ipykernel) against the simulator:
run, rerun, await, pandas in and out, a mistake, an interrupt and a resume, as a user meets them;
and the notebook it saves, read back as a viewer without the widgets' state reads it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from batchrun.simulator import RunningSimulator, SimulatorConfig, serve_in_thread
from tests.conftest import TEST_KEY, TEST_KEY_ENV, article_rows

ROWS = 200
CHECKPOINT = "runs/summaries.sqlite"
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(autouse=True)
def platform_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # else jupyter_core warns that paths move


@pytest.fixture
def slow_simulator() -> Iterator[RunningSimulator]:
    """50 ms an answer: an interrupted run is still running when the interrupt lands."""
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, latency_ms=50)) as sim:
        yield sim


def setup_cell(sim: RunningSimulator) -> str:
    endpoint = {"base_url": sim.base_url, "api_key_env": TEST_KEY_ENV}
    return "\n".join(
        [
            "import batchrun",
            "import polars as pl",
            f"df = pl.DataFrame({json.dumps(article_rows(ROWS))})",
            f"keys = dict(model='grok-4.3', prompt='Summarize: {{text}}', endpoint={endpoint!r},",
            f"            params={{'max_tokens': 40}}, checkpoint={CHECKPOINT!r})",
        ]
    )


def rows_in(checkpoint: Path) -> int:
    if not checkpoint.exists():
        return 0
    try:
        with sqlite3.connect(checkpoint, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def text_of(cell: Any) -> str:
    """What a cell showed: its printed text and the text/plain of its result."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


def error_of(cell: Any) -> Any:
    errors = [o for o in cell.outputs if o.output_type == "error"]
    return errors[0] if errors else None


class Session:
    """A kernel of its own in `folder`, cells run one at a time as a user would run them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.nb = nbformat.v4.new_notebook()
        self.client = NotebookClient(
            self.nb,
            kernel_name="python3",
            timeout=180,
            allow_errors=True,
            resources={"metadata": {"path": str(folder)}},
        )

    async def run(self, source: str) -> Any:
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        await self.client.async_execute_cell(cell, len(self.nb.cells) - 1)
        return cell

    async def interrupt_at(self, source: str, rows: int) -> Any:
        """Run `source`, and interrupt the kernel once the checkpoint holds `rows` rows."""
        running = asyncio.ensure_future(self.run(source))
        checkpoint = self.folder / CHECKPOINT
        while rows_in(checkpoint) < rows and not running.done():
            await asyncio.sleep(0.02)  # polling the checkpoint: it has no event to wait on
        assert not running.done(), "the run ended before the interrupt"
        await self.client.km.interrupt_kernel()
        return await running


def test_a_notebook_session_runs_resumes_and_explains_itself(
    tmp_path: Path, slow_simulator: RunningSimulator
) -> None:
    sim = slow_simulator
    session = Session(tmp_path)

    async def drive() -> dict[str, Any]:
        cells: dict[str, Any] = {}
        async with session.client.async_setup_kernel():
            cells["setup"] = await session.run(setup_cell(sim))
            cells["first"] = await session.run("out = batchrun.run(df.head(20), **keys)\nout.columns")
            cells["requests_after_first"] = sim.stats.requests
            cells["rerun"] = await session.run("out = batchrun.run(df.head(20), **keys)\nout.height")
            cells["requests_after_rerun"] = sim.stats.requests
            cells["await"] = await session.run("out = await batchrun.arun(df.head(20), **keys)\nout.height")
            cells["pandas"] = await session.run(
                "p = batchrun.run(df.head(20).to_pandas(), **keys)\ntype(p).__module__.split('.')[0]"
            )
            cells["mistake"] = await session.run(
                "batchrun.run(df.head(5), **{**keys, 'prompt': 'Summarize: {txt}'})"
            )
            cells["interrupted"] = await session.interrupt_at("big = batchrun.run(df, **keys)", rows=40)
            cells["done_before_resume"] = rows_in(tmp_path / CHECKPOINT)
            cells["requests_before_resume"] = sim.stats.requests
            cells["resumed"] = await session.run("big = batchrun.run(df, **keys)\nbig.height")
            cells["requests_after_resume"] = sim.stats.requests
        return cells

    cells = asyncio.run(drive())

    for name in ("setup", "first", "rerun", "await", "pandas", "resumed"):
        assert error_of(cells[name]) is None, (name, error_of(cells[name]))
    assert "'content'" in text_of(cells["first"])
    assert cells["requests_after_first"] == 20
    assert text_of(cells["rerun"]).strip().endswith("20")
    assert cells["requests_after_rerun"] == 20  # the rerun sent nothing
    assert text_of(cells["await"]).strip().endswith("20")
    mistake = error_of(cells["mistake"])
    assert mistake is not None and "txt" in mistake.evalue
    interrupted = error_of(cells["interrupted"])
    assert interrupted is not None and interrupted.ename == "KeyboardInterrupt"
    assert text_of(cells["resumed"]).strip().endswith(str(ROWS))
    sent_on_resume = cells["requests_after_resume"] - cells["requests_before_resume"]
    assert sent_on_resume == ROWS - cells["done_before_resume"]


def test_the_saved_progress_and_result_show_the_runs_end(tmp_path: Path) -> None:
    source = f"""
import batchrun
import polars as pl

job = batchrun.Job.define(pl.DataFrame({article_rows(12)!r}), model="grok-4.3",
                          prompt="Summarize: {{text}}", checkpoint="run.sqlite")
job.run(simulate=True)
"""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    NotebookClient(notebook, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    saved = tmp_path / "saved.ipynb"
    nbformat.write(notebook, saved)
    outputs = nbformat.read(saved, as_version=4).cells[0].outputs

    bars = [o["data"]["text/plain"] for o in outputs if WIDGET in o.get("data", {})]
    assert len(bars) == 1, outputs
    assert "100%" in bars[0] and "12/12" in bars[0] and "ok=12 failed=0" in bars[0], bars[0]
    result = outputs[-1]
    assert result["output_type"] == "execute_result", outputs
    assert result["data"]["text/plain"].splitlines()[:2] == [
        "RunResult: finished",
        "rows: 12 ok, 0 failed of 12",
    ]
    assert '<th style="text-align:left">checkpoint</th>' in result["data"]["text/html"]
