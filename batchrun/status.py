"""A job's figures so far, read from its checkpoint without running it (`batchrun status`,
`Job.status`), and which runs' answers the commands that read a checkpoint take."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from batchrun.checkpoint import Fingerprint
from batchrun.cost import job_price
from batchrun.display import Shown, cost_line, errors_lines, tokens_line
from batchrun.ledger import Submission
from batchrun.plan import SIMULATED_ENDPOINT, PreparedJob, read_checkpoint


@dataclass(frozen=True, repr=False)
class Status(Shown):
    """Rows by status (the whole job), why rows failed, tokens as far as the endpoint reported
    them, and what was spent (None: the model has no price). Shown as lines (repr) and as a
    table in a notebook."""

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
    checkpoint_path: Path | None = None
    live_batches: list[Submission] = field(default_factory=list)  # provider batches still live
    pending_reasons: dict[str, int] = field(default_factory=dict)  # rows batches gave back, by kind

    @property
    def pending(self) -> int:
        return self.total - self.ok - self.failed - self.skipped

    def figures(self) -> list[str]:
        """What `batchrun status` prints."""
        if not self.started:
            return [f"not started: 0 of {self.total} rows done"]
        failures = ", ".join(f"{k}: {n}" for k, n in self.failures_by_kind.items())
        lines = [f"ok: {self.ok}", f"failed: {self.failed}" + (f" ({failures})" if failures else "")]
        lines += errors_lines(self.top_errors, self.failed)
        reasons = ", ".join(f"{kind}: {n}" for kind, n in self.pending_reasons.items())
        pending = f"pending: {self.pending}" + (f" (back from batches: {reasons})" if reasons else "")
        lines += [f"skipped: {self.skipped}", pending, f"of: {self.total}"]
        lines.append(tokens_line(self.prompt_tokens, self.completion_tokens, self.rows_without_usage))
        if self.spent_usd is not None:
            lines.append(cost_line(self.spent_usd, self.prompt_tokens is None, self.rows_without_usage))
        for batch in self.live_batches:
            counts = f", {batch.done or 0:,} of {batch.lines:,} rows done" + (
                f", {batch.failed:,} failed" if batch.failed else ""
            )
            name = batch.batch_id or "(being submitted)"
            lines.append(f"batch {name}: {batch.status or batch.state}{counts} (as last seen)")
        return lines

    def title(self) -> str:
        return f"Status: {self.total - self.pending} of {self.total} rows done"


def made_for(job: PreparedJob) -> tuple[Fingerprint, Fingerprint]:
    """The job as run on its endpoint and as run on the simulator: a reader of the checkpoint
    takes either run's answers."""
    fingerprint = job.fingerprint(simulate=False)
    return fingerprint, fingerprint | {"endpoint.base_url": SIMULATED_ENDPOINT}


def job_status(job: PreparedJob) -> Status:
    """The job's figures as its checkpoint has them now (checked against the job, as a run does)."""
    if not job.checkpoint_path.exists():
        return Status(total=job.source.row_count, checkpoint_path=job.checkpoint_path)
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
            checkpoint_path=job.checkpoint_path,
            live_batches=checkpoint.live_batches(),
            pending_reasons=checkpoint.pending_reasons(),
        )
    finally:
        checkpoint.close()
