"""batchrun: run one LLM chat request per table row, resumably, within limits and budget."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batchrun.errors import BatchrunError

if TYPE_CHECKING:
    from batchrun.job import JobSpec, load_job
    from batchrun.runner import RunOptions, RunResult, run_job

__all__ = ["BatchrunError", "JobSpec", "RunOptions", "RunResult", "load_job", "run_job"]

# Imported on first use: `import batchrun` (and so `batchrun --help`) must not pay for polars,
# aiohttp and pydantic.
_LAZY = {
    "JobSpec": "batchrun.job",
    "load_job": "batchrun.job",
    "RunOptions": "batchrun.runner",
    "RunResult": "batchrun.runner",
    "run_job": "batchrun.runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
