"""In a Jupyter notebook: a real kernel runs the cell as Jupyter does (nbclient), and the
notebook it saves is read back as a viewer without the widgets' state reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import article_rows

WIDGET = "application/vnd.jupyter.widget-view+json"


def run_cell(source: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The outputs a kernel left in a notebook of one cell, as saved."""
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # else jupyter_core warns that paths move
    import nbclient
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nbclient.NotebookClient(notebook, timeout=120, resources={"metadata": {"path": str(folder)}}).execute()
    saved = folder / "saved.ipynb"
    nbformat.write(notebook, saved)
    outputs: list[dict[str, Any]] = nbformat.read(saved, as_version=4).cells[0].outputs
    return outputs


def test_the_saved_progress_and_result_show_the_runs_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = f"""
import batchrun
import polars as pl

job = batchrun.Job.define(pl.DataFrame({article_rows(12)!r}), model="grok-4.3",
                          prompt="Summarize: {{text}}", checkpoint="run.sqlite")
job.run(simulate=True)
"""
    outputs = run_cell(source, tmp_path, monkeypatch)

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
