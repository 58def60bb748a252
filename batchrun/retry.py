"""The retry policy: which failures are tried again, how long to wait, when to give up.

Built from tenacity's parts; the sleep and the jitter are injected, so tests run the policy on a
fake clock and assert its waits exactly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base

from batchrun.errors import RequestFailed, RetryableError
from batchrun.job import RetrySpec

Sleep = Callable[[float], Awaitable[None]]
Uniform = Callable[[float, float], float]  # random.uniform, or a fixed draw in tests


class WaitRetryAfter(wait_base):
    """Wait what the server asked for (Retry-After, capped at max_s), else exponential backoff
    with full jitter: a uniform draw below initial_s * 2**(attempt - 1), capped at max_s."""

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        uniform: Uniform = random.uniform,
    ):
        self._initial_s = initial_s
        self._max_s = max_s
        self._uniform = uniform

    @classmethod
    def of(cls, retry: RetrySpec, uniform: Uniform = random.uniform) -> WaitRetryAfter:
        return cls(retry.initial_backoff_s, retry.max_backoff_s, uniform)

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RequestFailed) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self._max_s)
        try:
            ceiling = min(self._max_s, self._initial_s * 2 ** (retry_state.attempt_number - 1))
        except OverflowError:
            ceiling = self._max_s
        return self._uniform(0.0, ceiling)


def row_policy(
    retry: RetrySpec,
    *,
    holding: Callable[[], bool] = lambda: False,
    before_sleep: Callable[[RetryCallState], None] | None = None,
    sleep: Sleep = asyncio.sleep,
    uniform: Uniform = random.uniform,
) -> AsyncRetrying:
    """How a row's request is tried again: retryable failures only, up to retry.max_attempts,
    waiting by WaitRetryAfter; no wait while `holding()` (the breaker holds rows itself)."""
    backoff = WaitRetryAfter.of(retry, uniform)
    return AsyncRetrying(
        stop=stop_after_attempt(retry.max_attempts),
        wait=lambda state: 0.0 if holding() else backoff(state),
        retry=retry_if_exception_type(RetryableError),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
