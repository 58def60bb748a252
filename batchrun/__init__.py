"""batchrun: run one LLM chat request per table row, resumably, within limits and budget."""

from batchrun.errors import BatchrunError
from batchrun.job import JobSpec, load_job
from batchrun.report import RunResult
from batchrun.runner import RunOptions

__all__ = ["BatchrunError", "JobSpec", "RunOptions", "RunResult", "load_job"]
