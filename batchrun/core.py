"""The async run of a prepared job: rows -> bounded queue -> N workers -> results -> checkpoint.

`Core` takes a job (PreparedJob), the rows to send (an async iterable of plan.Planned), a client,
a limiter, a `record` callable that makes batches of finished rows durable (the checkpoint's
`record`; each row carries the requests sent for it, RowResult.tries) and a budget, and returns
RunStats, a value describing the run. Progress, warnings and notes leave it as events
(events.py). It installs no signal handlers, prints nothing, never exits, never starts an event
loop: the drivers (cli.py, api.py) do those their own way, and ask it to stop through `Stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import orjson
from tenacity import RetryCallState

from batchrun.answers import ChatResult
from batchrun.breaker import MAX_PROBE_S, Breaker, SameFailure
from batchrun.budget import BudgetGuard
from batchrun.cost import (
    ASSUMED_MAX_OUTPUT_TOKENS,
    Price,
    image_tokens_ceiling,
    output_tokens_cap,
    prompt_tokens_ceiling,
    request_cost,
)
from batchrun.errors import (
    BatchrunError,
    EndpointDown,
    EndpointUnavailable,
    InvalidOutput,
    JobAborted,
    PermanentError,
    RequestFailed,
    RetryableError,
    RowInputError,
)
from batchrun.events import Events
from batchrun.job import FieldType, RetrySpec
from batchrun.limits import Limiter, Permit
from batchrun.plan import Planned, PreparedJob
from batchrun.prompts import text_length
from batchrun.results import Attempt, RowResult, RowStatus, RowTally
from batchrun.retry import Sleep, row_policy
from batchrun.structured import describe_format, read_fields, reask_growth, reask_messages

# Rows refused even without a response_format, after which the format is no longer suspected:
# rows with other problems (a prompt too long) would otherwise each cost two requests more.
FORMAT_SUSPICIONS = 3
SAME_FAILURE_ANSWERS = 20  # this many first answers failing alike stop the job (JobAborted)
MIN_PROBE_S = 0.01  # the breaker's first probe interval when retry.initial_backoff_s is 0

Outcome = Literal["finished", "interrupted", "stopped_by_budget", "aborted"]


@dataclass(frozen=True)
class RunStats:
    """What one run of the core did (rows it finished, not the job's earlier ones)."""

    ok: int
    failed: int
    skipped: int
    tokens: int | None  # of the rows this run finished; None: answers came, none reported usage
    rows_without_usage: int
    cost_usd: float  # of the rows this run finished, where priced
    retries: dict[str, int]
    rate_limited: int  # answers that were 429s (each retried)
    requests: int  # sent, retries included
    outcome: Outcome
    error: BatchrunError | None = None  # why the job stopped, when aborted

    @classmethod
    def of(
        cls,
        tally: RowTally,
        retries: dict[str, int],
        rate_limited: int,
        requests: int,
        outcome: Outcome,
        error: BatchrunError | None,
    ) -> RunStats:
        """A run's figures from its finished rows (`tally`) and what it sent."""
        return cls(
            ok=tally.by_status[RowStatus.OK],
            failed=tally.by_status[RowStatus.FAILED],
            skipped=tally.by_status[RowStatus.SKIPPED],
            tokens=tally.known_tokens,
            rows_without_usage=tally.without_usage,
            cost_usd=tally.cost_usd,
            retries=retries,
            rate_limited=rate_limited,
            requests=requests,
            outcome=outcome,
            error=error,
        )


class Stop:
    """A request to stop a run, made from outside it: a signal handler, another thread, a
    cancelled task. The first asks to stop sending and let in-flight rows finish within the grace
    period; a second, to stop at once. Safe to call from any thread."""

    def __init__(self) -> None:
        self.requests = 0
        self._notify: Callable[[], None] | None = None

    def request(self) -> int:
        """Ask once more; returns how many times it was asked."""
        self.requests += 1
        notify = self._notify  # read once: the run may stop watching in between
        if notify is not None:
            notify()
        return self.requests

    def watch(self, on_request: Callable[[], None]) -> None:
        """Call `on_request` on the running loop at each request from now on (and at once for one
        made before), until `unwatch`."""
        loop = asyncio.get_running_loop()

        def notify() -> None:
            # A request that comes as the run ends may find its loop closed: nothing left to stop.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_request)

        self._notify = notify
        if self.requests:
            on_request()

    def unwatch(self) -> None:
        self._notify = None


def _refuses(exc: RequestFailed) -> bool:
    """An answer that may refuse a parameter: a 500, or a 4xx that is not a retryable one."""
    return isinstance(exc, PermanentError) or exc.status == 500


def _set_format(body: dict[str, Any], response_format: dict[str, Any] | None) -> None:
    if response_format is None:
        body.pop("response_format", None)
    else:
        body["response_format"] = response_format


def skipped(planned: Planned) -> RowResult:
    """The record of a row not sent: a prompt column is empty (input.on_null: skip)."""
    reason = f"empty column(s) {', '.join(planned.empty)}; not sent (input.on_null: skip)"
    return RowResult(
        row=planned.row,
        id=planned.id,
        status=RowStatus.SKIPPED,
        error_kind="null_value",
        error=reason,
        request_key=planned.request_key,
        occurrence=planned.occurrence,
    )


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
        row=request.row,
        id=request.id,
        status=RowStatus.FAILED if error else RowStatus.OK,
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
        system_fingerprint=last.system_fingerprint,
        ttft_ms=last.ttft_ms,
        request_key=request.request_key,
        occurrence=request.occurrence,
        tries=tuple(request.tries),
    )


def answered_row(
    sent: tuple[int, str, bytes, int],
    answer: ChatResult | None,
    error: RequestFailed | None,
    settings: CoreSettings,
    tries: Sequence[Attempt],
    latency_ms: float,
    batch_id: str | None = None,
) -> RowResult:
    """A row's record from one answer got outside the core (a provider batch's line), by the
    core's rules: output.fields read and checked (an answer without them fails the row, as after
    the last re-ask), tokens and cost as _row_result counts them. `sent`: the row, its id, request
    key and occurrence; `tries`: every request sent for it; `batch_id`: the batch that answered."""
    fields = None
    if answer is not None and error is None and settings.fields:
        try:
            fields = read_fields(settings.fields, answer, settings.tools, settings.output_cap)
        except InvalidOutput as exc:
            error = exc
    request = _Request(*sent, body={}, chars=0, tries=list(tries))
    answers = [] if answer is None else [answer]
    result = _row_result(
        request, answers, len(tries), latency_ms, settings.price, settings.model, fields, error
    )
    return replace(result, batch_id=batch_id)


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


@dataclass(slots=True)
class _Request:
    row: int
    id: str
    request_key: bytes
    occurrence: int
    body: dict[str, Any]
    chars: int  # prompt characters, for the limiter's token estimate
    attempts: int = 0
    outage_attempts: int = 0  # attempts an outage took, not counted against retry.max_attempts
    latency_ms: float = 0.0  # of the last attempt
    tries: list[Attempt] = field(default_factory=list)  # every attempt that got an answer or a failure


# Makes a planned body the one sent, once per row before its first attempt; RowInputError fails
# the row unsent (nothing counted against the endpoint, the limiter or the retry policy).
Resolve = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Backend(Protocol):
    """One chat request in, one answer or a RequestFailed out: client.ChatClient, or a fake."""

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def complete(self, body: dict[str, Any]) -> ChatResult: ...

    async def models(self) -> list[str] | None: ...


@dataclass(frozen=True)
class Clock:
    """The core's time: monotonic seconds for intervals and latency, wall seconds for the record."""

    monotonic: Callable[[], float] = time.perf_counter
    wall: Callable[[], float] = time.time


@dataclass(frozen=True)
class CoreSettings:
    """What the core reads of a job and its run, and no more (not the job's input or plan)."""

    model: str  # the job's: a row's model when no answer names one
    retry: RetrySpec
    fields: Mapping[str, FieldType]  # output.fields; empty: the answer's text is the result
    tools: bool  # the job offers tools: output.fields come as a tool call's arguments
    output_cap: tuple[str, int] | None  # the params key capping output, and its value
    format_fallbacks: tuple[dict[str, Any] | None, ...]  # response_format, then what to try instead
    output_tokens: int | None  # params' max_tokens, for a request's worst-case cost
    stall_warning_s: float
    width: int = 1  # workers: requests in flight
    grace_s: float = 10.0  # after a stop request, how long in-flight requests may finish
    base_url: str = ""  # for messages
    price: Price | None = None
    image_tokens: int = 0  # the prompt tokens a request's worst case counts per image

    @classmethod
    def of(
        cls, job: PreparedJob, width: int, grace_s: float, base_url: str, price: Price | None
    ) -> CoreSettings:
        spec = job.spec
        return cls(
            model=spec.model,
            retry=spec.retry,
            fields=spec.output.fields or {},
            tools=bool(spec.params.tools),
            output_cap=job.output_cap,
            format_fallbacks=job.format_fallbacks,
            output_tokens=output_tokens_cap(job.params),
            stall_warning_s=spec.stall_warning_s,
            width=width,
            grace_s=grace_s,
            base_url=base_url,
            price=price,
            image_tokens=image_tokens_ceiling(spec.images.max_side if spec.images else None),
        )


def outage_breaker(settings: CoreSettings, clock: Clock) -> Breaker:
    """The breaker a run of these settings uses: opens after max(10, width) failures in a row."""
    retry = settings.retry
    return Breaker(
        threshold=max(10, settings.width),
        first_probe_s=max(retry.initial_backoff_s, MIN_PROBE_S),
        max_outage_s=retry.max_outage_s,
        max_probe_s=min(MAX_PROBE_S, retry.max_backoff_s),
        clock=clock.monotonic,
        wall=clock.wall,
    )


class Core:
    """One run of a job's rows; `await run()` once. Its inputs are narrow and its seams injected
    (the backend, the clock, the retry policy's sleep, the breaker), so tests/test_core.py runs it
    with none of the network, the checkpoint or the wall clock."""

    def __init__(
        self,
        settings: CoreSettings,
        planned: AsyncIterable[Planned],  # the rows to send, in order (plan.KeyedPlan.requests)
        backend: Backend,
        limiter: Limiter,
        record: Callable[[Sequence[RowResult]], None],  # makes finished rows durable, a batch at a time
        events: Events,
        *,
        budget: BudgetGuard | None = None,
        stop: Stop | None = None,
        sleep: Sleep = asyncio.sleep,  # the retry policy's waits
        clock: Clock = Clock(),
        breaker: Breaker | None = None,
        format_step: int = 0,  # how far down format_fallbacks the endpoint's refusals have led
        accept_format: Callable[[dict[str, Any] | None], None] | None = None,  # kept for the next run
        resolve: Resolve | None = None,  # a row's body as sent (its images read: images.ImageSender)
    ):
        self.settings = settings
        self.planned = planned
        self.client = backend
        self.limiter = limiter
        self.record = record
        self.events = events
        self.budget = budget
        self.stop = stop or Stop()
        self.sleep = sleep
        self.clock = clock
        self.breaker = breaker or outage_breaker(settings, clock)
        self.format_step = format_step
        self.accept_format = accept_format
        self.resolve = resolve
        self.interrupted = False
        self.budget_stopped = False
        self.requests = 0
        self.aborted: BatchrunError | None = None
        self.retries: Counter[str] = Counter()
        self.in_flight = 0
        self.usage_warned: set[bool] = set()  # said: no usage (False), usage set aside (True)
        self.last_error: str | None = None
        self.format_cleared = 0  # rows refused without a format too: not the format's fault
        self.ever_answered = False  # any HTTP answer, even an error: the endpoint can be reached
        self.doomed = False  # the first answers all failed alike (SameFailure)
        self._breaker_changed = asyncio.Event()
        self._down_streak: list[_Request] = []  # rows whose attempts failed in the current run of failures
        self._last_down: EndpointDown | None = None
        self.same_failure = SameFailure(SAME_FAILURE_ANSWERS)
        self._held: list[RowResult] = []  # failed rows kept back while the first answers may doom the job
        self._tally = RowTally()  # this run's finished rows

    def describe(self) -> str:
        """The state worth showing beside the progress: the breaker's when open, else the limiter's."""
        return self.breaker.describe() if self.breaker.is_open else self.limiter.describe()

    async def run(self) -> RunStats:
        """Send every row still to do, or until stopped; every finished row is checkpointed."""
        self._stop = asyncio.Event()
        self._at_once = asyncio.Event()
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue(maxsize=self.settings.width * 2)
        self._results: asyncio.Queue[RowResult | None] = asyncio.Queue()
        self._retrying = row_policy(
            self.settings.retry,
            holding=lambda: self.breaker.is_open,  # the wait is for the next probe (in _attempt)
            before_sleep=self._count_retry,
            sleep=self.sleep,
        )
        self.stop.watch(self._stop_requested)
        try:
            await self._run()
        finally:
            self.stop.unwatch()
        return self._stats()

    def _stop_requested(self) -> None:
        self.interrupted = True
        self._stop.set()
        if self.stop.requests > 1:
            self._at_once.set()

    async def _run(self) -> None:
        async with self.client:
            producer = asyncio.create_task(self._produce())
            workers = [asyncio.create_task(self._work()) for _ in range(self.settings.width)]
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

    def _stats(self) -> RunStats:
        outcome: Outcome = (
            "aborted"
            if self.aborted is not None
            else "interrupted"
            if self.interrupted
            else "stopped_by_budget"
            if self.budget_stopped
            else "finished"
        )
        return RunStats.of(
            self._tally, dict(self.retries), self.limiter.rate_limited, self.requests, outcome, self.aborted
        )

    async def _produce(self) -> None:
        """Feed rows still to do; the bounded queue keeps memory flat however long the input.
        A plan that fails (its index cannot be written) stops the job like a worker's error."""
        try:
            await self._feed()
        except BatchrunError as exc:
            self.aborted = self.aborted or exc
            self._stop.set()
            return
        for _ in range(self.settings.width):
            await self._queue.put(None)

    async def _feed(self) -> None:
        async for planned in self.planned:
            body = planned.body
            if body is None:
                self._results.put_nowait(skipped(planned))
                continue
            request = _Request(
                planned.row,
                planned.id,
                planned.request_key,
                planned.occurrence,
                body,
                text_length(body["messages"]),
            )
            await self._queue.put(request)

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
            if result.status == RowStatus.FAILED and result.attempts and self.same_failure.undecided:
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
        settings = self.settings
        price = settings.price
        assert price is not None  # run_job refuses a budget without a price
        output = settings.output_tokens or ASSUMED_MAX_OUTPUT_TOKENS
        prompt = prompt_tokens_ceiling(request.body, settings.image_tokens)
        if not settings.fields:
            return price.cost(prompt, 0, output)
        growth = output + reask_growth()  # each re-ask quotes the answer before it and says why
        asks = range(settings.retry.max_parse_attempts)
        return sum(price.cost(prompt + asked * growth, 0, output) for asked in asks)

    def _stop_for_budget(self) -> None:
        if self.budget_stopped:
            return
        assert self.budget is not None
        self.budget_stopped = True
        self.events.say(
            f"budget: ${self.budget.spent_usd:.4f} spent of ${self.budget.limit_usd:g}; the next request "
            f"could exceed it: sending no more, finishing {self.in_flight} in flight"
        )
        self._stop.set()

    async def _send(self, request: _Request) -> RowResult:
        """One row through retries, and re-asks while its answer lacks output.fields, to a result;
        JobAborted passes through."""
        settings = self.settings
        answers: list[ChatResult] = []  # every billed answer, for the row's token counts
        parsed: dict[str, Any] | None = None
        error: RequestFailed | None = None
        if self.resolve is not None:
            try:
                request.body = await self.resolve(request.body)
            except RowInputError as exc:
                return _row_result(request, [], 0, 0.0, settings.price, settings.model, error=exc)
        question = request.body["messages"]
        self.in_flight += 1
        try:
            for asked in range(1, settings.retry.max_parse_attempts + 1):
                try:
                    answer = await self._ask(request)
                except RetryableError as first_failure:
                    answer = await self._retry_while_silent(request, first_failure)
                answers.append(answer)
                if not settings.fields:
                    break
                try:
                    parsed = read_fields(settings.fields, answer, settings.tools, settings.output_cap)
                    break
                except InvalidOutput as exc:
                    if asked == settings.retry.max_parse_attempts:
                        raise
                    self._count(exc)
                    # The correction is this attempt's only: the row's question stays the same.
                    messages = [
                        *question,
                        *reask_messages(answer, exc, settings.tools, settings.output_cap),
                    ]
                    request.body = {**request.body, "messages": messages}
                    request.chars = text_length(messages)
        except RequestFailed as exc:
            error = exc
        finally:
            self.in_flight -= 1
        self._warn_unknown_usage(answers)
        return _row_result(
            request,
            answers,
            request.attempts,
            request.latency_ms,
            settings.price,
            settings.model,
            parsed,
            error,
        )

    def _warn_unknown_usage(self, answers: list[ChatResult]) -> None:
        """Say once that answers came without usage, and once that a usage report was set aside
        (answers.py: one no request could have been billed)."""
        for answer in answers:
            problem = answer.usage_problem
            if answer.total_tokens is not None or (problem is not None) in self.usage_warned:
                continue
            self.usage_warned.add(problem is not None)
            what = f"token usage that no request could be billed ({problem})" if problem else "no token usage"
            self.events.say(
                f"warning: the endpoint sent {what}; token columns and cost_usd stay empty (null) "
                "for such rows"
                + (", and the budget counts each at its worst case" if self.budget is not None else ""),
                "warning",
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
        fallbacks = self.settings.format_fallbacks
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
        """Send the fallback at `step` from now on (the job's next run too), and say so once."""
        self.format_step = step
        now = self.settings.format_fallbacks[step]
        if self.accept_format is not None:
            self.accept_format(now)
        self.events.say(
            f"warning: the endpoint refused the response_format batchrun adds for output.fields "
            f"({refusal}); sending {describe_format(now)} instead for the rest of the job (the "
            "fields are still read from each answer and checked)",
            "warning",
        )

    async def _retry_while_silent(self, request: _Request, failure: RetryableError) -> ChatResult:
        """`_retry`, and again while the endpoint answers nothing at all: a row fails for want of
        an answer only once something shows that the endpoint answers (another row's answer, or
        its model list, which is not billed), so that an outage the breaker has not yet called
        fails no row; a request that alone loses its connection every time still fails."""
        while True:
            try:
                return await self._retry(request, failure)
            except EndpointDown as exc:
                if exc.status is not None or not self.breaker.failures or not await self._silent():
                    raise
                request.outage_attempts = request.attempts  # the outage's, as the breaker would count them
                failure = exc

    async def _silent(self) -> bool:
        """Whether the endpoint answers nothing, not even a model list."""
        try:
            await self.client.models()
        except EndpointDown as exc:
            return exc.status is None
        except BatchrunError:
            return False
        return False

    async def _retry(self, request: _Request, first_failure: RetryableError) -> ChatResult:
        """Attempts after a first failure, by the retry policy (wait, stop, counting).

        The first attempt is made outside tenacity, whose machinery costs ~25 µs per row even
        when nothing fails; its failure is raised again here as tenacity's attempt 1.
        """
        failure: RetryableError | None = first_failure
        max_attempts = self.settings.retry.max_attempts
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
        sent_at = self.clock.wall()  # the record's clock (results.Attempt)
        sent = self.clock.monotonic()
        try:
            answer = await self.client.complete(request.body)
        except BaseException as exc:
            self._report_failure(permit, exc)
            if isinstance(exc, RequestFailed):
                request.tries.append(
                    Attempt(sent_at, self.clock.wall(), exc.status, exc.kind, None, None, None)
                )
                self._judge(request, exc, probe)
            raise
        finally:
            request.latency_ms = (self.clock.monotonic() - sent) * 1000
        tokens = answer.prompt_tokens, answer.completion_tokens
        request.tries.append(Attempt(sent_at, self.clock.wall(), 200, None, answer.ttft_ms, *tokens))
        self.limiter.release(
            permit,
            ok=True,
            headers=answer.budget,
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
                self.events.status_changed()
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
        max_outage_s = self.settings.retry.max_outage_s
        if exc.status == 429 and exc.retry_after_s is not None and exc.retry_after_s > max_outage_s:
            raise EndpointUnavailable(
                f"{self.settings.base_url} asks to wait {exc.retry_after_s:,.0f} s (HTTP 429 "
                f"Retry-After), longer than retry.max_outage_s ({max_outage_s:g} s), a quota for the "
                "day?; the checkpoint is kept: rerun later",
                self.settings.base_url,
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
        outage_s = self.clock.monotonic() - self.breaker.down_since
        if self.breaker.answered():
            self.events.say(f"endpoint answered again after {outage_s:.1f} s; resuming")
            self._wake_held()

    def _no_answer(self, request: _Request, exc: EndpointDown, probe: bool) -> None:
        """An attempt got no answer: evidence for the breaker. The attempts that open it, and
        every one made while it is open, are the outage's, not the rows' (and before it decides,
        _retry_while_silent keeps a row from failing)."""
        self._last_down = exc
        opened = self.breaker.failed(probe)
        if opened:
            for row in self._down_streak:
                row.outage_attempts += 1
            self._down_streak.clear()
            request.outage_attempts += 1
            if not self.ever_answered:
                self._unreachable(exc)
            since = time.strftime("%H:%M:%S", time.localtime(self.breaker.down_since_wall))
            self.events.say(
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
        self.events.status_changed()

    def _unreachable(self, exc: EndpointDown) -> None:
        """The breaker opened before anything answered: stop now, not after retry.max_outage_s
        (the endpoint never answered this run; the model check before it did)."""
        message = f"cannot reach {self.settings.base_url}: {exc.what_happened}"
        if exc.config_problem:  # DNS, TLS: waiting will not cure it
            raise BatchrunError(message)
        raise EndpointUnavailable(message, self.settings.base_url)

    def _outage_too_long(self) -> EndpointUnavailable:
        since = time.strftime("%H:%M:%S", time.localtime(self.breaker.down_since_wall))
        last = f" (last: {self._last_down})" if self._last_down else ""
        return EndpointUnavailable(
            f"{self.settings.base_url} has not answered since {since}{last}, longer than retry.max_outage_s "
            f"({self.breaker.max_outage_s:g} s); the checkpoint is kept: rerun later",
            self.settings.base_url,
        )

    def _report_failure(self, permit: Permit, exc: BaseException) -> None:
        """Tell the limiter how an attempt failed: a 429 holds everyone, headers teach the budget."""
        if isinstance(exc, RequestFailed):
            self.limiter.release(
                permit,
                ok=False,
                headers=exc.budget,
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
        quiet_s = self.settings.stall_warning_s
        while True:
            seen = self._tally.rows
            await asyncio.sleep(quiet_s)
            if self._tally.rows == seen and self.in_flight and not self.breaker.is_open:
                self.events.say(
                    f"warning: no row finished in the last {quiet_s:g} s; {self.in_flight} "
                    f"request(s) in flight; last error: {self.last_error or 'none'}",
                    "warning",
                )

    async def _write(self) -> None:
        """Group commit: everything finished since the last commit goes in one transaction."""
        while True:
            batch = [await self._results.get()]
            while not self._results.empty():
                batch.append(self._results.get_nowait())
            finished = [r for r in batch if r is not None]
            if finished:
                self.record(finished)
                for result in finished:
                    self._tally.add(result)
                    self.events.row_finished(result)
            if len(finished) < len(batch):
                return

    async def _wind_down(
        self,
        producer: asyncio.Task[None],
        workers: list[asyncio.Task[None]],
        all_work: asyncio.Task[Any],
        at_once: bool,
    ) -> None:
        """Stop sending; let in-flight rows finish within the grace period (or until a second
        stop request), then cancel them."""
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        while not self._queue.empty():
            self._queue.get_nowait()
        for _ in workers:
            self._queue.put_nowait(None)
        grace: float | None = self.settings.grace_s
        if at_once or self.aborted is not None:
            grace = 0.0
        elif self.budget_stopped and not self.interrupted:
            grace = None  # requests in flight are paid for: wait for their answers
        second_stop = asyncio.create_task(self._at_once.wait())
        await asyncio.wait({all_work, second_stop}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        second_stop.cancel()
        if not all_work.done():
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
