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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from batchrun.budget import BudgetGuard
from batchrun.checkpoint import Checkpoint, Fingerprint, Mode, open_checkpoint, without_input_hash
from batchrun.client import ChatClient
from batchrun.core import Core, RunStats, Stop
from batchrun.cost import ASSUMED_MAX_OUTPUT_TOKENS, job_price, output_tokens_cap, request_cost
from batchrun.distributed import RayOptions
from batchrun.errors import BatchrunError, CheckpointError, JobChanged, JobError, Remedy
from batchrun.estimate import estimate_job
from batchrun.events import Events, RunStarted
from batchrun.html_report import write_page_or_warn
from batchrun.job import EndpointSpec, JobSpec
from batchrun.limits import Limiter
from batchrun.models import check_model
from batchrun.output import USAGE_COLUMNS, write_output
from batchrun.plan import (
    SIMULATED_ENDPOINT,
    SIMULATED_KEY,
    IndexedPlan,
    KeyedPlan,
    PreparedJob,
    index_input,
    prepare,
    rekey_by_row,
    run_plan,
)
from batchrun.report import RunResult, write_run_report
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

    Cancelling the task that awaits this stops like a first stop request: in-flight rows finish
    within the grace period, the output is written, then CancelledError is raised again.
    """
    job = await asyncio.to_thread(prepare, spec, options.output, checkpoint=options.checkpoint)
    started = time.monotonic()
    key = SIMULATED_KEY if options.simulate else api_key(spec.endpoint)
    price = job_price(spec)
    max_cost = options.max_cost_usd or (spec.budget.max_cost_usd if spec.budget else None)
    if max_cost is not None and price is None:
        raise JobError(
            f"a budget needs a price, and model {spec.model!r} is not in the price table; add "
            "pricing: {input_per_million: ..., output_per_million: ...} to the job",
            spec.job_path,
        )
    # The start check, before a checkpoint exists: a run that cannot start leaves nothing that a
    # corrected base_url would have to --fresh. Not for --simulate, which serves the job's model.
    # In a thread: it runs its own event loop, and this coroutine may be on a notebook's.
    if options.http_client is not None and options.ray is not None:
        raise JobError(
            "http_client= cannot be sent to Ray workers; leave it out to run on Ray", spec.job_path
        )
    model_note = None
    if options.http_client is not None:
        # The check runs on a loop of its own, where the caller's client cannot go: the first
        # chat request decides instead (an endpoint that does not answer still stops the job).
        model_note = "note: with your own http_client the model name is not checked before the run"
    elif not options.simulate:
        model_note = await asyncio.to_thread(check_model, spec, spec.endpoint.base_url, key)
    fingerprint = job.fingerprint(options.simulate)
    made_for = (fingerprint,)
    if not (options.fresh or options.yes or options.retry_failed):
        await asyncio.to_thread(refuse_resend, job, fingerprint, options)
    mode: Mode = "fresh" if options.fresh else "resume"
    checkpoint = open_checkpoint(job.checkpoint_path, mode, *made_for, rekey=rekey_by_row(job, made_for))
    counted: asyncio.Future[tuple[dict[str, int], float]] | None = None
    plan: KeyedPlan | IndexedPlan | None = None
    try:
        checkpoint.begin_run("local" if options.ray is None else "ray")
        repriced = checkpoint.reprice(repr(price), functools.partial(request_cost, price))
        in_scope = min(options.limit or job.source.row_count, job.source.row_count)
        # What is done, as the last run indexed the input (exact for a resume of the same input;
        # the plan finds what is done row by row as it goes): a join over every row, so it runs
        # beside the sending, and the bar and `resuming:` take it when it is in, unless the run
        # needs it to start: what was spent for a budget, what to send for --retry-failed,
        # --rows and Ray. A fresh run has nothing done.
        counted = _in_background(checkpoint.done_before(in_scope, spec.dedupe))
        before: dict[str, int] = {}
        spent = 0.0
        needed = max_cost is not None or options.rows is not None or options.ray is not None
        if needed or options.fresh or options.retry_failed:
            before, spent = await counted
        else:  # in time for the first frame of the bar (any checkpoint of up to ~100k rows)
            await asyncio.wait({counted}, timeout=COUNT_WAIT_S)
            if counted.done():
                before, spent = counted.result()
        done = sum(before.values())
        if options.retry_failed:
            to_send = before.get("failed", 0)
            before["failed"] = 0  # sent again: each counts once it finishes anew
        elif options.rows is not None:
            to_send = len(options.rows)
        else:
            to_send = in_scope - done
        plan = run_plan(
            job,
            checkpoint,
            options.simulate,
            limit=options.limit,
            retry_failed=options.retry_failed,
            only=options.rows,
        )
        url = base_url or spec.endpoint.base_url
        width = options.concurrency or spec.concurrency
        params = job.params
        stop = stop or Stop()
        budget = None if max_cost is None else BudgetGuard(max_cost, spent_usd=spent)
        format_step = checkpoint.accepted_format(url, job.format_fallbacks) if options.ray is None else 0
        if options.ray is None:
            core = Core(
                job,
                plan.requests(),
                ChatClient(
                    url,
                    key,
                    spec.endpoint.timeout_s,
                    width,
                    max_response_mb=spec.endpoint.max_response_mb,
                    http_client=options.http_client,
                ),
                Limiter(
                    width,
                    spec.rate_limit.requests_per_minute,
                    spec.rate_limit.tokens_per_minute,
                    max_tokens=params.get("max_completion_tokens", params.get("max_tokens")),
                    max_hold_s=spec.retry.max_backoff_s,
                ),
                checkpoint.record,
                events,
                width=width,
                grace_s=options.grace_s,
                price=price,
                budget=budget,
                base_url=url,
                stop=stop,
                format_step=format_step,
                accept_format=functools.partial(checkpoint.accept_format, url),
            )
            describe = core.describe
        else:
            from batchrun.distributed.driver import ClusterRun, describe_split
            from batchrun.distributed.worker import ShardSettings

            cluster = ClusterRun(
                job,
                plan,
                checkpoint.record,
                events,
                stop,
                to_send=to_send,
                width=width,
                settings=ShardSettings(url, options.simulate, width, options.grace_s, price, max_cost),
                spent_usd=spent,
            )
            describe = functools.partial(describe_split, options.ray, width)
        events.started(
            RunStarted(
                sum(before.values()) + to_send,
                before,
                cost_usd=None if price is None else spent,
                budget_usd=max_cost,
                status=describe,
                counted=None if counted.done() else counted,
                reused=lambda: plan.reused,
            )
        )
        if not options.fresh:
            counted.add_done_callback(functools.partial(_say_resuming, events, in_scope))
        if repriced and not options.fresh:
            events.say(f"pricing changed since the checkpoint was made: repriced {repriced} rows")
        if model_note:
            events.say(model_note, "note")
        if format_step:
            events.say(
                f"note: sending {describe_format(job.format_fallbacks[format_step])} for output.fields, "
                "as this endpoint took in an earlier run (a fresh run tries the others again)",
                "note",
            )
        if price is None:
            events.say(
                f"warning: no price known for model {spec.model!r}; cost_usd stays empty (null); "
                "set pricing: {input_per_million: ..., output_per_million: ...} to price it",
                "warning",
            )
        if max_cost is not None and output_tokens_cap(params) is None:
            events.say(
                f"warning: params.max_tokens is not set; the budget assumes up to "
                f"{ASSUMED_MAX_OUTPUT_TOKENS:,} output tokens per request",
                "warning",
            )
        if options.ray is None:
            stats, cancelled = await _run_to_the_end(core.run(), stop)
        else:
            from batchrun.distributed.driver import run_on_cluster

            stats, cancelled = await _run_to_the_end(run_on_cluster(cluster, options.ray), stop)
        if isinstance(stats.error, CheckpointError):  # nothing more can be recorded: no output
            raise stats.error
        await counted  # its figures are shown by now, and its error raised
        events.finished()
        await asyncio.to_thread(plan.finish)  # index the rows a stopped run did not reach
        # The summary's figures are summed as the output's rows are written (Tally); a dedupe
        # job's rows share results, so what they were billed is summed over the results instead.
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
            total=in_scope,
            ok=tally.by_status["ok"],
            failed=tally.by_status["failed"],
            skipped=tally.by_status["skipped"],
            pending=tally.by_status["pending"],
            prompt_tokens=tally.tokens("prompt_tokens"),
            completion_tokens=tally.tokens("completion_tokens"),
            failures_by_kind=tally.kinds(),
            retries=stats.retries,
            rate_limited=stats.rate_limited,
            wall_s=time.monotonic() - started,
            output_path=job.output_path,
            interrupted=stats.outcome == "interrupted",
            cost_usd=None if price is None else tally.cost_usd,
            budget_usd=max_cost,
            budget_stopped=stats.outcome == "stopped_by_budget",
            workers=None if options.ray is None else [vars(t) for t in cluster.tallies],
            requests=stats.requests,
            run_tokens=stats.tokens,
            report_path=job.report_path,
            rows_without_usage=tally.without_usage,
            top_errors=checkpoint.top_errors() if top_errors is None else top_errors,
            outcome=stats.outcome,
        )
        write_run_report(job, result, price, fingerprint, stats.error, tally.usage())
        checkpoint.end_run(stats.outcome, stats.requests, workers=len(result.workers or [None]))
        if stats.requests:
            await asyncio.to_thread(write_page_or_warn, job, events)
        if stats.error is not None:
            raise stats.error
        if cancelled:
            raise asyncio.CancelledError
        return result
    finally:
        if counted is not None and not counted.done():
            counted.cancel()  # the run ended before the count
        elif counted is not None and not counted.cancelled():
            counted.exception()  # retrieved: a failed count failed the run, or the run failed first
        if plan is not None:
            plan.close()  # a batch may still be keyed in a thread of its own: waits for it
        checkpoint.close()


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


def _say_resuming(
    events: Events, in_scope: int, counted: asyncio.Future[tuple[dict[str, int], float]]
) -> None:
    if (
        not counted.cancelled()
        and counted.exception() is None
        and (done := sum(counted.result()[0].values()))
    ):
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


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when installed: it cuts the loop's CPU per request (README, Speed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def api_key(endpoint: EndpointSpec) -> str:
    """The key, read from the environment at the last moment and never stored."""
    name = endpoint.api_key_env
    key = os.environ.get(name, "").strip()
    if not key:
        raise BatchrunError(
            f"{name} is not set: export your API key as {name}",
            remedy=Remedy("simulate", True, "to try the job offline"),
        )
    return key
