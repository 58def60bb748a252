"""The async core alone: a fake backend and a fake clock, no sockets, no checkpoint.

What the end-to-end tests reach only through a server (the response_format fallback, the stop when
every first answer fails alike, outage and attempt accounting, waits that honour Retry-After, the
budget's stop) is driven here directly, each in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from batchrun.answers import ChatResult
from batchrun.budget import BudgetGuard
from batchrun.core import Clock, Core, CoreSettings, RunStats, Stop
from batchrun.cost import list_price
from batchrun.errors import EndpointDown, JobAborted, PermanentError, RetryableError
from batchrun.events import Level, RunStarted
from batchrun.job import RetrySpec
from batchrun.limits import Limiter
from batchrun.plan import Planned
from batchrun.results import RowResult, RowStatus
from batchrun.structured import format_fallbacks

Answer = Callable[[dict[str, Any], int], ChatResult]  # (request body, call number) -> answer, or raise


def answer(content: str = "An answer.", prompt_tokens: int = 10, completion_tokens: int = 3) -> ChatResult:
    return ChatResult(
        content, "stop", prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, "m", "id"
    )


@dataclass
class FakeBackend:
    """Answers each request by `answer(body, n)`, n counting from 1; `up` says whether a model list
    (the core's check that the endpoint answers at all) gets an answer."""

    answer: Answer
    up: Callable[[], bool] = lambda: True
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def __aenter__(self) -> FakeBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def complete(self, body: dict[str, Any]) -> ChatResult:
        self.bodies.append(json.loads(json.dumps(body)))  # as sent, not as mutated later
        await asyncio.sleep(0)
        return self.answer(body, len(self.bodies))

    async def models(self) -> list[str] | None:
        if not self.up():
            raise EndpointDown("connection", "refused")
        return None


@dataclass
class FakeClock:
    now: float = 1000.0
    waits: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        """The retry policy's wait: recorded, and the clock moves on at once."""
        self.waits.append(seconds)
        await self.pause(seconds)

    async def pause(self, seconds: float) -> None:
        """The limiter's hold: the clock moves on at once."""
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Recorder:
    said: list[str] = field(default_factory=list)
    rows: list[RowResult] = field(default_factory=list)

    def started(self, run: RunStarted) -> None:
        pass

    def row_finished(self, result: RowResult) -> None:
        pass

    def say(self, message: str, level: Level = "info") -> None:
        self.said.append(message)

    def status_changed(self) -> None:
        pass

    def finished(self) -> None:
        pass


RETRY = RetrySpec(max_attempts=3, initial_backoff_s=0.0, max_backoff_s=0.02, max_outage_s=5)


def settings(**changes: Any) -> CoreSettings:
    base = CoreSettings(
        model="m",
        retry=RETRY,
        fields={},
        tools=False,
        output_cap=("max_tokens", 40),
        format_fallbacks=(),
        output_tokens=40,
        stall_warning_s=60,
        width=4,
        grace_s=1,
        base_url="http://fake/v1",
    )
    return CoreSettings(**{**base.__dict__, **changes})


async def rows(n: int) -> AsyncIterator[Planned]:
    for i in range(n):
        body = {"model": "m", "messages": [{"role": "user", "content": f"row {i}"}], "max_tokens": 40}
        yield Planned(i, str(i), bytes([i % 256]), 0, body)


@dataclass
class Ran:
    stats: RunStats
    events: Recorder
    core: Core
    clock: FakeClock


def run(
    core_settings: CoreSettings, backend: FakeBackend, n: int, real_time: bool = False, **options: Any
) -> Ran:
    """`real_time`: on the loop's own clock, for the breaker, which waits on it for its next probe."""
    clock = FakeClock()
    events = Recorder()
    limiter = Limiter(core_settings.width, max_tokens=40, max_hold_s=0.02, clock=clock, sleep=clock.pause)
    core = Core(
        core_settings,
        rows(n),
        backend,
        limiter,
        events.rows.extend,
        events,
        sleep=asyncio.sleep if real_time else clock.sleep,
        clock=Clock() if real_time else Clock(monotonic=clock, wall=clock),
        **options,
    )
    return Ran(asyncio.run(core.run()), events, core, clock)


def test_a_refused_json_schema_falls_back_to_json_mode_with_the_schema_for_the_rest() -> None:
    fields = {"sentiment": "string"}
    accepted: list[Any] = []

    def reply(body: dict[str, Any], n: int) -> ChatResult:
        if body["response_format"]["type"] == "json_schema":
            raise PermanentError("http_400", "HTTP 400: json_schema is not supported", 400)
        return answer('{"sentiment": "good"}')

    backend = FakeBackend(reply)
    core_settings = settings(fields=fields, format_fallbacks=format_fallbacks(fields))
    ran = run(core_settings, backend, 8, accept_format=accepted.append)
    stats, events, core = ran.stats, ran.events, ran.core

    assert stats.ok == 8 and stats.outcome == "finished"
    assert core.format_step == 1 and accepted == [core_settings.format_fallbacks[1]]
    assert [r.fields for r in events.rows] == ['{"sentiment":"good"}'] * 8
    # Each row in flight when the refusal came was refused once; none after it.
    refused = [b for b in backend.bodies if b["response_format"]["type"] == "json_schema"]
    assert 1 <= len(refused) <= core_settings.width
    assert sum("refused the response_format" in line for line in events.said) == 1


def test_every_first_answer_failing_alike_stops_the_job_and_fails_no_row() -> None:
    def reply(body: dict[str, Any], n: int) -> ChatResult:
        raise PermanentError("http_400", "HTTP 400: No connected db.", 400)

    ran = run(settings(), FakeBackend(reply), 100)
    stats, events, core = ran.stats, ran.events, ran.core

    assert stats.outcome == "aborted" and isinstance(stats.error, JobAborted)
    assert "the first 20 answers were all the same error" in str(stats.error)
    assert events.rows == []  # the rows failed meanwhile stay pending: they were never the problem
    assert core.requests <= 20 + core.settings.width


def test_an_outage_fails_no_row_and_its_attempts_are_not_the_rows() -> None:
    down = {"yes": True}

    def reply(body: dict[str, Any], n: int) -> ChatResult:
        if 5 < n <= 40:
            raise EndpointDown("connection", "refused")
        if n > 40:
            down["yes"] = False
        return answer()

    backend = FakeBackend(reply, up=lambda: not (down["yes"] and len(backend.bodies) > 5))
    ran = run(settings(), backend, 30, real_time=True)
    stats, events = ran.stats, ran.events

    assert stats.ok == 30 and stats.failed == 0
    assert any(line.startswith("endpoint down since") for line in events.said)
    assert any("endpoint answered again" in line for line in events.said)
    # The outage's attempts were not the rows': some row made more than it may.
    assert max(r.attempts for r in events.rows) > RETRY.max_attempts
    assert sum(r.attempts for r in events.rows) == len(backend.bodies)


def test_a_row_whose_request_alone_gets_no_answer_fails_once_the_endpoint_is_seen_to_answer() -> None:
    def reply(body: dict[str, Any], n: int) -> ChatResult:
        if body["messages"][0]["content"] == "row 2":
            raise EndpointDown("connection", "closed before the answer ended")
        return answer()

    events = run(settings(width=1), FakeBackend(reply), 4).events

    by_row = {r.row: r for r in events.rows}
    assert [by_row[i].status for i in range(4)] == [
        RowStatus.OK,
        RowStatus.OK,
        RowStatus.FAILED,
        RowStatus.OK,
    ]
    assert by_row[2].attempts == RETRY.max_attempts
    assert by_row[2].error_kind == "connection"


def test_waits_honour_retry_after_up_to_max_backoff() -> None:
    def reply(body: dict[str, Any], n: int) -> ChatResult:
        if n == 1:
            raise RetryableError("rate_limited", "HTTP 429", 429, retry_after_s=0.015)
        if n == 2:
            raise RetryableError("rate_limited", "HTTP 429", 429, retry_after_s=3)
        return answer()

    ran = run(settings(width=1), FakeBackend(reply), 1)

    assert ran.stats.ok == 1 and ran.stats.retries == {"rate_limited": 2}
    assert ran.clock.waits == [0.015, RETRY.max_backoff_s]  # as asked, then capped


@pytest.mark.parametrize("width", [1, 4])
def test_the_budget_stops_before_a_request_could_pass_it(width: int) -> None:
    price = list_price("grok-4.3")
    assert price is not None
    one_row = price.cost(20, 0, 40)
    # Usage a request could be billed: fewer prompt tokens than its bytes (cost.prompt_tokens_ceiling).
    backend = FakeBackend(lambda body, n: answer(prompt_tokens=20, completion_tokens=40))
    budget = BudgetGuard(one_row * 10.5)
    stats = run(settings(width=width, price=price), backend, 50, budget=budget).stats

    assert stats.outcome == "stopped_by_budget"
    assert budget.spent_usd <= budget.limit_usd
    assert 1 <= stats.ok < 50
    assert stats.ok == len(backend.bodies)  # every request sent was settled, none lost


def test_a_stop_request_as_a_run_ends_reaches_it_or_is_harmless() -> None:
    """A request made before the run watches is seen at once; one made after its loop has closed
    (an interrupt as the run returns) raises nothing in the thread that made it."""
    stop, seen = Stop(), []
    stop.request()

    async def run() -> None:
        stop.watch(lambda: seen.append(stop.requests))  # left watching: the loop closes under it

    asyncio.run(run())
    assert seen == [1]
    assert stop.request() == 2
    assert seen == [1]
