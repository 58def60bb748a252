"""One rate limit and one money budget for every worker of a cluster run.

`ClusterLimits` is the state of one Ray actor per run: the job's pacing (requests and tokens per
minute, GCRA as in limits.py), the holds a 429 or spent `x-ratelimit-*` headers call for, the
slowdown after a 429, and the money budget. Workers do not ask it once per request:

* `ClusterLimiter` (in each worker, in place of limits.Limiter) leases paced slots a few at a
  time, about LEASE_WINDOW_S of the rate per call, each slot a delay from the actor's now (no
  clock is shared between nodes). A hold seen by one worker goes to the actor, and every other
  worker learns of it within POLL_S: its leased slots inside the hold are dropped.
* `ClusterBudget` (in place of budget.BudgetGuard) is granted money a few rows' worst case at a
  time and reserves from that locally; the actor never grants past max_cost_usd, so the workers'
  reservations together cannot pass it. A worker gives back what it did not spend when it ends.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from batchrun.budget import BudgetGuard
from batchrun.limits import PACED_CREEP, PACED_EASE, Limiter, Permit

LEASE_WINDOW_S = 0.05  # a lease covers about this much of the rate: the limit's granularity per worker
MAX_LEASE = 256  # slots per lease, at most
POLL_S = 0.1  # how often a worker asks for the cluster's hold when it has no lease to ask for
BUDGET_CHUNK_ROWS = 4  # money granted per call: this many rows' worst case (times the worker's width)


@dataclass(frozen=True)
class Lease:
    delays_s: list[float]  # each slot's delay from when the actor granted it
    hold_s: float  # how long the cluster's hold lasts from then (0: none)


class ClusterLimits:
    """The limiter actor's state: pacing, holds and the money budget of the whole cluster."""

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        max_hold_s: float = 60.0,
        max_cost_usd: float | None = None,
        spent_usd: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._request_s = 60 / requests_per_minute if requests_per_minute else 0.0
        self._token_s = 60 / tokens_per_minute if tokens_per_minute else 0.0
        self._max_hold_s = max_hold_s
        self._clock = clock
        self._request_tat = self._token_tat = 0.0
        self._hold_until = 0.0
        self._last_cut = -math.inf
        self.slowdown = 1.0
        self.max_cost_usd = max_cost_usd
        self.committed_usd = spent_usd  # spent before this run, and every grant not given back
        self.budget_refused = False
        self.leases = 0
        self.slots = 0

    def lease(self, count: int, tokens: int, returned_tokens: int = 0, successes: int = 0) -> Lease:
        """`count` paced slots of `tokens` each; settles tokens reserved but not used, and lets the
        pace creep back by the successes reported since the last lease."""
        now = self._clock()
        self._token_tat -= returned_tokens * self._token_s * self.slowdown
        if successes and self.slowdown > 1.0:
            self.slowdown = 1.0 + (self.slowdown - 1.0) * (1 - PACED_CREEP) ** successes
        delays = []
        for _ in range(count):
            slot = max(now, self._request_tat, self._token_tat, self._hold_until)
            self._request_tat = slot + self._request_s * self.slowdown
            self._token_tat = slot + tokens * self._token_s * self.slowdown
            delays.append(slot - now)
        self.leases += 1
        self.slots += count
        return Lease(delays, self.hold_s(now))

    def hold_s(self, now: float | None = None) -> float:
        """How long the cluster's hold lasts from now (0: none)."""
        now = self._clock() if now is None else now
        return max(0.0, self._hold_until - now)

    def hold(self, seconds: float) -> None:
        """No slot starts in the next `seconds` (capped at max_hold_s)."""
        until = self._clock() + min(seconds, self._max_hold_s)
        if until > self._hold_until:
            self._hold_until = until
            self._request_tat = max(self._request_tat, until)
            self._token_tat = max(self._token_tat, until)

    def rate_limited(self, age_s: float) -> None:
        """A 429 for a request sent `age_s` ago: ease the pace, once per round trip."""
        sent_at = self._clock() - age_s
        if sent_at >= self._last_cut:
            self._last_cut = self._clock()
            self.slowdown *= PACED_EASE

    def grant(self, want_usd: float) -> float:
        """Up to `want_usd` of the budget still uncommitted."""
        if self.max_cost_usd is None:
            return want_usd
        granted = max(0.0, min(want_usd, self.max_cost_usd - self.committed_usd))
        self.committed_usd += granted
        self.budget_refused = self.budget_refused or granted < want_usd
        return granted

    def give_back(self, usd: float) -> None:
        self.committed_usd -= usd

    def counts(self) -> dict[str, float]:
        return {"leases": self.leases, "slots": self.slots, "committed_usd": self.committed_usd}


class ClusterLimiter(Limiter):
    """A worker's limits.Limiter whose pacing and holds are the cluster's (see the module doc);
    the in-flight limit (and its AIMD when the job sets no rate_limit) stays the worker's own."""

    def __init__(
        self,
        actor: Any,  # a Ray handle to a ClusterLimits actor
        concurrency: int,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        max_tokens: int | None = None,
        max_hold_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        super().__init__(
            concurrency, requests_per_minute, tokens_per_minute, max_tokens, max_hold_s, clock, sleep
        )
        self._actor = actor
        per_s = (requests_per_minute or 0) / 60
        self._lease_size = max(1, min(MAX_LEASE, concurrency, math.ceil(per_s * LEASE_WINDOW_S)))
        self._slots: collections.deque[float] = collections.deque()  # local clock times
        self._leasing: asyncio.Future[None] | None = None
        self._polling: asyncio.Future[None] | None = None
        self._polled = -math.inf
        self._returned_tokens = 0
        self._successes = 0

    async def _wait_turn(self, tokens: int) -> None:
        while True:
            now = self._clock()
            if now - self._polled >= POLL_S and self._polling is None:
                self._polled = now
                self._polling = asyncio.ensure_future(self._poll())  # kept: a task must be referenced
            if self._hold_until > now:
                await self._sleep(self._hold_until - now)
                continue
            if not self.paced:
                return
            if not self._slots:
                await self._lease(tokens)
                continue
            slot = self._slots.popleft()
            if slot > now:
                await self._sleep(slot - now)
            if self._hold_until <= self._clock():
                return
            # A hold began while we slept: this slot is void.

    async def _lease(self, tokens: int) -> None:
        """One lease call at a time; concurrent acquirers wait for it."""
        if self._leasing is not None:
            await asyncio.shield(self._leasing)
            return
        self._leasing = asyncio.get_running_loop().create_future()
        try:
            returned, self._returned_tokens = self._returned_tokens, 0
            successes, self._successes = self._successes, 0
            lease: Lease = await self._actor.lease.remote(self._lease_size, tokens, returned, successes)
            now = self._clock()
            self._slots.extend(now + delay for delay in lease.delays_s)
            self._hold_here(now + lease.hold_s)
        finally:
            self._leasing.set_result(None)
            self._leasing = None

    async def _poll(self) -> None:
        try:
            hold_s: float = await self._actor.hold_s.remote()
            self._hold_here(self._clock() + hold_s)
        finally:
            self._polling = None

    def release(
        self,
        permit: Permit,
        *,
        ok: bool,
        headers: Any = None,
        rate_limited: bool = False,
        retry_after_s: float | None = None,
        prompt_tokens: int | None = None,
        total_tokens: int | None = None,
    ) -> None:
        super().release(
            permit,
            ok=ok,
            headers=headers,
            rate_limited=rate_limited,
            retry_after_s=retry_after_s,
            prompt_tokens=prompt_tokens,
            total_tokens=total_tokens,
        )
        if rate_limited:
            self._actor.rate_limited.remote(self._clock() - permit.sent_at)
        elif ok:
            self._successes += 1
        if self._token_s:
            used = 0 if rate_limited else (total_tokens if total_tokens is not None else permit.tokens)
            self._returned_tokens += permit.tokens - used

    def hold(self, until: float) -> None:
        """A hold this worker learned of: here at once, and for every other worker."""
        before = self._hold_until
        self._hold_here(until)
        if self._hold_until > before:
            self._actor.hold.remote(self._hold_until - self._clock())

    def _hold_here(self, until: float) -> None:
        super().hold(until)
        while self._slots and self._slots[0] < self._hold_until:
            self._slots.popleft()


class ClusterBudget(BudgetGuard):
    """A worker's BudgetGuard spending money granted by the actor, a few rows' worth at a time.

    `reserve` is synchronous (the core calls it so): a grant is one blocking call, made once per
    BUDGET_CHUNK_ROWS x width rows, on the worker's own thread.
    """

    def __init__(self, actor: Any, limit_usd: float, width: int, get: Callable[[Any], Any]):
        super().__init__(limit_usd)
        self._actor = actor
        self._get = get  # ray.get
        self._rows_per_grant = BUDGET_CHUNK_ROWS * width
        self.granted_usd = 0.0

    def reserve(self, worst_usd: float) -> bool:
        if self.stopped:
            return False
        free = self.granted_usd - self.spent_usd - self.reserved_usd
        if free < worst_usd:
            want = max(worst_usd - free, worst_usd * self._rows_per_grant)
            self.granted_usd += self._get(self._actor.grant.remote(want))
            if self.granted_usd - self.spent_usd - self.reserved_usd < worst_usd:
                self.stopped = True
                return False
        self.reserved_usd += worst_usd
        return True

    def give_back(self) -> None:
        """Return what this worker was granted and did not spend (call when its run ends)."""
        unspent = self.granted_usd - self.spent_usd - self.reserved_usd
        if unspent > 0:
            self._get(self._actor.give_back.remote(unspent))
            self.granted_usd -= unspent
