"""The batch executor: the rows still to do go into JSONL files submitted as provider batches, which
are polled until they end and collected into the checkpoint by its one writer.

A line's custom_id is its row's request key and occurrence (ledger.custom_id), so its answer is
recorded where an online answer to the same request would be: one checkpoint serves both modes.
Each answer crosses answers.read_batch_line (read_completion for the body) and becomes a row's
record by the core's rules (core.answered_row). A line that failed in a way worth another try
(5xx, a dropped request, an unreadable answer) goes back to the rows to do with its reason, until
the row has had retry.max_attempts batches; lines a batch never ran (expiry, cancellation, a
batch that failed validation) always go back, and do not count as attempts. A line refused for
good (400) fails its row, as online.

Every remote step is recorded before and after it (ledger.py): a run finds the live batches the
last one left, has each protocol finish or abandon what a crash interrupted (batch/openai.py,
batch/xai.py), reattaches to them, and never submits their rows again. Which protocol a run speaks
is endpoint.batch_api's, or with `auto` the one the endpoint answers in (batch/protocol.py); a
batch left by a run that spoke the other one is looked after in its own.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from batchrun.answers import BatchLine, BatchState, Bounds, Redactor
from batchrun.batch.http import BatchHttp
from batchrun.batch.protocol import BatchProtocol, batch_protocol
from batchrun.budget import BudgetGuard
from batchrun.core import CoreSettings, Outcome, RunStats, answered_row, skipped
from batchrun.cost import ASSUMED_MAX_OUTPUT_TOKENS, batch_price, output_tokens_cap, prompt_tokens_ceiling
from batchrun.errors import BatchrunError, PermanentError, RequestFailed, RetryableError, RowInputError
from batchrun.executors import Execution, api_key
from batchrun.images import ImageSender
from batchrun.ledger import NOT_RUN, LedgerRow, Returned, SentRow, Submission, custom_id
from batchrun.plan import SIMULATED_KEY, Planned
from batchrun.results import Attempt, RowResult, RowTally
from batchrun.retry import Sleep

if TYPE_CHECKING:
    from batchrun.batch import BatchOptions

INLINE_THREADS = 8  # images read and encoded at once while lines are written
FIRST_POLL_S = 1.0  # the first wait between looks; it doubles up to batches.poll_s
STOP_CHECK_S = 0.1  # how soon a wait notices a stop request
CHUNK_ROWS = 512  # rows of the plan looked up in the ledger at a time
RECORD_ROWS = 1000  # collected rows recorded per transaction
PART_OVERHEAD = 32  # bytes of an add call's body beyond its lines (xAI's protocol)
# Why a row a batch did not answer goes back, by how the batch ended.
UNANSWERED = {
    "completed": ("batch_missing", "the batch ended without a line for this request"),
    "expired": ("batch_expired", "the batch expired before this request ran"),
    "cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
    "failed": ("batch_failed", "the batch failed validation"),
}


@dataclass
class _Live:
    """A live batch as this run knows it."""

    submission: int
    api: BatchProtocol
    batch_id: str
    lines: int
    created: float
    reserved_usd: float
    status: str = "validating"
    done: int | None = None
    failed: int | None = None


@dataclass
class _File:
    """Request lines being written for one submission."""

    model: str
    handle: IO[bytes]
    rows: list[LedgerRow] = field(default_factory=list)
    size: int = 0
    reserved_usd: float = 0.0
    parts: list[int] = field(default_factory=list)  # lines per add call (one part: the whole file)
    part_size: int = 0  # bytes of the last part


class BatchExecutor:
    def __init__(self, execution: Execution, options: BatchOptions, *, sleep: Sleep = asyncio.sleep):
        assert execution.checkpoint is not None, "batch mode needs the checkpoint's ledger"
        job, spec = execution.job, execution.job.spec
        self._execution = execution
        self._options = options
        self._events = execution.events
        self._ledger = execution.checkpoint.ledger()
        self._batch = spec.batches
        self._retry = spec.retry
        self._sleep = sleep
        price = batch_price(spec)  # a batch line's: the batch rate
        self._settings = CoreSettings.of(job, 1, execution.grace_s, execution.base_url, price)
        key = SIMULATED_KEY if execution.simulated else api_key(spec.endpoint)
        self._http = BatchHttp(
            execution.base_url,
            key,
            spec.endpoint.timeout_s,
            spec.retry,
            http_client=execution.http_client,
            sleep=sleep,
        )
        self._bounds = Bounds(Redactor(key), output_tokens_cap(job.params))
        self._output_cap = output_tokens_cap(job.params) or ASSUMED_MAX_OUTPUT_TOKENS
        self._max_bytes = int(spec.batches.max_mb * 1_000_000)
        self._protocols: dict[str, BatchProtocol] = {}
        self._api_name = ""  # the protocol this run submits in: endpoint.batch_api's, or the probe's
        self._budget: BudgetGuard | None = None
        if execution.max_cost_usd is not None:
            reserved = self._ledger.reserved_usd()
            self._budget = BudgetGuard(execution.max_cost_usd, execution.spent_usd, reserved)
        self._live: dict[int, _Live] = {}
        self._tally = RowTally()
        images = job.prompts.images  # read and inlined as each line is written, as online when sent
        self._inline = ImageSender(images, INLINE_THREADS) if images else None
        self._sent = 0  # lines submitted by this run
        self._budget_stopped = False
        self._phase = "starting"

    def describe(self) -> str:
        if not self._live:
            return f"batch: {self._phase}"
        shown = [
            f"{b.batch_id} {b.status} {b.done or 0}/{b.lines}" + (f" ({b.failed} failed)" if b.failed else "")
            for b in list(self._live.values())[:3]
        ]
        more = f" +{len(self._live) - 3} more" if len(self._live) > 3 else ""
        return f"batches: {'; '.join(shown)}{more}"

    def workers(self) -> None:
        return None

    async def run(self) -> RunStats:
        """Reattach to the live batches, submit the rows still to do (or cancel), and wait for
        every batch to end (unless told not to wait), collecting each as it ends."""
        async with self._http:
            # an endpoint without a Batch API stops the run here: nothing was sent
            self._api_name = await self._http.probe(self._execution.job.spec.endpoint.batch_api)
            error: BatchrunError | None = None
            try:
                await self._reattach()
                if self._options.cancel:
                    await self._cancel_all()
                else:
                    await self._submit_all()
                if self._options.wait or self._options.cancel:
                    await self._wait()
            except BatchrunError as exc:
                error = exc
            self._say_left()
        return self._stats(error)

    def _stopping(self) -> bool:
        return self._execution.stop.requests > 0

    def _protocol(self, name: str | None = None) -> BatchProtocol:
        """The protocol `name` (this run's by default), made once."""
        name = name or self._api_name
        if name not in self._protocols:
            spec = self._execution.job.spec
            max_line = int(spec.endpoint.max_response_mb * 2**20)
            add_bytes = int(spec.batches.add_mb * 1_000_000)
            self._protocols[name] = batch_protocol(name, self._http, self._bounds, max_line, add_bytes)
        return self._protocols[name]

    async def _reattach(self) -> None:
        """Take up the live batches an earlier run left, each in its own protocol, which first
        brings the ones a crash left half submitted to `submitted` (or gives them up)."""
        for sub in self._ledger.live():
            if sub.state != "submitted":
                await self._protocol(sub.api).resume(self._ledger, sub, self._options.cancel)
        for sub in self._ledger.live():
            self._add_live(sub)
        if self._live:
            rows = sum(b.lines for b in self._live.values())
            self._events.say(f"reattached to {len(self._live)} batch(es) of {rows:,} rows submitted earlier")

    def _add_live(self, sub: Submission) -> None:
        assert sub.batch_id is not None, "a submitted batch has its id"
        self._live[sub.submission] = _Live(
            sub.submission,
            self._protocol(sub.api),
            sub.batch_id,
            sub.lines,
            sub.created,
            sub.reserved_usd,
            sub.status or "validating",
        )

    async def _cancel_all(self) -> None:
        for live in self._live.values():
            if (state := await live.api.cancel(live.batch_id)) is not None:
                self._seen(live, state)  # a batch the provider no longer knows: _wait gives it up
        if self._live:
            self._events.say(
                f"cancelling {len(self._live)} batch(es); their unanswered rows go back to pending"
            )
        else:
            self._events.say("no live batches to cancel")

    async def _submit_all(self) -> None:
        """The plan's rows into files, each submitted when full, the rest at the end."""
        self._phase = "writing batch files"
        files: dict[str, _File] = {}
        chunk: list[Planned] = []
        try:
            async for planned in self._execution.plan.requests():
                chunk.append(planned)
                if len(chunk) >= CHUNK_ROWS:
                    taken, chunk = await self._take(chunk, files), []
                    if not taken:
                        break
                if self._stopping():
                    return
            else:
                await self._take(chunk, files)
            for file in files.values():
                if self._stopping():
                    return
                await self._submit(file)
        finally:
            for file in files.values():
                file.handle.close()
            self._phase = "submitted"

    async def _take(self, chunk: Sequence[Planned], files: dict[str, _File]) -> bool:
        """Write a chunk of the plan's rows into files (submitting those that fill up); False
        once the budget refuses a row."""
        self._record([skipped(p) for p in chunk if p.body is None])
        sending = [p for p in chunk if p.body is not None]
        live = self._ledger.in_live([(p.request_key, p.occurrence) for p in sending])
        for planned in sending:
            if (planned.request_key, planned.occurrence) in live:
                continue  # in a batch still at the provider
            body = self._line_body(planned)
            if self._inline is not None:
                try:
                    body = await self._inline(body)
                except RowInputError as exc:  # the row fails unsent, as online
                    self._record([self._unsent(planned, exc)])
                    continue
            line = self._protocol().line(custom_id(planned.request_key, planned.occurrence), body)
            if len(line) > self._max_line_bytes():
                self._record([self._too_large(planned, len(line))])
                continue
            worst = self._worst_usd(body)
            if self._budget is not None and not self._budget.reserve(worst):
                self._stop_for_budget()
                return False
            await self._add_line(files, str(body["model"]), line, (*self._ledger_row(planned), worst))
        return True

    def _max_line_bytes(self) -> int:
        """The longest line a batch can take: one that fits a file, and an add call."""
        part_bytes = self._protocol().part_bytes
        return self._max_bytes if part_bytes is None else min(self._max_bytes, part_bytes - PART_OVERHEAD)

    @staticmethod
    def _ledger_row(planned: Planned) -> tuple[bytes, int, int, str]:
        return planned.request_key, planned.occurrence, planned.row, planned.id

    async def _add_line(
        self, files: dict[str, _File], model: str, line: bytes, row: tuple[bytes, int, int, str, float]
    ) -> None:
        """A line into the file of its model (one model per batch), which is submitted first if
        the line would take it past batches.max_lines or batches.max_mb; and into the file's
        last part, or a new one if it would take that past the protocol's part_bytes."""
        file = files.get(model)
        if file is not None and (
            len(file.rows) >= self._batch.max_lines or file.size + len(line) > self._max_bytes
        ):
            await self._submit(files.pop(model))
            file = None
        if file is None:
            # closed once submitted, or when submitting ends (_submit_all)
            handle = tempfile.NamedTemporaryFile(prefix="batchrun-", suffix=".jsonl")  # noqa: SIM115
            file = files[model] = _File(model, handle)
        file.handle.write(line)
        file.size += len(line)
        file.reserved_usd += row[-1]
        part_bytes = self._protocol().part_bytes
        if not file.parts or (
            part_bytes is not None and file.part_size + len(line) + PART_OVERHEAD > part_bytes
        ):
            file.parts.append(0)
            file.part_size = 0
        file.parts[-1] += 1
        file.part_size += len(line)
        file.rows.append((*row, None if part_bytes is None else len(file.parts) - 1))

    def _too_large(self, planned: Planned, size: int) -> RowResult:
        """The record of a row whose request alone is past batches.max_mb: no batch can take it."""
        error = PermanentError(
            "request_too_large",
            f"the request is {size / 1e6:.1f} MB, more than a batch file takes "
            f"(batches.max_mb: {self._batch.max_mb:g})",
        )
        return self._unsent(planned, error)

    def _unsent(self, planned: Planned, error: RequestFailed) -> RowResult:
        """The record of a row that failed before it could go into a file."""
        return answered_row(
            (planned.row, planned.id, planned.request_key, planned.occurrence),
            None,
            error,
            self._settings,
            (),
            0.0,
        )

    def _line_body(self, planned: Planned) -> dict[str, Any]:
        """The request as a batch line sends it: never streamed; the response_format this
        endpoint accepted (as online)."""
        assert planned.body is not None
        body = {k: v for k, v in planned.body.items() if k not in ("stream", "stream_options")}
        fallbacks = self._execution.job.format_fallbacks
        if fallbacks and self._execution.format_step:
            chosen = fallbacks[self._execution.format_step]
            body.pop("response_format", None)
            if chosen is not None:
                body["response_format"] = chosen
        return body

    def _worst_usd(self, body: dict[str, Any]) -> float:
        """The most a line can cost: a prompt-size ceiling and a full-length answer."""
        price = self._settings.price
        return 0.0 if price is None else price.cost(prompt_tokens_ceiling(body), 0, self._output_cap)

    def _stop_for_budget(self) -> None:
        if self._budget_stopped:
            return
        assert self._budget is not None
        self._budget_stopped = True
        self._events.say(
            f"budget: ${self._budget.spent_usd:.4f} spent and ${self._budget.reserved_usd:.4f} reserved for "
            f"batches of ${self._budget.limit_usd:g}; the next row could pass it: submitting no more"
        )

    async def _submit(self, file: _File) -> None:
        """Send a file as a batch, in this run's protocol, each remote step recorded before and after."""
        file.handle.flush()
        api = self._protocol()
        lines = len(file.rows)
        submission, name = self._ledger.begin(
            (api.name, api.first_state),
            self._execution.base_url,
            file.model,
            file.rows,
            file.size,
            file.reserved_usd,
        )
        self._phase = f"submitting {lines:,} rows"
        self._events.status_changed()
        try:
            state = await api.submit(self._ledger, submission, name, Path(file.handle.name), file.parts)
        except RequestFailed as exc:
            if self._budget is not None and not self._ledger.is_live(submission):
                self._budget.settle(file.reserved_usd, 0.0)
            raise BatchrunError(f"the provider refused a batch of {lines:,} rows: {exc}") from None
        finally:
            file.handle.close()
        if state is None:
            if self._budget is not None:
                self._budget.settle(file.reserved_usd, 0.0)
            self._events.say(f"warning: no row reached a batch; these {lines:,} rows are pending", "warning")
            return
        (sub,) = [s for s in self._ledger.live() if s.submission == submission]
        self._sent += sub.lines
        self._add_live(sub)
        self._events.say(f"submitted batch {state.id}: {sub.lines:,} rows ({file.size / 2**20:.1f} MB)")
        if sub.lines < lines:
            self._events.say(
                f"warning: {lines - sub.lines:,} rows did not reach batch {state.id}; they are pending",
                "warning",
            )

    async def _wait(self) -> None:
        """Look at the live batches until each has ended (collecting it), or a stop request."""
        self._phase = "waiting"
        interval = min(FIRST_POLL_S, self._batch.poll_s)
        while self._live and not self._stopping():
            for live in list(self._live.values()):
                state = await live.api.get(live.batch_id)
                if state is None:
                    reason = f"the provider no longer knows batch {live.batch_id}"
                    self._ledger.abandon(live.submission, "batch_not_run", reason)
                    del self._live[live.submission]
                    continue
                self._seen(live, state)
                if state.ended:
                    await self._collect(live, state)
            self._events.status_changed()
            if self._live:
                await self._pause(interval)
                interval = min(interval * 2, self._batch.poll_s)

    async def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping() and (left := deadline - time.monotonic()) > 0:
            await self._sleep(min(left, STOP_CHECK_S))

    def _seen(self, live: _Live, state: BatchState) -> None:
        live.status, live.done, live.failed = state.status, state.completed, state.failed
        self._ledger.seen(live.submission, state.status, state.completed, state.failed)

    async def _collect(self, live: _Live, state: BatchState) -> None:
        """An ended batch's answers into the checkpoint, its unanswered rows back to the rows to
        do; the answers in chunks, the last with the batch's end, so a crash meanwhile collects
        it again (an answer recorded twice is the same row)."""
        rows = self._ledger.rows(live.submission)
        back = time.time()
        results: list[RowResult] = []
        returned: list[Returned] = []
        spent = 0.0  # for the budget: a cost unknown (no usage) counts as its worst case
        async for line in live.api.results(state):
            if line is None or (row := rows.pop(line.custom_id, None)) is None:
                continue  # unreadable, or no row of ours: its row stays missing from the batch
            outcome = self._line_outcome(row, line, live, back)
            if isinstance(outcome, Returned):
                returned.append(outcome)
                continue
            results.append(outcome)
            spent += row.worst_usd if outcome.cost_usd is None else outcome.cost_usd
            if len(results) >= RECORD_ROWS:
                self._record(results)
                results = []
        kind, reason = UNANSWERED.get(state.status, UNANSWERED["completed"])
        if state.errors:
            reason += ": " + "; ".join(state.errors)
        returned += [Returned(r.request_key, r.occurrence, kind, reason) for r in rows.values()]
        with self._ledger.transaction():
            self._record(results)
            self._ledger.settle(live.submission, returned, "collected", "; ".join(state.errors) or None)
        if self._budget is not None:
            self._budget.settle(live.reserved_usd, spent)
        del self._live[live.submission]
        self._say_ended(live, state, returned)
        await live.api.finish(state)

    def _line_outcome(self, row: SentRow, line: BatchLine, live: _Live, back: float) -> RowResult | Returned:
        sent = live.created
        failure = line.failure
        answer = line.answer
        tokens = (answer.prompt_tokens, answer.completion_tokens) if answer else (None, None)
        attempt = Attempt(sent, back, line.status, failure.kind if failure else None, None, *tokens)
        earlier = tuple(Attempt(s, b, None, kind, None, None, None) for s, b, kind in row.earlier)
        tries = (*earlier, attempt)
        if failure is not None and (
            failure.kind in NOT_RUN
            or (isinstance(failure, RetryableError) and len(tries) < self._retry.max_attempts)
        ):
            return Returned(row.request_key, row.occurrence, failure.kind, str(failure))
        sent_row = (row.row, row.id, row.request_key, row.occurrence)
        latency_ms = (back - sent) * 1000
        return answered_row(sent_row, answer, failure, self._settings, tries, latency_ms, live.batch_id)

    def _record(self, results: list[RowResult]) -> None:
        if not results:
            return
        self._execution.record(results)
        for result in results:
            self._tally.add(result)
            self._events.row_finished(result)

    def _say_ended(self, live: _Live, state: BatchState, returned: Sequence[Returned]) -> None:
        if state.status == "failed":
            messages = "; ".join(state.errors) or "no reason given"
            self._events.say(
                f"warning: batch {live.batch_id} failed: {messages}; its {live.lines:,} rows are pending",
                "warning",
            )
        elif returned:
            kinds: dict[str, int] = {}
            for r in returned:
                kinds[r.error_kind] = kinds.get(r.error_kind, 0) + 1
            why = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))
            self._events.say(
                f"batch {live.batch_id} {state.status}: {len(returned):,} rows back to pending ({why}); "
                "a rerun sends them again"
            )

    def _say_left(self) -> None:
        if self._live:
            rows = sum(b.lines for b in self._live.values())
            self._events.say(
                f"{len(self._live)} batch(es) of {rows:,} rows still at the provider: run the job again "
                "in batch mode to collect their answers"
            )

    def _stats(self, error: BatchrunError | None) -> RunStats:
        outcome: Outcome = (
            "aborted"
            if error is not None
            else "interrupted"
            if self._stopping()
            else "stopped_by_budget"
            if self._budget_stopped
            else "finished"
        )
        return RunStats.of(self._tally, {}, 0, self._sent, outcome, error)
