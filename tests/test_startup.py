"""Start-up (#12 item 8): `--help` and `--version` import none of the heavy libraries.

What a command needs is imported when it runs; a plain `import batchrun` stays light too (the
Python API's names load on first use). Checked by what the interpreter imported, not by a clock.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = {"polars", "aiohttp", "pydantic", "genai_prices", "httpx", "httpx2", "tqdm", "tenacity", "yaml"}


def imported(*args: str) -> set[str]:
    """Top-level packages a fresh interpreter imported (`-X importtime` lists every one)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["simulate", "--help"]])
def test_help_and_version_import_no_heavy_library(argv: list[str]) -> None:
    modules = imported("-m", "batchrun", *argv)
    assert "click" in modules  # the listing works
    assert modules & HEAVY == set()


def test_import_batchrun_cli_is_light() -> None:
    assert imported("-c", "import batchrun.cli") & HEAVY == set()


def test_lazy_public_names_still_load() -> None:
    import batchrun

    assert batchrun.Job.__module__ == "batchrun.api"
    assert batchrun.run.__module__ == "batchrun.api"
    assert batchrun.RunResult.__module__ == "batchrun.report"
    with pytest.raises(AttributeError):
        _ = batchrun.no_such_name  # type: ignore[attr-defined]
