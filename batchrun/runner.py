"""One run of a job, shared by every driver: check it, open its checkpoint, run the core, write
the output table and the run report, and return the job's figures (RunResult).

`run_job` is a coroutine with no process-wide side effects: the drivers (cli.py, api.py) choose
the event loop, own the signals, render the events and start the simulator for --simulate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from batchrun.batch import BatchOptions
from batchrun.checkpoint import Checkpoint, Fingerprint, Mode, open_checkpoint, without_input_hash
from batchrun.core import RunStats, Stop
from batchrun.cost import (
    ASSUMED_MAX_OUTPUT_TOKENS,
    Price,
    batch_price,
    job_price,
    output_tokens_cap,
    request_cost,
)
from batchrun.distributed import RayOptions
from batchrun.errors import CheckpointError, JobChanged, JobError
from batchrun.estimate import estimate_job
from batchrun.events import Events, RunStarted
from batchrun.executors import LOCAL, Execution, Executor, ExecutorKind, api_key
from batchrun.html_report import write_page_or_warn
from batchrun.job import JobSpec
from batchrun.models import check_model
from batchrun.output import USAGE_COLUMNS, write_output
from batchrun.plan import (
    SIMULATED_ENDPOINT,
    IndexedPlan,
    KeyedPlan,
    PreparedJob,
    index_input,
    prepare,
    rekey_by_row,
    run_plan,
)
from batchrun.report import RunResult, write_run_report
from batchrun.results import RowStatus, RowTally
from batchrun.structured import describe_format

if TYPE_CHECKING:
    import httpx2

T = TypeVar("T")
COUNT_WAIT_S = 0.25  # how long the first request may wait for the count of the rows done
BACKGROUND_NICE = 10  # the count's thread: ~10% of a core the run keeps busy, all of an idle one


@dataclass(frozen=True)
class RunOptions:
    """How to run a job; each field mirrors a CLI flag of `batchrun run`."""

    simulate: bool = False
    simulate_latency_ms: float = 0.0
    fresh: bool = False
    retry_failed: bool = False
    limit: int | None = None
    concurrency: int | None = None
    output: str | Path | None = None  # a path or a URL: overrides output.path
    quiet: bool = False
    grace_s: float = 10.0  # after a stop request, how long in-flight requests may finish
    max_cost_usd: float | None = None  # overrides the job's budget.max_cost_usd
    rows: frozenset[int] | None = None  # only these rows (0-based), e.g. a random pilot
    checkpoint: Path | None = None  # where the checkpoint lives; default: beside the output
    yes: bool = False  # send finished rows again when the job changed (else JobChanged)
    ray: RayOptions | None = None  # run on Ray (batchrun/distributed/): where, how many workers
    # Through the provider's Batch API (batchrun/batch/); True: BatchOptions(). The job's
    # `mode: batch` does the same.
    batch: BatchOptions | bool = False
    # The caller's own client (auth, proxies, mTLS, a MockTransport), used on the run's loop.
    http_client: httpx2.AsyncClient | None = None


async def run_job(
    spec: JobSpec,
    options: RunOptions,
    events: Events,
    *,
    base_url: str | None = None,  # where to send instead of endpoint.base_url (the simulator's)
    stop: Stop | None = None,
) -> RunResult:
    """Run (or resume) a job to the end, or until stopped; write the output table.

    In phases: preflight (the job, its input, the endpoint) -> open (the checkpoint, what is
    done, the plan) -> execute (an executor sends the rows) -> finish (the output, the reports).
    Cancelling the task that awaits this stops like a first stop request: in-flight rows finish
    within the grace period, the output is written, then CancelledError is raised again.
    """
    started = time.monotonic()
    checked = await preflight(spec, options)
    opened = await open_run(checked, options)
    try:
        stop = stop or Stop()
        execution = opened.execution(checked, options, events, stop, base_url)
        executor = checked.kind.executor(execution)
        announce(checked, opened, execution, options.fresh, executor)
        stats, cancelled = await _run_to_the_end(executor.run(), stop)
        result = await finish(checked, opened, options, events, stats, executor.workers(), started)
        if stats.error is not None:
            raise stats.error
        if cancelled:  # saying what was kept and how to resume
            raise asyncio.CancelledError(result.interrupted_message())
        return result
    finally:
        opened.close()


@dataclass(frozen=True)
class Checked:
    """What preflight found: the job as it will run, before anything is opened or sent."""

    job: PreparedJob
    kind: ExecutorKind
    price: Price | None
    max_cost_usd: float | None
    fingerprint: Fingerprint
    model_note: str | None


async def preflight(spec: JobSpec, options: RunOptions) -> Checked:
    """Check the job, its input and the endpoint. A run that cannot start leaves nothing that a
    corrected base_url would have to --fresh; the endpoint check runs in a thread (its own event
    loop: this coroutine may be on a notebook's). Not for --simulate, which serves the job's model."""
    job = await asyncio.to_thread(prepare, spec, options.output, checkpoint=options.checkpoint)
    kind = executor_kind(spec, options)
    kind.check(options.http_client)
    price = job_price(spec)
    max_cost = options.max_cost_usd or (spec.budget.max_cost_usd if spec.budget else None)
    if max_cost is not None and price is None:
        raise JobError(
            f"a budget needs a price, and model {spec.model!r} is not in the price table; add "
            "pricing: {input_per_million: ..., output_per_million: ...} to the job",
            spec.job_path,
        )
    key = None if options.simulate else api_key(spec.endpoint)  # a key not set stops it here
    model_note = None
    if options.http_client is not None:
        # The check runs on a loop of its own, where the caller's client cannot go: the first
        # chat request decides instead (an endpoint that does not answer still stops the job).
        model_note = "note: with your own http_client the model name is not checked before the run"
    elif key is not None:
        model_note = await asyncio.to_thread(check_model, spec, spec.endpoint.base_url, key)
    fingerprint = job.fingerprint(options.simulate)
    if not (options.fresh or options.yes or options.retry_failed):
        await asyncio.to_thread(refuse_resend, job, fingerprint, options)
    return Checked(job, kind, price, max_cost, fingerprint, model_note)


def executor_kind(spec: JobSpec, options: RunOptions) -> ExecutorKind:
    """How the rows are sent: on Ray, through the Batch API (`batch`, or the job's `mode: batch`),
    or from this process."""
    batch = options.batch
    if batch is True or (batch is False and spec.mode == "batch"):
        batch = BatchOptions()
    if batch and options.ray is not None:
        raise JobError("batch mode sends the rows as provider batches: it does not run on Ray")
    return options.ray or batch or LOCAL


@dataclass
class Opened:
    """The checkpoint, what it holds, and the plan of what to send."""

    checkpoint: Checkpoint
    counted: asyncio.Future[RowTally] | None = None
    plan: KeyedPlan | IndexedPlan | None = None
    in_scope: int = 0
    before: dict[str, int] = field(default_factory=dict)  # rows done before this run, by status
    spent_usd: float = 0.0
    used_before: RowTally = field(default_factory=RowTally)  # what they used: tokens, cost
    to_send: int = 0
    repriced: int = 0

    def take(self, done: RowTally) -> None:
        """What was done before this run, counted."""
        self.before, self.spent_usd, self.used_before = dict(done.by_status), done.cost_usd, done

    def execution(
        self, checked: Checked, options: RunOptions, events: Events, stop: Stop, base_url: str | None
    ) -> Execution:
        assert self.plan is not None
        url = base_url or checked.job.spec.endpoint.base_url
        return Execution(
            checked.job,
            self.plan,
            self.checkpoint.record,
            events,
            stop,
            base_url=url,
            simulated=options.simulate,
            width=options.concurrency or checked.job.spec.concurrency,
            grace_s=options.grace_s,
            price=checked.price,
            max_cost_usd=checked.max_cost_usd,
            spent_usd=self.spent_usd,
            to_send=self.to_send,
            format_step=self.checkpoint.accepted_format(url, checked.job.format_fallbacks),
            accept_format=functools.partial(self.checkpoint.accept_format, url),
            http_client=options.http_client,
            checkpoint=self.checkpoint,
        )

    def close(self) -> None:
        counted = self.counted
        if counted is not None and not counted.done():
            counted.cancel()  # the run ended before the count
        elif counted is not None and not counted.cancelled():
            counted.exception()  # retrieved: a failed count failed the run, or the run failed first
        if self.plan is not None:
            self.plan.close()  # a batch may still be keyed in a thread of its own: waits for it
        self.checkpoint.close()


async def open_run(checked: Checked, options: RunOptions) -> Opened:
    """Open the checkpoint as the run's one writer and plan what to send.

    What is done, as the last run indexed the input (exact for a resume of the same input; the
    plan finds what is done row by row as it goes), is a join over every row, so it is counted
    beside the sending, and the bar and `resuming:` take it when it is in, unless the run needs it
    to start: what was spent for a budget, what to send for --retry-failed, --rows, and an
    executor that sizes its work by it. A fresh run has nothing done.
    """
    job, spec = checked.job, checked.job.spec
    made_for = (checked.fingerprint,)
    mode: Mode = "fresh" if options.fresh else "resume"
    opened = Opened(open_checkpoint(job.checkpoint_path, mode, *made_for, rekey=rekey_by_row(job, made_for)))
    try:
        checkpoint = opened.checkpoint
        checkpoint.begin_run(checked.kind.name)
        price, at_batch_rate = checked.price, batch_price(spec)
        opened.repriced = checkpoint.reprice(repr(price), functools.partial(request_cost, price))
        batch_cost = functools.partial(request_cost, at_batch_rate)
        opened.repriced += checkpoint.reprice(repr(at_batch_rate), batch_cost, batch=True)
        opened.in_scope = min(options.limit or job.source.row_count, job.source.row_count)
        counted = opened.counted = _in_background(checkpoint.done_before(opened.in_scope, spec.dedupe))
        needed = checked.max_cost_usd is not None or options.rows is not None or checked.kind.needs_counts
        if needed or options.fresh or options.retry_failed:
            opened.take(await counted)
        else:  # in time for the first frame of the bar (any checkpoint of up to ~100k rows)
            await asyncio.wait({counted}, timeout=COUNT_WAIT_S)
            if counted.done():
                opened.take(counted.result())
        if options.retry_failed:
            opened.to_send = opened.before.get(RowStatus.FAILED, 0)
            opened.before[RowStatus.FAILED] = 0  # sent again: each counts once it finishes anew
        elif options.rows is not None:
            opened.to_send = len(options.rows)
        else:
            opened.to_send = opened.in_scope - sum(opened.before.values())
        opened.plan = run_plan(
            job,
            checkpoint,
            options.simulate,
            limit=options.limit,
            retry_failed=options.retry_failed,
            only=options.rows,
        )
        return opened
    except BaseException:
        opened.close()
        raise


def announce(checked: Checked, opened: Opened, execution: Execution, fresh: bool, executor: Executor) -> None:
    """The run's start, with what the user should know before the first row."""
    job, spec, plan, events = checked.job, checked.job.spec, opened.plan, execution.events
    assert opened.counted is not None and plan is not None
    events.started(
        RunStarted(
            sum(opened.before.values()) + opened.to_send,
            opened.before,
            cost_usd=None if checked.price is None else opened.spent_usd,
            tokens=opened.used_before.tokens,
            without_usage=opened.used_before.without_usage,
            budget_usd=checked.max_cost_usd,
            status=executor.describe,
            counted=None if opened.counted.done() else opened.counted,
            reused=lambda: plan.reused,
        )
    )
    if not fresh:
        opened.counted.add_done_callback(functools.partial(_say_resuming, events, opened.in_scope))
    if opened.repriced and not fresh:
        events.say(f"pricing changed since the checkpoint was made: repriced {opened.repriced} rows")
    if checked.model_note:
        events.say(checked.model_note, "note")
    if format_step := execution.format_step:
        events.say(
            f"note: sending {describe_format(job.format_fallbacks[format_step])} for output.fields, "
            "as this endpoint took in an earlier run (a fresh run tries the others again)",
            "note",
        )
    if checked.price is None:
        events.say(
            f"warning: no price known for model {spec.model!r}; cost_usd stays empty (null); "
            "set pricing: {input_per_million: ..., output_per_million: ...} to price it",
            "warning",
        )
    if checked.max_cost_usd is not None and output_tokens_cap(job.params) is None:
        events.say(
            f"warning: params.max_tokens is not set; the budget assumes up to "
            f"{ASSUMED_MAX_OUTPUT_TOKENS:,} output tokens per request",
            "warning",
        )


async def finish(
    checked: Checked,
    opened: Opened,
    options: RunOptions,
    events: Events,
    stats: RunStats,
    workers: list[dict[str, int]] | None,
    started: float,
) -> RunResult:
    """Write the output table (every row: its result, or `pending`) and the reports.

    The summary's figures are summed as the output's rows are written (Tally); a dedupe job's
    rows share results, so what they were billed is summed over the results instead.
    """
    if isinstance(stats.error, CheckpointError):  # nothing more can be recorded: no output
        raise stats.error
    job, spec, checkpoint = checked.job, checked.job.spec, opened.checkpoint
    assert opened.counted is not None and opened.plan is not None
    await opened.counted  # its figures are shown by now, and its error raised
    events.finished()
    await asyncio.to_thread(opened.plan.finish)  # index the rows a stopped run did not reach
    tally = await asyncio.to_thread(
        write_output,
        job.source,
        spec.output.include_columns,
        checkpoint.output_rows(spec.dedupe),
        job.output_path,
        spec.output.format,
        limit=options.limit,
        fields=spec.output.fields,
    )
    if spec.dedupe:
        tally.sums = await asyncio.to_thread(checkpoint.used_sums, USAGE_COLUMNS)
    top_errors = tally.top_errors()
    result = RunResult(
        total=opened.in_scope,
        ok=tally.by_status[RowStatus.OK],
        failed=tally.by_status[RowStatus.FAILED],
        skipped=tally.by_status[RowStatus.SKIPPED],
        pending=tally.by_status[RowStatus.PENDING],
        prompt_tokens=tally.tokens("prompt_tokens"),
        completion_tokens=tally.tokens("completion_tokens"),
        failures_by_kind=tally.kinds(),
        retries=stats.retries,
        rate_limited=stats.rate_limited,
        wall_s=time.monotonic() - started,
        output_path=job.output_path,
        interrupted=stats.outcome == "interrupted",
        cost_usd=None if checked.price is None else tally.cost_usd,
        budget_usd=checked.max_cost_usd,
        budget_stopped=stats.outcome == "stopped_by_budget",
        workers=workers,
        requests=stats.requests,
        run_tokens=stats.tokens,
        report_path=job.report_path,
        rows_without_usage=tally.without_usage,
        top_errors=checkpoint.top_errors() if top_errors is None else top_errors,
        outcome=stats.outcome,
        checkpoint_path=job.checkpoint_path,
    )
    write_run_report(job, result, checked.price, checked.fingerprint, stats.error, tally.usage())
    checkpoint.end_run(stats.outcome, stats.requests, workers=len(workers or [None]))
    if stats.requests:
        await asyncio.to_thread(write_page_or_warn, job, events)
    return result


def _in_background(count: Callable[[], T]) -> asyncio.Future[T]:
    """`count()` in a thread of its own at a low priority (Linux: nice 10, that thread only), so
    that it takes the CPU the run leaves: beside a run pinned to one core it took half of it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)

        def settle(result: T | None, error: Exception | None) -> None:
            if future.cancelled():  # the run ended first
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        try:
            result, error = count(), None
        except Exception as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for it
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="batchrun-count", daemon=True).start()
    return future


def _say_resuming(events: Events, in_scope: int, counted: asyncio.Future[RowTally]) -> None:
    if not counted.cancelled() and counted.exception() is None and (done := counted.result().rows):
        events.say(f"resuming: {done} of {in_scope} rows already done")


def refuse_resend(job: PreparedJob, fingerprint: Fingerprint, options: RunOptions) -> None:
    """Raise JobChanged if the job changed since its last run (prompt, model, params, endpoint)
    so that rows it finished would be sent again; say how many and what they should cost. A
    change back to an earlier version finds its answers still there, and sends nothing again."""
    if not job.checkpoint_path.exists():
        return
    last = Checkpoint(job.checkpoint_path, "read")
    try:
        recorded = last.fingerprint()
        by_row = last.keyed_by_row  # a 0.1 checkpoint: keyed (or refused) as the writer opens it
    finally:
        last.close()
    if recorded is None or by_row or (recorded := without_input_hash(recorded)) == fingerprint:
        return
    projection = estimate_job(job, (fingerprint,), simulate=options.simulate, limit=options.limit)
    if not projection.again_rows:
        return
    changed = ", ".join(k for k in fingerprint if recorded.get(k) != fingerprint[k])
    raise JobChanged(
        f"the job's {changed} changed since its last run: {projection.resend()}",
        projection.again_rows,
        None if projection.again is None else projection.again.cost_usd,
    )


def prune(spec: JobSpec, output: str | Path | None = None) -> tuple[int, int] | None:
    """Drop the answers in the job's checkpoint that no row of the job as it is now uses (an
    earlier prompt's, a removed row's); (dropped, kept), or None without a checkpoint. The
    checkpoint is bound to the job as it is, keyed as its last run was (endpoint or --simulate)."""
    job = prepare(spec, output, write=False)  # nothing is written but the local checkpoint
    if not job.checkpoint_path.exists():
        return None
    last = Checkpoint(job.checkpoint_path, "read")
    try:
        recorded = last.fingerprint()
    finally:
        last.close()
    simulate = recorded is not None and recorded.get("endpoint.base_url") == SIMULATED_ENDPOINT
    made_for = (job.fingerprint(simulate),)
    checkpoint = open_checkpoint(job.checkpoint_path, "resume", *made_for, rekey=rekey_by_row(job, made_for))
    try:
        index_input(job, checkpoint, simulate)
        return checkpoint.prune()
    finally:
        checkpoint.close()


async def _run_to_the_end(run: Coroutine[Any, Any, RunStats], stop: Stop) -> tuple[RunStats, bool]:
    """Run the core (or the cluster); a cancellation of the caller is a stop request (a second, a
    stop at once), and the run still finishes, so that nothing answered is lost."""
    task = asyncio.ensure_future(run)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            stop.request()
