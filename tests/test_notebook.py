"""A notebook session, in a real Jupyter kernel (nbclient driving ipykernel) against the simulator:
the Python API page's session (run, rerun, await, pandas in and out, a mistake, an interrupt and
a resume) runs cell by cell and shows what the page shows; and the notebook a run saves, read
back as a viewer without the widgets' state reads it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import article_rows
from tests.test_api import rows_in
from tests.test_docs import ROOT, Block, blocks, masked, matches

PAGE = ROOT / "docs" / "python-api.md"
UPDATE = os.environ.get("BATCHRUN_UPDATE_DOCS") == "1"  # read before conftest clears the environment

CHECKPOINT = "runs/articles.sqlite"  # as the page's session names it
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(autouse=True)
def platform_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # else jupyter_core warns that paths move


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


@dataclass
class Cell:
    source: str
    out: Block | None  # what the page shows it printed


def session_cells() -> list[Cell]:
    """The page's notebook session: its `In [n]` cells, each with the `Out` block after it."""
    found = blocks(PAGE)
    cells = []
    for i, block in enumerate(found):
        if block.lang == "python" and 'title="In' in block.info:
            after = found[i + 1] if i + 1 < len(found) else None
            cells.append(Cell(block.body, after if after and 'title="Out"' in after.info else None))
    return cells


def shown(cell: Any) -> str:
    """What a cell showed a reader: its printed lines, its result's text, or its error in a line
    (not the progress widget, nor the notes on stderr)."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream" and output.name == "stdout":
            parts.append(output.text)
        elif output.output_type == "execute_result":
            parts.append(output.data["text/plain"] + "\n")
        elif output.output_type == "error":
            parts.append(f"{output.ename}: {output.evalue}\n")
    return "".join(parts)


def normal(text: str, folder: Path) -> list[str]:
    """As test_docs masks a page's output, and the count an interrupt found done."""
    return masked(re.sub(r"\b\d+ of (\d+) rows done", r"N of \1 rows done", text), folder)


def requests_per_run(checkpoint: Path) -> list[int]:
    with sqlite3.connect(checkpoint) as db:
        return [n for (n,) in db.execute("SELECT requests FROM runs ORDER BY run")]


def test_the_python_api_pages_notebook_session_runs_as_shown(tmp_path: Path) -> None:
    """Each `In` cell of the page's session runs in a kernel and shows the page's `Out`; the
    interrupted cell is interrupted once 40 rows are done. BATCHRUN_UPDATE_DOCS=1 writes what
    the cells showed into the page instead."""
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    cells = session_cells()
    session = Session(tmp_path)

    async def drive() -> list[Any]:
        ran = []
        async with session.client.async_setup_kernel():
            for cell in cells:
                interrupted = cell.out is not None and cell.out.body.startswith("KeyboardInterrupt")
                if interrupted:
                    ran.append(await session.interrupt_at(cell.source, rows=40))
                else:
                    ran.append(await session.run(cell.source))
        return ran

    ran = asyncio.run(drive())

    got = [shown(cell) for cell in ran]
    if UPDATE:
        text = PAGE.read_text().splitlines(keepends=True)
        for cell, printed in reversed(list(zip(cells, got, strict=True))):  # later lines first
            if cell.out is not None:
                end = cell.out.line + cell.out.body.count("\n")
                text[cell.out.line : end] = [line + "\n" for line in masked(printed, tmp_path)]
        PAGE.write_text("".join(text))
    for cell, printed in zip(cells, got, strict=True):
        if cell.out is not None:
            assert matches(normal(cell.out.body, tmp_path), normal(printed, tmp_path)), (cell.source, printed)
    errors = [c for c in ran if any(o.output_type == "error" for o in c.outputs)]
    assert len(errors) == 2  # the mistake and the interrupt
    mistake = next(o for o in errors[0].outputs if o.output_type == "error")
    frames = [
        f
        for f in (re.sub(r"\x1b\[[\d;]*m", "", t) for t in mistake.traceback)
        if f.startswith(("Cell", "File"))
    ]
    assert len(frames) == 2, mistake.traceback  # the cell's line, and batchrun's one frame
    assert not list((tmp_path / "runs").glob("*.input.parquet.*"))  # nothing left half-written
    runs = requests_per_run(tmp_path / CHECKPOINT)
    assert runs[:2] == [20, 0]  # the first run, then the awaited rerun: nothing sent
    assert runs[2] == 0  # pandas: the same rows, already done
    assert sum(runs) == 300 and len(runs) == 5  # the interrupted run and the resume sent the rest once


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
