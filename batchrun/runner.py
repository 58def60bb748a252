"""The pipeline of one job: input rows → bounded queue → N workers → checkpoint → output table.

`prepare` does every check that can be done without the network; `run_job` runs the job and is
the one entry point for the CLI and for Python callers alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from batchrun.breaker import MAX_PROBE_S, Breaker, SameFailure
from batchrun.checkpoint import Checkpoint, RowResult, open_checkpoint
from batchrun.client import ChatClient, ChatResult
from batchrun.cost import (
    ASSUMED_MAX_OUTPUT_TOKENS,
    Price,
    job_price,
    output_tokens_cap,
    prompt_tokens_ceiling,
    request_cost,
)
from batchrun.errors import (
    BatchrunError,
    EndpointDown,
    EndpointUnavailable,
    InputError,
    InvalidOutput,
    JobAborted,
    JobError,
    PermanentError,
    RequestFailed,
    RetryableError,
)
from batchrun.job import EndpointSpec, JobSpec, table_format
from batchrun.limits import Limiter, Permit
from batchrun.models import check_model
from batchrun.output import build_table, write_table
from batchrun.progress import Progress
from batchrun.prompts import PromptTemplates, conversation, text_length
from batchrun.report import write_run_report
from batchrun.results import OUTPUT_RESULT_COLUMNS
from batchrun.simulator import SimulatorConfig, serve_in_thread
from batchrun.sources import ROW, Source, open_source
from batchrun.structured import format_fallbacks, read_fields, reask_growth, reask_messages

DONE = ("ok", "failed", "skipped")  # statuses a resume does not send again
SIMULATED_ENDPOINT = "simulator"  # what the fingerprint records for --simulate's changing port
# Rows refused even without a response_format, after which the format is no longer suspected:
# rows with other problems (a prompt too long) would otherwise each cost two requests more.
FORMAT_SUSPICIONS = 3
SAME_FAILURE_ANSWERS = 20  # this many first answers failing alike stop the job (JobAborted)
MIN_PROBE_S = 0.01  # the breaker's first probe interval when retry.initial_backoff_s is 0


@dataclass(frozen=True)
class RunOptions:
    """How to run a job; each field mirrors a CLI flag of `batchrun run`."""

    simulate: bool = False
    simulate_latency_ms: float = 0.0
    fresh: bool = False
    retry_failed: bool = False
    limit: int | None = None
    concurrency: int | None = None
    output: Path | None = None
    quiet: bool = False
    grace_s: float = 10.0  # after a stop request, how long in-flight requests may finish
    max_cost_usd: float | None = None  # overrides the job's budget.max_cost_usd
    rows: frozenset[int] | None = None  # only these rows (0-based), e.g. a random pilot


@dataclass(frozen=True)
class RunResult:
    total: int
    ok: int
    failed: int
    skipped: int
    pending: int
    prompt_tokens: int | None  # None: the endpoint reported no usage (rows_without_usage says for how many)
    completion_tokens: int | None
    failures_by_kind: dict[str, int]
    retries: dict[str, int]
    rate_limited: int  # answers that were 429s (each retried)
    wall_s: float
    output_path: Path
    interrupted: bool
    cost_usd: float | None = None  # the whole job's, earlier runs included; None if unpriced
    budget_usd: float | None = None
    budget_stopped: bool = False
    requests: int = 0  # sent by this run, retries included
    run_tokens: int | None = 0  # of the rows this run finished; None: no usage reported
    report_path: Path | None = None
    rows_without_usage: int = 0  # answered, but the endpoint reported no usage
    top_errors: list[tuple[str, int]] = field(default_factory=list)  # commonest messages of failed rows

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.budget_stopped:
            return 3
        return 1 if self.failed or self.pending else 0


@dataclass(frozen=True)
class PreparedJob:
    """A job whose spec, templates and input were all checked; nothing sent yet."""

    spec: JobSpec
    prompts: PromptTemplates
    source: Source
    output_path: Path

    @property
    def checkpoint_path(self) -> Path:
        return self.output_path.with_name(self.output_path.name + ".checkpoint.sqlite")

    @property
    def report_path(self) -> Path:
        return self.output_path.with_name(self.output_path.name + ".report.json")

    @property
    def estimate_path(self) -> Path:
        return self.output_path.with_name(self.output_path.name + ".estimate.json")

    def first_request(self) -> dict[str, Any]:
        row = next(self.source.batches(self.prompts.columns, limit=1))[0]
        return self.request_body(row)

    @functools.cached_property
    def params(self) -> dict[str, Any]:
        params = self.spec.params.body()
        if self.format_fallbacks:
            params["response_format"] = self.format_fallbacks[0]
        return params

    @functools.cached_property
    def format_fallbacks(self) -> tuple[dict[str, Any] | None, ...]:
        """The response_formats batchrun sends, in turn while the endpoint refuses them; none
        when the job uses tools or sets its own (which is never touched)."""
        fields = self.spec.output.fields
        if not fields or self.spec.params.tools or "response_format" in self.spec.params.body():
            return ()
        return format_fallbacks(fields)

    @functools.cached_property
    def output_cap(self) -> tuple[str, int] | None:
        """The params key that caps an answer's tokens, and its value, if the job sets one."""
        for key in ("max_completion_tokens", "max_tokens"):
            if isinstance(value := self.params.get(key), int):
                return key, value
        return None

    def request_body(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.spec.model, "messages": self.prompts.messages(row), **self.params}

    def fingerprint(self, simulate: bool) -> dict[str, Any]:
        """What decides a row's answer; a checkpoint is reused only while all of it holds."""
        spec = self.spec
        return {
            "prompt": spec.prompt.model_dump(mode="json", exclude_none=True),
            "model": spec.model,
            "params": self.params,
            "endpoint.base_url": SIMULATED_ENDPOINT if simulate else spec.endpoint.base_url,
            "input": {
                "sha256": self.source.fingerprint(),
                "id_column": self.source.id_column,
                "messages_column": spec.input.messages_column,
            },
            "output.fields": spec.output.model_dump(mode="json")["fields"],
        }


def prepare(spec: JobSpec, output: Path | None = None, write: bool = True) -> PreparedJob:
    """Check everything that can fail before a request is sent; `write=False` for commands that
    only read the checkpoint, so they work in a folder they cannot write."""
    prompts = spec.prompt_templates()
    output_path = (output or spec.output.path).resolve()
    if output_path == spec.input.path.resolve():
        raise JobError("output.path is the input file; choose another path", spec.job_path)
    _check_output_folder(output_path, "--output" if output else "output.path", spec, write)
    if output is not None:  # the job's own output.path was checked with the job
        try:
            table_format(output_path, spec.output.format, "--output", "output.format")
        except ValueError as exc:
            raise JobError(str(exc)) from None
    clash = [c for c in spec.output.include_columns if c in OUTPUT_RESULT_COLUMNS]
    if clash:
        raise JobError(
            f"output.include_columns: '{clash[0]}' is also a result column; rename it in the input",
            spec.job_path,
        )
    taken = {"id", *OUTPUT_RESULT_COLUMNS, *spec.output.include_columns}
    if clash := [name for name in spec.output.fields if name in taken]:
        raise JobError(
            f"output.fields: '{clash[0]}' is also an output column (result or included); rename the field",
            spec.job_path,
        )
    needed = {"output.include_columns": spec.output.include_columns, **prompts.needed()}
    no_nulls = prompts.columns if spec.input.on_null == "error" else ()
    source = open_source(spec.input.path, spec.input.id_column, needed, no_nulls, spec.input.format)
    if prompts.messages_column:
        _check_conversations(source, prompts.messages_column, skip_nulls=spec.input.on_null == "skip")
    job = PreparedJob(spec, prompts, source, output_path)
    job.first_request()
    return job


def _check_output_folder(path: Path, key: str, spec: JobSpec, write: bool) -> None:
    """The output must go in a folder (made if missing, as the run does) we may write to. Writing
    is tested by creating a file: the only test true for root and for immutable folders."""
    job_path = spec.job_path if key == "output.path" else None
    if path.is_dir():
        raise JobError(f"{key} {path} is a folder; name a file in it", job_path)
    folder = path.parent
    while not folder.exists():  # the nearest existing ancestor: where a missing folder is made
        folder = folder.parent
    if not folder.is_dir():
        raise JobError(f"{key} {path}: {folder} is a file, not a directory", job_path)
    if write:
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".batchrun-write-test-"):
                pass
        except OSError as exc:
            raise JobError(
                f"{key} {path}: the folder {folder} is not writable ({exc.strerror or exc})", job_path
            ) from None


def _check_conversations(source: Source, column: str, skip_nulls: bool) -> None:
    """Every row's messages must parse before the first is sent: one bad row stops the job here."""
    for batch in source.batches((column,), limit=None):
        for row in batch:
            if row[column] is None and skip_nulls:
                continue
            try:
                conversation(row[column])
            except ValueError as exc:
                raise InputError(
                    f"input.messages_column '{column}', row {row[ROW] + 1} of {source.path.name}: {exc}"
                ) from None


def run_job(spec: JobSpec, options: RunOptions = RunOptions()) -> RunResult:
    """Run (or resume) a job to the end, or until interrupted; write the output table."""
    job = prepare(spec, options.output)
    started = time.monotonic()
    key = "simulated" if options.simulate else api_key(spec.endpoint)
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
    model_note = None if options.simulate else check_model(spec, spec.endpoint.base_url, key)
    fingerprint = job.fingerprint(options.simulate)  # hashes the whole input: once per run
    checkpoint = open_checkpoint(job.checkpoint_path, "fresh" if options.fresh else "resume", fingerprint)
    try:
        repriced = checkpoint.reprice(repr(price), functools.partial(request_cost, price))
        spent = checkpoint.spent_usd()
        in_scope = min(options.limit or job.source.row_count, job.source.row_count)
        finished = {r for r in checkpoint.rows_with_status(*DONE) if r < in_scope}
        only: set[int] | None = None  # with --retry-failed, only the failed rows go out again
        if options.retry_failed:
            only = {r for r in checkpoint.rows_with_status("failed") if r < in_scope}
            to_send = len(only)
        elif options.rows is not None:
            only = {r for r in options.rows if r < in_scope} - finished
            to_send = len(only)
        else:
            to_send = in_scope - len(finished)
        before = checkpoint.status_counts(below=in_scope)
        if options.retry_failed:
            before["failed"] = 0  # sent again: each counts once it finishes anew
        progress = Progress(
            sum(before.values()) + to_send,
            before,
            options.quiet,
            cost_usd=None if price is None else spent,
            budget_usd=max_cost,
        )
        if finished and not options.fresh:
            progress.say(f"resuming: {len(finished)} of {in_scope} rows already done")
        if repriced and not options.fresh:
            progress.say(f"pricing changed since the checkpoint was made: repriced {repriced} rows")
        budget = None if max_cost is None else BudgetGuard(max_cost, spent_usd=spent)
        with _endpoint(spec, options) as base_url:
            try:
                if model_note:
                    progress.say(model_note)
                if price is None:
                    progress.say(
                        f"warning: no price known for model {spec.model!r}; cost_usd stays empty (null); "
                        "set pricing: {input_per_million: ..., output_per_million: ...} to price it"
                    )
                if budget is not None and output_tokens_cap(job.params) is None:
                    progress.say(
                        f"warning: params.max_tokens is not set; the budget assumes up to "
                        f"{ASSUMED_MAX_OUTPUT_TOKENS:,} output tokens per request"
                    )
                client = ChatClient(
                    base_url, key, spec.endpoint.timeout_s, options.concurrency or spec.concurrency
                )
                pipeline = _Pipeline(
                    job,
                    client,
                    checkpoint,
                    progress,
                    options,
                    finished,
                    only,
                    price,
                    budget,
                    base_url=base_url,
                )
                run_async(pipeline.run())
            finally:
                progress.close()
        if pipeline.unreachable:  # nothing was answered: no output, the checkpoint as it was
            assert pipeline.aborted is not None
            raise pipeline.aborted
        table = build_table(
            job.source, spec.output.include_columns, checkpoint.results(), options.limit, spec.output.fields
        )
        write_table(table, job.output_path, spec.output.format)
        totals = checkpoint.totals()
        counts = table["status"].value_counts()
        by_status = dict(zip(counts["status"].to_list(), counts["count"].to_list(), strict=True))
        result = RunResult(
            total=in_scope,
            ok=by_status.get("ok", 0),
            failed=by_status.get("failed", 0),
            skipped=by_status.get("skipped", 0),
            pending=by_status.get("pending", 0),
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            failures_by_kind=checkpoint.failures_by_kind(),
            retries=dict(pipeline.retries),
            rate_limited=pipeline.limiter.rate_limited,
            wall_s=time.monotonic() - started,
            output_path=job.output_path,
            interrupted=pipeline.interrupted,
            cost_usd=None if price is None else checkpoint.spent_usd(),
            budget_usd=max_cost,
            budget_stopped=pipeline.budget_stopped,
            requests=pipeline.requests,
            run_tokens=progress.run_tokens,
            report_path=job.report_path,
            rows_without_usage=totals.without_usage,
            top_errors=checkpoint.top_errors(),
        )
        write_run_report(job, result, table, price, fingerprint, pipeline.aborted)
        if pipeline.aborted is not None:
            raise pipeline.aborted
        return result
    finally:
        checkpoint.close()


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when installed: it cuts the loop's CPU per request (README, Speed)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def api_key(endpoint: EndpointSpec) -> str:
    """The key, read from the environment at the last moment and never stored."""
    name = endpoint.api_key_env
    key = os.environ.get(name, "").strip()
    if not key:
        raise BatchrunError(
            f"{name} is not set: export your API key as {name}, or try the job offline with --simulate"
        )
    return key


@contextlib.contextmanager
def _endpoint(spec: JobSpec, options: RunOptions) -> Iterator[str]:
    """The base URL to send to: the job's, or an in-process simulator's on a free port."""
    if not options.simulate:
        yield spec.endpoint.base_url
        return
    config = SimulatorConfig(latency_ms=options.simulate_latency_ms, extra_models=(spec.model,))
    with serve_in_thread(config) as sim:
        yield sim.base_url


def _refuses(exc: RequestFailed) -> bool:
    """An answer that may refuse a parameter: a 500, or a 4xx that is not a retryable one."""
    return isinstance(exc, PermanentError) or exc.status == 500


def _set_format(body: dict[str, Any], response_format: dict[str, Any] | None) -> None:
    if response_format is None:
        body.pop("response_format", None)
    else:
        body["response_format"] = response_format


def _skipped(row: int, row_id: str, empty: list[str]) -> RowResult:
    reason = f"empty column(s) {', '.join(empty)}; not sent (input.on_null: skip)"
    return RowResult(row, row_id, "skipped", error_kind="null_value", error=reason)


def _row_result(
    request: _Request,
    answers: list[ChatResult],
    attempts: int,
    latency_ms: float,
    price: Price | None,
    job_model: str,
    fields: dict[str, Any] | None = None,
    error: RequestFailed | None = None,
) -> RowResult:
    """The row's record: the last answer kept (even a failed one's), tokens and cost summed over
    every billed answer, since re-asking for fields is paid for too; each answer is priced at its
    own prompt's tier, and requests that got no answer are not billed."""
    last = answers[-1] if answers else ChatResult(None, None, None, None, None, None, None)

    def total(name: str) -> int | None:
        counts = [getattr(a, name) for a in answers]
        return None if not counts or None in counts else sum(counts)

    costs = [
        request_cost(price, a.prompt_tokens, a.completion_tokens, a.total_tokens, a.cached_tokens)
        for a in answers
    ]

    return RowResult(
        request.row,
        request.id,
        "failed" if error else "ok",
        content=last.content,
        tool_calls=_tool_calls_json(last.tool_calls) if last.tool_calls else None,
        fields=orjson.dumps(fields).decode() if fields is not None else None,
        finish_reason=last.finish_reason,
        prompt_tokens=total("prompt_tokens"),
        completion_tokens=total("completion_tokens"),
        total_tokens=total("total_tokens"),
        cached_tokens=total("cached_tokens"),
        reasoning_tokens=total("reasoning_tokens"),
        cost_usd=None if None in costs else sum(c or 0.0 for c in costs),
        error_kind=error.kind if error else None,
        error=str(error) if error else None,
        attempts=attempts,
        latency_ms=round(latency_ms, 1),
        model=last.model or job_model,  # as asked, when no answer says: reports group by it
        response_id=last.response_id,
        ttft_ms=last.ttft_ms,
    )


def _tool_calls_json(calls: list[dict[str, str]]) -> str:
    """[{id, name, arguments}] with arguments decoded when they are JSON, as sent otherwise."""
    readable = []
    for call in calls:
        try:
            arguments: Any = orjson.loads(call["arguments"])
        except orjson.JSONDecodeError:
            arguments = call["arguments"]
        readable.append({**call, "arguments": arguments})
    return orjson.dumps(readable).decode()


class _WaitRetryAfter(wait_base):
    """Wait what the server asked for (Retry-After), else exponential backoff with full jitter."""

    def __init__(self, initial_s: float, max_s: float):
        self._max_s = max_s
        self._backoff = wait_random_exponential(multiplier=initial_s, max=max_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RetryableError) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self._max_s)
        return float(self._backoff(retry_state))


@dataclass(slots=True)
class _Request:
    row: int
    id: str
    body: dict[str, Any]
    chars: int  # prompt characters, for the limiter's token estimate
    attempts: int = 0
    outage_attempts: int = 0  # attempts an outage took, not counted against retry.max_attempts
    latency_ms: float = 0.0  # of the last attempt


@dataclass
class _Pipeline:
    job: PreparedJob
    client: ChatClient
    checkpoint: Checkpoint
    progress: Progress
    options: RunOptions
    skip: set[int]  # rows already finished
    only: set[int] | None  # with --retry-failed: the rows to send again
    price: Price | None = None
    budget: BudgetGuard | None = None
    interrupted: bool = False
    budget_stopped: bool = False
    requests: int = 0
    aborted: BatchrunError | None = None
    retries: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    warned_no_usage: bool = False
    last_error: str | None = None
    format_step: int = 0  # how far down job.format_fallbacks the endpoint's refusals have led
    format_cleared: int = 0  # rows refused without a format too: not the format's fault
    base_url: str = ""
    ever_answered: bool = False  # any HTTP answer, even an error: the endpoint can be reached
    unreachable: bool = False  # stopped before any answer: no output is written
    doomed: bool = False  # the first answers all failed alike (SameFailure)

    def __post_init__(self) -> None:
        spec = self.job.spec
        params = self.job.params
        self.limiter = Limiter(
            self._width,
            spec.rate_limit.requests_per_minute,
            spec.rate_limit.tokens_per_minute,
            max_tokens=params.get("max_completion_tokens", params.get("max_tokens")),
            max_hold_s=spec.retry.max_backoff_s,
        )
        retry = spec.retry
        self.breaker = Breaker(
            threshold=max(10, self._width),
            first_probe_s=max(retry.initial_backoff_s, MIN_PROBE_S),
            max_outage_s=retry.max_outage_s,
            max_probe_s=min(MAX_PROBE_S, retry.max_backoff_s),
        )
        self._breaker_changed = asyncio.Event()
        self._down_streak: list[_Request] = []  # rows whose attempts failed in the current run of failures
        self._last_down: EndpointDown | None = None
        self.same_failure = SameFailure(SAME_FAILURE_ANSWERS)
        self._held: list[RowResult] = []  # failed rows kept back while the first answers may doom the job
        self.progress.status = self._status

    async def run(self) -> None:
        spec = self.job.spec
        self._stop = asyncio.Event()
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue(maxsize=self._width * 2)
        self._results: asyncio.Queue[RowResult | None] = asyncio.Queue()
        backoff = _WaitRetryAfter(spec.retry.initial_backoff_s, spec.retry.max_backoff_s)
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(spec.retry.max_attempts),  # replaced per row in _retry
            # While the breaker is open, the wait is for the next probe (in _attempt), not a backoff.
            wait=lambda state: 0.0 if self.breaker.is_open else backoff(state),
            retry=retry_if_exception_type(RetryableError),
            before_sleep=self._count_retry,
            reraise=True,
        )
        self._install_signal_handlers()
        async with self.client:
            producer = asyncio.create_task(self._produce())
            workers = [asyncio.create_task(self._work()) for _ in range(self._width)]
            writer = asyncio.create_task(self._write())
            watchdog = asyncio.create_task(self._watch_for_stalls())
            # asyncio.wait, not gather: worker errors are read below, never left unretrieved.
            all_work = asyncio.create_task(asyncio.wait(workers))
            stop_requested = asyncio.create_task(self._stop.wait())
            await asyncio.wait({all_work, stop_requested, writer}, return_when=asyncio.FIRST_COMPLETED)
            if not all_work.done():
                await self._wind_down(producer, workers, all_work, at_once=writer.done())
            stop_requested.cancel()
            watchdog.cancel()
            if not self.doomed:
                self._release_held()
            self._results.put_nowait(None)
            await writer
            for task in workers:  # a bug in a worker surfaces here, after the checkpoint is flushed
                if not task.cancelled() and (error := task.exception()) is not None:
                    raise error

    @property
    def _width(self) -> int:
        return self.options.concurrency or self.job.spec.concurrency

    async def _produce(self) -> None:
        """Feed rows still to do; the bounded queue keeps memory flat however long the input."""
        columns = prompt_columns = self.job.prompts.columns
        if self.job.source.id_column and self.job.source.id_column not in columns:
            columns += (self.job.source.id_column,)
        batches = self.job.source.batches(columns, self.options.limit)
        id_column = self.job.source.id_column
        skip_nulls = self.job.spec.input.on_null == "skip"
        while (batch := await asyncio.to_thread(next, batches, None)) is not None:
            for row in batch:
                index = row[ROW]
                wanted = index not in self.skip if self.only is None else index in self.only
                if not wanted:
                    continue
                row_id = str(row[id_column]) if id_column else str(index)
                if skip_nulls and (empty := [c for c in prompt_columns if row[c] is None]):
                    self._results.put_nowait(_skipped(index, row_id, empty))
                    continue
                body = self.job.request_body(row)
                await self._queue.put(_Request(index, row_id, body, text_length(body["messages"])))
        for _ in range(self._width):
            await self._queue.put(None)

    async def _work(self) -> None:
        while (request := await self._queue.get()) is not None:
            worst = self._worst_cost(request) if self.budget is not None else 0.0
            if self.budget is not None and not self.budget.reserve(worst):
                self._stop_for_budget()
                return
            try:
                result = await self._send(request)
            except BatchrunError as exc:  # not a row's failure (those are results): the job stops
                self.aborted = self.aborted or exc
                self._stop.set()
                return
            if self.budget is not None:
                self.budget.settle(worst, result.cost_usd)
            if result.status == "failed" and self.same_failure.undecided:
                self._held.append(result)  # recorded once the job is known not to be doomed
            else:
                self._results.put_nowait(result)

    def _release_held(self) -> None:
        for result in self._held:
            self._results.put_nowait(result)
        self._held.clear()

    def _worst_cost(self, request: _Request) -> float:
        """The most this row can cost: a prompt-size ceiling and a full-length answer, for each
        answer it may be asked for (re-asks for output.fields are billed too, and longer)."""
        assert self.price is not None  # run_job refuses a budget without a price
        spec = self.job.spec
        output = output_tokens_cap(self.job.params) or ASSUMED_MAX_OUTPUT_TOKENS
        prompt = prompt_tokens_ceiling(request.body)
        if not spec.output.fields:
            return self.price.cost(prompt, 0, output)
        growth = output + reask_growth()  # each re-ask quotes the answer before it and says why
        asks = range(spec.retry.max_parse_attempts)
        return sum(self.price.cost(prompt + asked * growth, 0, output) for asked in asks)

    def _stop_for_budget(self) -> None:
        if self.budget_stopped:
            return
        assert self.budget is not None
        self.budget_stopped = True
        self.progress.say(
            f"budget: ${self.budget.spent_usd:.4f} spent of ${self.budget.limit_usd:g}; the next request "
            f"could exceed it: sending no more, finishing {self.in_flight} in flight"
        )
        self._stop.set()

    async def _send(self, request: _Request) -> RowResult:
        """One row through retries, and re-asks while its answer lacks output.fields, to a result;
        JobAborted passes through."""
        spec = self.job.spec
        answers: list[ChatResult] = []  # every billed answer, for the row's token counts
        parsed: dict[str, Any] | None = None
        error: RequestFailed | None = None
        question = request.body["messages"]
        self.in_flight += 1
        try:
            for asked in range(1, spec.retry.max_parse_attempts + 1):
                try:
                    answer = await self._ask(request)
                except RetryableError as first_failure:
                    answer = await self._retry(request, first_failure)
                answers.append(answer)
                if not spec.output.fields:
                    break
                try:
                    parsed = read_fields(
                        spec.output.fields, answer, bool(spec.params.tools), self.job.output_cap
                    )
                    break
                except InvalidOutput as exc:
                    if asked == spec.retry.max_parse_attempts:
                        raise
                    self._count(exc)
                    # The correction is this attempt's only: the row's question stays the same.
                    messages = [
                        *question,
                        *reask_messages(answer, exc, bool(spec.params.tools), self.job.output_cap),
                    ]
                    request.body = {**request.body, "messages": messages}
                    request.chars = text_length(messages)
        except RequestFailed as exc:
            error = exc
        finally:
            self.in_flight -= 1
        if any(a.total_tokens is None for a in answers) and not self.warned_no_usage:
            self.warned_no_usage = True
            self.progress.say(
                "warning: the endpoint sent no token usage; token columns and cost_usd stay empty "
                "(null) for such rows"
                + (", and the budget counts each at its worst case" if self.budget is not None else "")
            )
        return _row_result(
            request, answers, request.attempts, request.latency_ms, self.price, spec.model, parsed, error
        )

    async def _ask(self, request: _Request) -> ChatResult:
        """One attempt; when the endpoint refuses the response_format batchrun added, the same
        request again with the next fallback, which the whole job keeps once it is answered.

        A refusal is a 4xx other than 408/409/429 (401/402/403/404 abort the job before this), or
        a 500 (llama.cpp's server answers json_schema so). When even the request without a format
        is refused, the format was not the cause: the row fails as it would have, and after a few
        such rows the format is no longer suspected. Rows in flight with a format given up in the
        meantime are sent again with the current one.
        """
        fallbacks = self.job.format_fallbacks
        step = self.format_step
        refusal: RequestFailed | None = None  # the first, while fallbacks are tried
        while True:
            if fallbacks:
                _set_format(request.body, fallbacks[step])
            try:
                answer = await self._attempt(request)
            except RequestFailed as exc:
                if not fallbacks or not _refuses(exc) or self.format_cleared >= FORMAT_SUSPICIONS:
                    self._failed_alike(exc)
                    raise
                if refusal is None and step < self.format_step:  # another row found the fallback
                    step = self.format_step
                    continue
                refusal = refusal or exc
                if step + 1 == len(fallbacks):
                    self.format_cleared += 1
                    self._failed_alike(refusal)
                    raise refusal from None
                step += 1
                continue
            if step > self.format_step:
                self._give_up_format(step, refusal)
            if self.same_failure.undecided:
                self._see_answer(None)
            return answer

    def _give_up_format(self, step: int, refusal: RequestFailed | None) -> None:
        """Send the fallback at `step` from now on, and say so once."""
        self.format_step = step
        now = self.job.format_fallbacks[step]
        instead = (
            f"sending response_format {orjson.dumps(now).decode()} instead"
            if now is not None
            else "sending none"
        )
        self.progress.say(
            f"warning: the endpoint refused the response_format batchrun adds for output.fields "
            f"({refusal}); {instead} for the rest of the job (the fields are still read from each "
            "answer and checked)"
        )

    async def _retry(self, request: _Request, first_failure: RetryableError) -> ChatResult:
        """Attempts after a first failure, by the retry policy (wait, stop, counting).

        The first attempt is made outside tenacity, whose machinery costs ~25 µs per row even
        when nothing fails; its failure is raised again here as tenacity's attempt 1.
        """
        failure: RetryableError | None = first_failure
        max_attempts = self.job.spec.retry.max_attempts
        # Attempts an outage took (see _no_answer) do not count against the row.
        retrying = self._retrying.copy(
            stop=lambda _: request.attempts - request.outage_attempts >= max_attempts
        )
        async for attempt in retrying:
            with attempt:
                if failure is not None:
                    error, failure = failure, None
                    raise error
                return await self._ask(request)
        raise AssertionError("unreachable: the retry policy re-raises the last failure")

    async def _attempt(self, request: _Request) -> ChatResult:
        """One request, past the breaker, admitted by the limiter and reported back to both."""
        probe = await self._through_breaker()
        request.attempts += 1
        self.requests += 1
        permit = await self.limiter.acquire(request.chars)
        sent = time.perf_counter()
        try:
            answer = await self.client.complete(request.body)
        except BaseException as exc:
            self._report_failure(permit, exc)
            if isinstance(exc, RequestFailed):
                self._judge(request, exc, probe)
            raise
        finally:
            request.latency_ms = (time.perf_counter() - sent) * 1000
        self.limiter.release(
            permit,
            ok=True,
            budget=answer.budget,
            prompt_tokens=answer.prompt_tokens,
            total_tokens=answer.total_tokens,
        )
        self._answered()
        return answer

    async def _through_breaker(self) -> bool:
        """Hold while the breaker is open; True if this attempt goes out as its probe."""
        breaker = self.breaker
        while breaker.is_open:
            if breaker.expired:
                raise self._outage_too_long()
            if breaker.try_probe():
                self.progress.refresh_status()
                return True
            changed = self._breaker_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), breaker.wait_s())
        return False

    def _judge(self, request: _Request, exc: RequestFailed, probe: bool) -> None:
        """What a failed attempt says about the job: an outage, or a quota longer than one."""
        if isinstance(exc, EndpointDown):
            self.ever_answered = self.ever_answered or exc.status is not None
            self._no_answer(request, exc, probe)
            return
        self._answered()
        max_outage_s = self.job.spec.retry.max_outage_s
        if exc.status == 429 and exc.retry_after_s is not None and exc.retry_after_s > max_outage_s:
            raise EndpointUnavailable(
                f"{self.base_url} asks to wait {exc.retry_after_s:,.0f} s (HTTP 429 Retry-After), longer "
                f"than retry.max_outage_s ({max_outage_s:g} s), a quota for the day?; the checkpoint is "
                "kept: rerun later",
                self.base_url,
            )

    def _failed_alike(self, exc: RequestFailed) -> None:
        """Count a failure that left _ask (which cures refusals of a parameter batchrun added) for
        the every-row-fails-alike check; 408, 409, 429, outages and unreadable bodies neither doom
        the job nor clear the check."""
        if (isinstance(exc, PermanentError) or exc.status == 500) and self.same_failure.undecided:
            assert exc.status is not None
            self._see_answer((exc.status, str(exc)))

    def _see_answer(self, failure: tuple[int, str] | None) -> None:
        """Count one of the first answers; stop the job when they all failed alike."""
        if failure is not None and self.same_failure.answer(failure):
            self.doomed = True  # the rows held back stay pending: they were never the problem
            raise JobAborted(
                f"the first {self.same_failure.seen} answers were all the same error, so every row "
                f"would fail: {failure[1]}; fix the job or the endpoint and rerun (the checkpoint is kept)"
            )
        if failure is None:
            self.same_failure.answer(None)
        if not self.same_failure.undecided:
            self._release_held()

    def _answered(self) -> None:
        """The endpoint answered: whatever ran of failures without an answer is over."""
        self.ever_answered = True
        if not self.breaker.failures:  # the common case, on every answer: nothing to do
            return
        self._down_streak.clear()
        outage_s = time.monotonic() - self.breaker.down_since
        if self.breaker.answered():
            self.progress.say(f"endpoint answered again after {outage_s:.1f} s; resuming")
            self._wake_held()

    def _no_answer(self, request: _Request, exc: EndpointDown, probe: bool) -> None:
        """An attempt got no answer: evidence for the breaker. The attempts that open it, and
        every one made while it is open, are the outage's, not the rows'."""
        if not self.ever_answered and exc.status is None:
            self._unreachable(exc)
        self._last_down = exc
        opened = self.breaker.failed(probe)
        if opened:
            for row in self._down_streak:
                row.outage_attempts += 1
            self._down_streak.clear()
            request.outage_attempts += 1
            since = time.strftime("%H:%M:%S", time.localtime(self.breaker.down_since_wall))
            self.progress.say(
                f"endpoint down since {since}: {self.breaker.failures} requests in a row got no answer "
                f"(last: {exc}); holding every row and probing with one, for up to "
                f"retry.max_outage_s ({self.breaker.max_outage_s:g} s)"
            )
            self._wake_held()
        elif self.breaker.is_open:
            request.outage_attempts += 1
            if probe:
                self._wake_held()
        else:
            self._down_streak.append(request)

    def _wake_held(self) -> None:
        """The breaker changed: held attempts look again (probe, resume, or give up)."""
        self._breaker_changed.set()
        self._breaker_changed = asyncio.Event()
        self.progress.refresh_status()

    def _unreachable(self, exc: EndpointDown) -> None:
        """No answer before any answer at all: stop now, before any row is recorded."""
        self.unreachable = True
        message = f"cannot reach {self.base_url}: {exc.what_happened}"
        if exc.config_problem:  # DNS, TLS: waiting will not cure it
            raise BatchrunError(message)
        raise EndpointUnavailable(message, self.base_url)

    def _outage_too_long(self) -> EndpointUnavailable:
        since = time.strftime("%H:%M:%S", time.localtime(self.breaker.down_since_wall))
        last = f" (last: {self._last_down})" if self._last_down else ""
        return EndpointUnavailable(
            f"{self.base_url} has not answered since {since}{last}, longer than retry.max_outage_s "
            f"({self.breaker.max_outage_s:g} s); the checkpoint is kept: rerun later",
            self.base_url,
        )

    def _status(self) -> str:
        return self.breaker.describe() if self.breaker.is_open else self.limiter.describe()

    def _report_failure(self, permit: Permit, exc: BaseException) -> None:
        """Tell the limiter how an attempt failed: a 429 holds everyone, headers teach the budget."""
        if isinstance(exc, RequestFailed):
            self.limiter.release(
                permit,
                ok=False,
                budget=exc.budget,
                rate_limited=exc.status == 429,
                retry_after_s=exc.retry_after_s,
            )
        else:
            self.limiter.release(permit, ok=False)

    def _count_retry(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        self._count(exc)

    def _count(self, exc: BaseException | None) -> None:
        self.retries[exc.kind if isinstance(exc, RequestFailed) else "other"] += 1
        self.last_error = str(exc)

    async def _watch_for_stalls(self) -> None:
        """Say so when nothing has finished for a while: a hang must never pass silently."""
        quiet_s = self.job.spec.stall_warning_s
        while True:
            seen = self.progress.done
            await asyncio.sleep(quiet_s)
            if self.progress.done == seen and self.in_flight and not self.breaker.is_open:
                self.progress.say(
                    f"warning: no row finished in the last {quiet_s:g} s; {self.in_flight} "
                    f"request(s) in flight; last error: {self.last_error or 'none'}"
                )

    async def _write(self) -> None:
        """Group commit: everything finished since the last commit goes in one transaction."""
        while True:
            batch = [await self._results.get()]
            while not self._results.empty():
                batch.append(self._results.get_nowait())
            finished = [r for r in batch if r is not None]
            if finished:
                self.checkpoint.record(finished)
                for result in finished:
                    self.progress.row_finished(result)
            if len(finished) < len(batch):
                return

    async def _wind_down(
        self,
        producer: asyncio.Task[None],
        workers: list[asyncio.Task[None]],
        all_work: asyncio.Task[Any],
        at_once: bool,
    ) -> None:
        """Stop sending; let in-flight rows finish within the grace period, then cancel them."""
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        while not self._queue.empty():
            self._queue.get_nowait()
        for _ in workers:
            self._queue.put_nowait(None)
        grace: float | None = self.options.grace_s
        if at_once or self.aborted is not None:
            grace = 0.0
        elif self.budget_stopped and not self.interrupted:
            grace = None  # requests in flight are paid for: wait for their answers
        try:
            await asyncio.wait_for(asyncio.shield(all_work), timeout=grace)
        except TimeoutError:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
        except (RuntimeError, ValueError):  # not the main thread: the caller handles signals
            pass

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.interrupted:
            print(
                "batchrun: stopped at once; the checkpoint is consistent, rerun to resume",
                file=sys.stderr,
                flush=True,
            )
            os._exit(130)
        self.interrupted = True
        self.progress.say(
            f"batchrun: {sig.name} received: finishing in-flight requests "
            f"(up to {self.options.grace_s:g} s; press Ctrl-C again to stop at once)"
        )
        self._stop.set()


@dataclass
class BudgetGuard:
    """Spending against a budget: a request goes out only if its worst case still fits.

    Each request in flight holds its worst-case cost until its real cost is known, so the
    requests in flight together cannot push spending past the limit. Once one request is
    refused, every later one is too: the job stops rather than picking cheaper rows.
    """

    limit_usd: float
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    stopped: bool = False

    def reserve(self, worst_usd: float) -> bool:
        if self.stopped or self.spent_usd + self.reserved_usd + worst_usd > self.limit_usd:
            self.stopped = True
            return False
        self.reserved_usd += worst_usd
        return True

    def settle(self, reserved_usd: float, cost_usd: float | None) -> None:
        """Turn a reservation into spending: the real cost, or, when it is unknown (answers
        without usage, as llama.cpp's streams), all of the reservation, or it would never stop."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
        self.spent_usd += reserved_usd if cost_usd is None else cost_usd
