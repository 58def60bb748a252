"""One rate limit and one money budget for every worker of a cluster run.

`ClusterLimits` is the state of one Ray actor per run: the job's pacing (requests and tokens per
minute, GCRA as in limits.py), the holds a 429 or spent `x-ratelimit-*` headers call for, the
allowance those headers leave, the slowdown after a 429, and the money budget. Workers do not ask
it once per request:

* `ClusterLimiter` (in each worker, in place of limits.Limiter) leases slots a few at a time,
  about LEASE_WINDOW_S of the rate per call, each slot a delay from the actor's now (no clock is
  shared between nodes). A hold seen by one worker goes to the actor, and every other worker
  learns of it within POLL_S: its leased slots inside the hold are dropped.
* Every leased slot is counted as sent (a ticket), so an `x-ratelimit-remaining-*` answer is
  accounted for the whole cluster: what remained when the server counted a request, less every
  ticket that may have gone out after it, is what the cluster may still send before the reset;
  leases stop there and the cluster holds until the reset. What may have gone out after a
  request: when paced, the slots leased after its own (slots are timed in the order they are
  leased); unpaced (no rate_limit), also those of the other workers' leases still in hand when
  its own was leased (a worker leases again only once its slots are spent). So unpaced workers
  lease too: slots without delays, a worker's width at a time.
* A slot is leased at the asking request's token estimate; the request that takes it settles the
  difference: a larger one pushes this worker's later slots back at once, and the cluster's pace
  at its next lease.
* `ClusterBudget` (in place of budget.BudgetGuard) is granted money a few rows' worst case at a
  time and reserves from that locally; the actor never grants past max_cost_usd, so the workers'
  reservations together cannot pass it. A worker gives back what it has not reserved with every
  batch it returns, so a worker that dies strands only its requests in flight (their answers may
  be billed) and what it was granted since its last batch.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from batchrun.budget import BudgetGuard
from batchrun.limits import PACED_CREEP, PACED_EASE, RESET_MARGIN_S, Limiter, Permit, RateLimitHeaders

LEASE_WINDOW_S = 0.05  # a lease covers about this much of the rate: the limit's granularity per worker
MAX_LEASE = 256  # slots per lease, at most
POLL_S = 0.1  # how often a worker asks for the cluster's hold when it has no lease to ask for
BUDGET_CHUNK_ROWS = 4  # money granted per call: this many rows' worst case (times the worker's width)


@dataclass(frozen=True)
class Lease:
    delays_s: list[float]  # each slot's delay from when the actor granted it
    hold_s: float  # how long the cluster's hold lasts from then (0: none)
    floor: int  # tickets from here on may go out after this lease's slots (others' leases in hand)
    tokens_floor: int  # the same, in tokens charged


@dataclass
class _Allowance:
    """What an x-ratelimit-remaining-* answer left the cluster until its reset."""

    left: int  # tickets (or tokens) that may still be issued after `at`
    at: int  # the count of issued tickets (or tokens) when it was learnt
    reset_at: float


class ClusterLimits:
    """The limiter actor's state: pacing, holds, the server's allowance and the money budget of
    the whole cluster."""

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
        self.issued = 0  # tickets: slots leased, each counted as a request sent
        self.tokens_issued = 0  # tokens charged for them (and debts settled)
        self._in_hand: dict[str, tuple[int, int]] = {}  # holder -> its latest lease's first ticket, token
        self._requests_left: _Allowance | None = None
        self._tokens_left: _Allowance | None = None

    def lease(
        self, holder: str, count: int, tokens: int, returned_tokens: int = 0, successes: int = 0
    ) -> Lease:
        """Up to `count` paced slots of `tokens` each for `holder` (fewer when the server's
        allowance is nearly spent); settles tokens charged but not used (negative: a debt), and
        lets the pace creep back by the successes reported since the last lease."""
        now = self._clock()
        self._token_tat -= returned_tokens * self._token_s * self.slowdown
        self.tokens_issued += max(0, -returned_tokens)
        if successes and self.slowdown > 1.0:
            self.slowdown = 1.0 + (self.slowdown - 1.0) * (1 - PACED_CREEP) ** successes
        count = self._allowed(count, tokens, now)
        first = (self.issued, self.tokens_issued)
        self._in_hand[holder] = first
        # Paced slots go out in the order they are leased (each is timed after the one before),
        # so only the slots leased after one may follow it; unpaced slots go whenever taken.
        paced = self._request_s or self._token_s
        others = [] if paced else [in_hand for who, in_hand in self._in_hand.items() if who != holder]
        delays = []
        for _ in range(count):
            slot = max(now, self._request_tat, self._token_tat, self._hold_until)
            self._request_tat = slot + self._request_s * self.slowdown
            self._token_tat = slot + tokens * self._token_s * self.slowdown
            delays.append(slot - now)
        self.issued += count
        self.tokens_issued += count * tokens
        self.leases += 1
        self.slots += count
        return Lease(
            delays,
            self.hold_s(now),
            min([first[0], *(t for t, _ in others)]),
            min([first[1], *(t for _, t in others)]),
        )

    def _allowed(self, count: int, tokens: int, now: float) -> int:
        """How many of `count` slots the server's allowance leaves; none left: hold until its
        reset, after which the slots go."""
        for allowance, issued, each in (
            (self._requests_left, self.issued, 1),
            (self._tokens_left, self.tokens_issued, tokens),
        ):
            if allowance is None or allowance.reset_at <= now:
                continue
            room = (allowance.left - (issued - allowance.at)) // max(1, each)
            if room <= 0:
                self.hold(allowance.reset_at - now)
            else:
                count = min(count, room)
        return count

    def allowance(
        self, headers: RateLimitHeaders, since: int, tokens_since: int, resets_s: tuple[float, float]
    ) -> float:
        """A worker's answer said what remained when the server counted its request; `since`
        (`tokens_since`) is the ticket (token) count from which sends may have followed it,
        `resets_s` the resets from now. Returns the cluster's hold from now."""
        now = self._clock()
        for remaining, issued, reset_s, name in (
            (headers.remaining_requests, self.issued, resets_s[0], "_requests_left"),
            (headers.remaining_tokens, self.tokens_issued, resets_s[1], "_tokens_left"),
        ):
            if remaining is None or reset_s <= 0:
                continue
            left = remaining - (issued - (tokens_since if name == "_tokens_left" else since))
            setattr(self, name, _Allowance(left, issued, now + reset_s))
            if left <= 0:
                self.hold(reset_s)
        return self.hold_s(now)

    def forget(self, holder: str) -> None:
        """`holder` leases no more (its shard ended, or it died): its slots are no longer in hand."""
        self._in_hand.pop(holder, None)

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
    """A worker's limits.Limiter whose pacing, holds and x-ratelimit allowance are the cluster's
    (see the module doc); the in-flight limit (and its AIMD when the job sets no rate_limit) stays
    the worker's own. The base's send counters (`_sent`, `_tokens_sent`, a permit's
    `sent_before`, `tokens_before`) count the cluster's tickets here: from which count on other
    sends may have followed a permit's."""

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
        holder: str = "",  # names this worker's leases to the actor
    ):
        super().__init__(
            concurrency, requests_per_minute, tokens_per_minute, max_tokens, max_hold_s, clock, sleep
        )
        self._actor = actor
        self._holder = holder or str(id(self))
        per_s = (requests_per_minute or 0) / 60
        paced_size = math.ceil(per_s * LEASE_WINDOW_S) if self.paced else MAX_LEASE
        self._lease_size = max(1, min(MAX_LEASE, concurrency, paced_size))
        # (local clock time, `since`, `tokens_since`, tokens charged) of each leased slot
        self._slots: collections.deque[tuple[float, int, int, int]] = collections.deque()
        self._leasing: asyncio.Future[None] | None = None
        self._polling: asyncio.Future[None] | None = None
        self._reports: set[asyncio.Future[None]] = set()
        self._polled = -math.inf
        self._returned_tokens = 0
        self._successes = 0

    async def _wait_turn(self, chars: int) -> int:
        tokens = self.estimate_tokens(chars)
        while True:
            now = self._clock()
            if now - self._polled >= POLL_S and self._polling is None:
                self._polled = now
                self._polling = asyncio.ensure_future(self._poll())  # kept: a task must be referenced
            if self._hold_until > now:
                await self._sleep(self._hold_until - now)
                continue
            if not self._slots:
                await self._lease(tokens)
                continue
            at, since, tokens_since, charged = self._slots.popleft()
            if at > now:
                await self._sleep(at - now)
            if self._hold_until > self._clock():
                continue  # a hold began while we slept: this slot is void
            self._charge(tokens - charged)
            self._sent, self._tokens_sent = since, tokens_since
            return tokens

    def _charge(self, extra: int) -> None:
        """This request's tokens beyond (or short of) what its slot was leased at: settled with
        the cluster at the next lease; a debt pushes this worker's later slots back now."""
        if not self._token_s or not extra:
            return
        self._returned_tokens -= extra
        if extra > 0:
            shift = extra * self._token_s
            self._slots = collections.deque((at + shift, a, b, c) for at, a, b, c in self._slots)

    async def _lease(self, tokens: int) -> None:
        """One lease call at a time; concurrent acquirers wait for it."""
        if self._leasing is not None:
            await asyncio.shield(self._leasing)
            return
        self._leasing = asyncio.get_running_loop().create_future()
        try:
            returned, self._returned_tokens = self._returned_tokens, 0
            successes, self._successes = self._successes, 0
            lease: Lease = await self._actor.lease.remote(
                self._holder, self._lease_size, tokens, returned, successes
            )
            now = self._clock()
            self._slots.extend(
                (now + delay, lease.floor + i + 1, lease.tokens_floor + (i + 1) * tokens, tokens)
                for i, delay in enumerate(lease.delays_s)
            )
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

    def _learn(self, permit: Permit, headers: RateLimitHeaders) -> None:
        """What the server said remains is the cluster's to account (the actor's `allowance`);
        none left holds this worker at once, and every other through the actor."""
        now = self._clock()
        resets = (
            permit.sent_at + (headers.reset_requests_s or 0.0) + RESET_MARGIN_S - now,
            permit.sent_at + (headers.reset_tokens_s or 0.0) + RESET_MARGIN_S - now,
        )
        if headers.remaining_requests == 0:
            self._hold_here(now + resets[0])
        if headers.remaining_tokens == 0:
            self._hold_here(now + resets[1])
        report = asyncio.ensure_future(self._report(headers, permit, resets))
        self._reports.add(report)
        report.add_done_callback(self._reports.discard)

    async def _report(self, headers: RateLimitHeaders, permit: Permit, resets: tuple[float, float]) -> None:
        hold_s: float = await self._actor.allowance.remote(
            headers, permit.sent_before, permit.tokens_before, resets
        )
        self._hold_here(self._clock() + hold_s)

    def hold(self, until: float) -> None:
        """A hold this worker learned of: here at once, and for every other worker."""
        before = self._hold_until
        self._hold_here(until)
        if self._hold_until > before:
            self._actor.hold.remote(self._hold_until - self._clock())

    def _hold_here(self, until: float) -> None:
        super().hold(until)
        while self._slots and self._slots[0][0] < self._hold_until:
            self._slots.popleft()

    def close(self) -> None:
        """This worker's shard is over: its leases are no longer in hand."""
        self._actor.forget.remote(self._holder)


class ClusterBudget(BudgetGuard):
    """A worker's BudgetGuard spending money granted by the actor, a few rows' worth at a time.

    `reserve` is synchronous (the core calls it so): a grant is one blocking call, made once per
    BUDGET_CHUNK_ROWS x width rows (and after each `report`), on the core's thread; `report` runs
    on the thread that returns the batches, hence the lock.
    """

    def __init__(self, actor: Any, limit_usd: float, width: int, get: Callable[[Any], Any]):
        super().__init__(limit_usd)
        self._actor = actor
        self._get = get  # ray.get
        self._rows_per_grant = BUDGET_CHUNK_ROWS * width
        self._lock = threading.Lock()
        self.granted_usd = 0.0

    def reserve(self, worst_usd: float) -> bool:
        with self._lock:
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

    def settle(self, reserved_usd: float, cost_usd: float | None) -> None:
        with self._lock:
            super().settle(reserved_usd, cost_usd)

    def report(self) -> None:
        """Give back what this worker was granted and has not reserved: with every batch it
        returns (so that its death strands little) and when its shard ends."""
        with self._lock:
            unreserved = self.granted_usd - self.spent_usd - self.reserved_usd
            if unreserved > 0:
                self._get(self._actor.give_back.remote(unreserved))
                self.granted_usd -= unreserved
