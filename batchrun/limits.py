"""Keep every allowed request slot busy without tripping the provider's rate limits.

One `Limiter` per run, shared by all workers; each attempt is `acquire` → send → `release`.

* Pacing (when the job sets `rate_limit`): requests and tokens are spaced evenly over the minute
  (GCRA, no burst allowance), because providers such as xAI enforce per-second slices of a
  minute limit. Waiters take their slots in turn, each at most PACE_HORIZON_S ahead. Tokens are
  reserved when a slot is taken (estimated prompt + max_tokens) and the difference is given
  back when the usage comes in; they are paced at a second's budget less the largest request,
  as unequal requests spaced evenly at the full budget put one too many into some seconds.
  The configured rate is the user's belief; a 429 is the server's fact: pacing slows by
  PACED_EASE (once per round trip) and creeps back on successes, never above the configured
  rate and, once refused, not above 1/PACED_FLOOR of it: against a sliding-window limit, pacing
  at exactly the limit is refused whenever jitter brings two requests 1 s apart closer.
* A hold (always): when the server says its budget is spent (a 429 with Retry-After, or
  `x-ratelimit-remaining-*` no larger than what we already sent since) every worker waits until
  it resets, not only the one that was told.
* A pace learnt from the server (always): `x-ratelimit-limit-*` headers that count a minute, as
  OpenAI's do, pace requests (tokens) at limit/60 a second, evenly, as a configured rate would
  be (the slower of the two wins). Their remaining and reset never run short while the server
  enforces the minute in 1 s slices, so only the pace keeps a run inside those; 429s ease it.
  A header counts a minute when its budget refills at about limit/60 a second:
  (limit - remaining) / reset. Per-second counts (and per-day ones) refill far faster (slower)
  and teach no pace.
* An AIMD in-flight limit (when no `rate_limit` is set): halved on a 429 when no pace is known,
  at most once per round trip, grown by one per round trip of successes while it is fully
  used, never above `concurrency`. After a hold, at most that many requests go out at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

INITIAL_CHARS_PER_TOKEN = 3.0  # low on purpose: an early estimate should err towards more tokens
# The server counted a request at some instant between our sending it and its answer; a reset
# is timed from the sending, which may be that much early: this margin covers the transit.
RESET_MARGIN_S = 0.005
UNSAID_RETRY_AFTER_S = 1.0  # a 429 that names no wait: the common length of a limit's window
PACED_EASE = 1.03  # a 429 while paced: intervals this much longer
# Each success takes this fraction off the slowdown's excess over the configured rate: an ease
# costs about (PACED_EASE - 1) / PACED_CREEP = 3 request slots in all, while 429s that recur within a
# hundred or so requests keep the pace eased. (1.05 and 1/200 cost S3 over 3% of the limit.)
PACED_CREEP = 1 / 100
# Once refused at the full rate, the pace creeps back only to this slowdown: pacing at exactly a
# per-second limit is refused whenever the machine delays one request and not the one a second
# later, and each refusal costs a retry and an ease; 1% of the limit is a cheaper margin.
PACED_FLOOR = 1.01
# Paced slots are claimed at most this long before they come, not by every waiter at once: a slot
# given far ahead cannot take back the tokens that answers give back meanwhile, and the slots
# given after those give-backs land among it (64 waiters reserving 250 tokens each held slots
# 1 s ahead; S3 by tokens drew 3% 429s).
PACE_HORIZON_S = 0.02
# A header counts a minute when its budget refills within this factor of limit/60 a second: one
# request's rounding in `remaining` can make a single reading up to twice as fast.
MINUTE_REFILL_SLACK = 3.0


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """What a response's `x-ratelimit-remaining-*` / `x-ratelimit-reset-*` headers said."""

    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    limit_requests: int | None = None
    limit_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Permit:
    """One admitted attempt: when it went out, and what had gone out before it."""

    sent_at: float
    sent_before: int  # requests sent before this one
    tokens_before: int  # tokens reserved by requests sent before this one
    tokens: int  # reserved for this one
    chars: int  # prompt characters, to calibrate the token estimate


class Limiter:
    """Admission for every attempt of a run: in-flight limit, pacing, and server-driven holds."""

    def __init__(
        self,
        concurrency: int,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        max_tokens: int | None = None,
        max_hold_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.concurrency = concurrency
        self.adaptive = requests_per_minute is None and tokens_per_minute is None
        self.limit = float(concurrency)  # requests allowed in flight (AIMD when adaptive)
        self.in_flight = 0
        self.rate_limited = 0  # 429 answers seen
        self._max_tokens = max_tokens or 0
        self._max_hold_s = max_hold_s
        self._clock = clock
        self._sleep = sleep
        self.slowdown = 1.0  # paced intervals are this many times the configured (or learnt) ones
        self._floor = 1.0  # the slowdown successes creep back to: PACED_FLOOR after a 429
        self._configured_s = (
            60 / requests_per_minute if requests_per_minute else 0.0,
            60 / tokens_per_minute if tokens_per_minute else 0.0,
        )
        self._request_s, self._token_s = self._configured_s  # the intervals paced at, 0: none
        # The slots (and their tokens) given in about the last second, sent or about to be.
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._largest_tokens = 0  # the most tokens one request used, for the token pace's headroom
        self._request_tat = self._token_tat = 0.0  # theoretical arrival times (GCRA)
        self._hold_until = 0.0
        self._last_cut = -math.inf
        self._sent = 0
        self._tokens_sent = 0
        self._chars = 0  # prompt characters and tokens of finished rows, for calibration
        self._prompt_tokens = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._turn = asyncio.Lock()  # paced slots are claimed one waiter at a time, in order
        # What the latest x-ratelimit-* answer leaves until its reset: (requests or tokens that
        # may still start, what had been sent when it was learnt, the reset's time).
        self._unanswered: set[int] = set()  # the sequence numbers (sent_before) of requests in flight
        self._requests_left: tuple[int, int, float] | None = None
        self._tokens_left: tuple[int, int, float] | None = None

    @property
    def allowed(self) -> int:
        """Requests that may be in flight now (the AIMD limit grows in fractions)."""
        return int(self.limit)

    @property
    def paced(self) -> bool:
        """Whether requests are spaced: a rate configured or learnt from the server."""
        return bool(self._request_s or self._token_s)

    def describe(self) -> str:
        """For the progress bar: requests in flight against the current limit."""
        return f"in_flight={self.in_flight}/{self.allowed}"

    def estimate_tokens(self, chars: int) -> int:
        """Prompt tokens guessed from characters (calibrated on finished rows) plus max_tokens."""
        per_token = self._chars / self._prompt_tokens if self._prompt_tokens else INITIAL_CHARS_PER_TOKEN
        return math.ceil(chars / per_token) + self._max_tokens

    async def acquire(self, chars: int) -> Permit:
        """Wait for an in-flight slot, for any hold to end, and for this request's paced slot."""
        while self.in_flight >= self.allowed or self._waiters:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                self._forget(waiter)
                raise
            if self.in_flight < self.allowed:
                break
        self.in_flight += 1
        try:
            tokens = await self._wait_turn(chars)
        except BaseException:
            self._free()
            raise
        permit = Permit(self._clock(), self._sent, self._tokens_sent, tokens, chars)
        self._unanswered.add(self._sent)
        self._sent += 1
        self._tokens_sent += tokens
        return permit

    async def _wait_turn(self, chars: int) -> int:
        """Wait for this request's turn; the tokens it reserves (estimated when its turn comes,
        on the calibration of the answers that came while it waited)."""
        while True:
            async with self._turn:
                slot, tokens = await self._claim_slot(chars)
            now = self._clock()
            if slot is None or slot <= now:
                return tokens
            await self._sleep(slot - now)
            if self._hold_until <= self._clock():
                return tokens
            # A hold began while we slept: our slot is void; queue again after the hold.

    async def _claim_slot(self, chars: int) -> tuple[float | None, int]:
        """Wait out holds and a spent allowance; when paced, the slot this request goes out at,
        claimed at most PACE_HORIZON_S before it comes (one waiter at a time, in turn)."""
        while True:
            now = self._clock()
            tokens = self.estimate_tokens(chars)
            if self._hold_until > now:
                await self._sleep(self._hold_until - now)
                continue
            if (spent_until := self._allowance_spent(tokens, now)) is not None:
                self.hold(spent_until)
                continue
            if not self.paced:
                self._note(now, tokens)
                return None, tokens
            slot = max(now, self._request_tat, self._token_tat)
            if slot - now > PACE_HORIZON_S:  # look again soon: give-backs may bring the slot nearer
                await self._sleep(min(slot - now - PACE_HORIZON_S, PACE_HORIZON_S))
                continue
            self._request_tat = slot + self._request_s * self.slowdown
            self._token_tat = slot + tokens * self._per_token_s()
            self._note(slot, tokens)
            return slot, tokens

    def _note(self, slot: float, tokens: int) -> None:
        """Keep the last second's slots, which a pace learnt later must count."""
        self._recent.append((slot, tokens))
        while self._recent[0][0] <= slot - 1.0:
            self._recent.popleft()

    def release(
        self,
        permit: Permit,
        *,
        ok: bool,
        headers: RateLimitHeaders | None = None,
        rate_limited: bool = False,
        retry_after_s: float | None = None,
        prompt_tokens: int | None = None,
        total_tokens: int | None = None,
    ) -> None:
        """Account for a finished attempt: free its slot, settle tokens, learn from the answer."""
        self._free()
        self._unanswered.discard(permit.sent_before)
        if headers is not None:  # first: a pace learnt from it settles this request's tokens too
            self._learn(permit, headers)
        if self._token_s:
            # Give back what was reserved but not used (all of it when the server refused), but
            # not into the past: time already gone unused would come back as a burst.
            used = 0 if rate_limited else (total_tokens if total_tokens is not None else permit.tokens)
            settled = self._token_tat + (used - permit.tokens) * self._per_token_s()
            self._token_tat = max(settled, min(self._token_tat, self._clock()))
        if total_tokens is not None and not rate_limited:
            self._largest_tokens = max(self._largest_tokens, total_tokens)
        if prompt_tokens:
            self._chars += permit.chars
            self._prompt_tokens += prompt_tokens
        if rate_limited:
            self.rate_limited += 1
            self.hold(self._clock() + (UNSAID_RETRY_AFTER_S if retry_after_s is None else retry_after_s))
            if permit.sent_at >= self._last_cut:  # one cut per round trip: its 429s are one event
                self._last_cut = self._clock()
                if self.paced:
                    self._floor = PACED_FLOOR
                    self.slowdown *= PACED_EASE
                else:
                    self.limit = max(1.0, self.limit / 2)
            return
        if ok and self.paced and self.slowdown > self._floor:
            self.slowdown = self._floor + (self.slowdown - self._floor) * (1 - PACED_CREEP)
        if ok and self.adaptive and self.limit < self.concurrency and self.in_flight + 1 >= self.allowed:
            # Grow only while the limit was fully used: a limit grown while the server's budget
            # was the brake would be spent in one burst after the next hold.
            self.limit = min(float(self.concurrency), self.limit + 1 / self.limit)
            self._wake()

    def _learn(self, permit: Permit, headers: RateLimitHeaders) -> None:
        """Note how much of the server's remaining budget is left for requests not yet sent,
        and hold at once when none is.

        The server counted this request, but perhaps not those sent after it, nor those sent
        before it still unanswered (requests sent together may arrive in another order); they
        will use up part of the remaining budget, and only the rest may start before the reset.
        The reset is counted from when this request left, the closest we know to when the
        server counted.
        """
        self._learn_pace(headers)
        if headers.remaining_requests is not None:
            before = sum(1 for sent in self._unanswered if sent < permit.sent_before)
            sent_after = self._sent - permit.sent_before - 1 + before
            reset_at = permit.sent_at + (headers.reset_requests_s or 0.0) + RESET_MARGIN_S
            self._requests_left = (headers.remaining_requests - sent_after, self._sent, reset_at)
            if headers.remaining_requests <= sent_after:
                self.hold(reset_at)
        if headers.remaining_tokens is not None:
            tokens_after = self._tokens_sent - permit.tokens_before - permit.tokens
            reset_at = permit.sent_at + (headers.reset_tokens_s or 0.0) + RESET_MARGIN_S
            self._tokens_left = (headers.remaining_tokens - tokens_after, self._tokens_sent, reset_at)
            if headers.remaining_tokens <= tokens_after:
                self.hold(reset_at)

    def _learn_pace(self, headers: RateLimitHeaders) -> None:
        """Pace at limit/60 a second what the headers say is counted by the minute (see the module
        docstring). A new pace counts the slots of the last second as if they had been paced so:
        the burst sent before the first answer is still in the server's last second."""
        configured_request_s, configured_token_s = self._configured_s
        now = self._clock()
        recent = [(slot, tokens) for slot, tokens in self._recent if slot > now - 1.0]
        since = recent[0][0] if recent else now
        requests = _per_minute(headers.limit_requests, headers.remaining_requests, headers.reset_requests_s)
        if requests is not None and (interval := max(configured_request_s, 60 / requests)) != self._request_s:
            self._request_s = interval
            self._request_tat = max(self._request_tat, since + len(recent) * interval * self.slowdown)
        tokens = _per_minute(headers.limit_tokens, headers.remaining_tokens, headers.reset_tokens_s)
        if tokens is not None and (interval := max(configured_token_s, 60 / tokens)) != self._token_s:
            self._token_s = interval
            spent = sum(tokens for _, tokens in recent)
            self._token_tat = max(self._token_tat, since + spent * self._per_token_s())

    def _per_token_s(self) -> float:
        """The token pace's interval per token. Requests of unequal size paced evenly at exactly
        a second's budget put up to one request too many into some second; pacing at the budget
        less the largest request (at most half of it) keeps every second within it."""
        if not self._token_s:
            return 0.0
        budget = 1 / self._token_s
        headroom = min(self._largest_tokens, budget / 2)
        return self._token_s * self.slowdown * budget / (budget - headroom)

    def _allowance_spent(self, tokens: int, now: float) -> float | None:
        """The reset to wait for when what the server said remains is already spent by the
        requests sent since (several answers can arrive before the next request leaves)."""
        if self._requests_left is not None:
            left, sent, reset_at = self._requests_left
            if reset_at <= now:
                self._requests_left = None
            elif self._sent - sent >= left:
                return reset_at
        if self._tokens_left is not None:
            left, sent, reset_at = self._tokens_left
            if reset_at <= now:
                self._tokens_left = None
            elif self._tokens_sent - sent + tokens > left:
                return reset_at
        return None

    def hold(self, until: float) -> None:
        """No attempt starts before `until` (capped at max_hold_s from now); paced slots move past it."""
        now = self._clock()
        until = min(until, now + self._max_hold_s)
        if until <= self._hold_until or until <= now:
            return
        self._hold_until = until
        self._request_tat = max(self._request_tat, until)
        self._token_tat = max(self._token_tat, until)

    def _free(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        """Let as many queued acquirers go as the limit now allows."""
        free = self.allowed - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        """A cancelled acquirer leaves the queue; if it had been woken, the wake-up passes on."""
        if waiter.done() and not waiter.cancelled():
            self._wake()
        else:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)


def _per_minute(limit: int | None, remaining: int | None, reset_s: float | None) -> int | None:
    """`limit` if the headers count it by the minute: what is spent refills at about limit/60 a
    second by the reset."""
    if not limit or remaining is None or not reset_s or remaining >= limit:
        return None
    refill_per_s = (limit - remaining) / reset_s
    return limit if 1 / MINUTE_REFILL_SLACK <= refill_per_s / (limit / 60) <= MINUTE_REFILL_SLACK else None
