"""A job's figures so far, read from its checkpoint without running it (`batchrun status`,
`Job.status`), and which runs' answers the commands that read a checkpoint take."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchrun.checkpoint import Fingerprint
from batchrun.cost import job_price
from batchrun.ledger import Submission
from batchrun.plan import SIMULATED_ENDPOINT, PreparedJob, read_checkpoint


@dataclass(frozen=True)
class Status:
    """Rows by status (the whole job), why rows failed, tokens as far as the endpoint reported
    them, and what was spent (None: the model has no price)."""

    total: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int | None = 0  # None: answers came, none with usage
    completion_tokens: int | None = 0
    rows_without_usage: int = 0
    spent_usd: float | None = None
    failures_by_kind: dict[str, int] = field(default_factory=dict)
    top_errors: list[tuple[str, int]] = field(default_factory=list)  # commonest messages of failed rows
    started: bool = False  # False: no checkpoint yet
    live_batches: list[Submission] = field(default_factory=list)  # provider batches still live
    pending_reasons: dict[str, int] = field(default_factory=dict)  # rows batches gave back, by kind

    @property
    def pending(self) -> int:
        return self.total - self.ok - self.failed - self.skipped


def made_for(job: PreparedJob) -> tuple[Fingerprint, Fingerprint]:
    """The job as run on its endpoint and as run on the simulator: a reader of the checkpoint
    takes either run's answers."""
    fingerprint = job.fingerprint(simulate=False)
    return fingerprint, fingerprint | {"endpoint.base_url": SIMULATED_ENDPOINT}


def job_status(job: PreparedJob) -> Status:
    """The job's figures as its checkpoint has them now (checked against the job, as a run does)."""
    if not job.checkpoint_path.exists():
        return Status(total=job.source.row_count)
    checkpoint = read_checkpoint(job, made_for(job))
    try:
        totals = checkpoint.totals()
        return Status(
            total=job.source.row_count,
            ok=totals.ok,
            failed=totals.failed,
            skipped=totals.skipped,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            rows_without_usage=totals.without_usage,
            spent_usd=checkpoint.spent_usd() if job_price(job.spec) is not None else None,
            failures_by_kind=checkpoint.failures_by_kind(),
            top_errors=checkpoint.top_errors(),
            started=True,
            live_batches=checkpoint.live_batches(),
            pending_reasons=checkpoint.pending_reasons(),
        )
    finally:
        checkpoint.close()
