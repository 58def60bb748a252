"""The retry policy on a fake clock (#12 item 6): its waits are asserted exactly, not timed."""

from __future__ import annotations

import asyncio

import pytest

from batchrun.errors import PermanentError, RetryableError
from batchrun.job import RetrySpec
from batchrun.retry import row_policy


class FakeClock:
    """Sleeps that take no time and are written down."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def highest(low: float, high: float) -> float:
    """The jitter's worst draw: the backoff's ceiling."""
    return high


def run_policy(retry: RetrySpec, failures: list[Exception], **kwargs: object) -> tuple[str, list[float]]:
    """Drive the policy over an operation that fails with `failures` in turn, then answers."""
    clock = FakeClock()
    remaining = list(failures)

    async def operation() -> str:
        if remaining:
            raise remaining.pop(0)
        return "answer"

    async def main() -> str:
        policy = row_policy(retry, sleep=clock.sleep, uniform=highest, **kwargs)  # type: ignore[arg-type]
        return await policy(operation)

    return asyncio.run(main()), clock.slept


def test_backoff_doubles_up_to_its_cap() -> None:
    retry = RetrySpec(max_attempts=6, initial_backoff_s=1.0, max_backoff_s=5.0)
    answer, slept = run_policy(retry, [RetryableError("http_503", "busy", status=503)] * 5)
    assert answer == "answer"
    assert slept == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_retry_after_is_waited_exactly_and_capped() -> None:
    retry = RetrySpec(max_attempts=4, initial_backoff_s=1.0, max_backoff_s=30.0)
    failures: list[Exception] = [
        RetryableError("http_429", "slow down", status=429, retry_after_s=7.5),
        RetryableError("http_429", "slow down", status=429, retry_after_s=120.0),
        RetryableError("http_503", "busy", status=503),  # no Retry-After: the backoff of attempt 3
    ]
    _, slept = run_policy(retry, failures)
    assert slept == [7.5, 30.0, 4.0]


def test_jitter_draws_below_the_ceiling() -> None:
    retry = RetrySpec(max_attempts=3, initial_backoff_s=2.0, max_backoff_s=60.0)
    clock = FakeClock()
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return high / 4

    async def main() -> None:
        failures = [RetryableError("http_503", "busy", status=503)] * 2

        async def operation() -> None:
            if failures:
                raise failures.pop()

        await row_policy(retry, sleep=clock.sleep, uniform=uniform)(operation)

    asyncio.run(main())
    assert draws == [(0.0, 2.0), (0.0, 4.0)]
    assert clock.slept == [0.5, 1.0]


def test_gives_up_after_max_attempts_and_never_retries_a_permanent_error() -> None:
    retry = RetrySpec(max_attempts=3, initial_backoff_s=1.0, max_backoff_s=5.0)
    with pytest.raises(RetryableError):
        run_policy(retry, [RetryableError("http_503", "busy", status=503)] * 3)
    with pytest.raises(PermanentError):
        run_policy(retry, [PermanentError("http_400", "bad request", status=400)])


def test_no_wait_while_the_breaker_holds_the_rows() -> None:
    retry = RetrySpec(max_attempts=3, initial_backoff_s=1.0, max_backoff_s=5.0)
    _, slept = run_policy(retry, [RetryableError("http_503", "down", status=503)] * 2, holding=lambda: True)
    assert slept == [0.0, 0.0]
