"""batchrun: run one LLM chat request per table row, resumably, within limits and budget.

    import batchrun
    out = batchrun.run(df, model="grok-4.3", prompt="Summarize: {text}", checkpoint="runs/s.sqlite")

The drivers' heavy imports (polars, the HTTP client) wait until `run`, `arun` or `Job` is first
used, so that `import batchrun.cli` stays quick.
"""

from typing import TYPE_CHECKING, Any

from batchrun.errors import (
    BatchrunError,
    CheckpointError,
    EndpointUnavailable,
    InputError,
    JobAborted,
    JobChanged,
    JobError,
    RequestFailed,
)

if TYPE_CHECKING:
    from batchrun.api import Job, arun, cost_table, draw_report, run
    from batchrun.report import RunResult

__all__ = [
    "BatchrunError",
    "CheckpointError",
    "EndpointUnavailable",
    "InputError",
    "Job",
    "JobAborted",
    "JobChanged",
    "JobError",
    "RequestFailed",
    "RunResult",
    "__version__",
    "arun",
    "cost_table",
    "draw_report",
    "run",
]

_LAZY = {name: "batchrun.api" for name in ("Job", "arun", "cost_table", "draw_report", "run")} | {
    "RunResult": "batchrun.report"
}


def __dir__() -> list[str]:
    """The lazy names too, so that `batchrun.r<TAB>` offers `run`."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "__version__":
        from importlib.metadata import version

        return version("batchrun")
    raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
