"""The simulator's rate limits: enforced over 1 s, told in x-ratelimit-* headers.

A limit of N a minute is enforced as N/60 in any 1 s (a sliding log, as many gateways count, or
whole 1 s slices, as xAI does), because providers enforce minute limits in such slices. The
headers say either what is left of that second (`window`) or, as OpenAI's do, what is left of
the minute (`per-minute`): a budget of N refilled continuously at N/60 a second, whose reset is
the time until it is full again. Per-minute headers show plenty left while the second is spent:
a client must learn the slice from its 429s.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Literal

Window = Literal["sliding", "fixed"]
HeaderMode = Literal["window", "per-minute"]
Kind = Literal["requests", "tokens"]


class _Second:
    """One budget (requests or tokens) of `per_s` in any 1 s: a sliding log or fixed slices."""

    def __init__(self, per_s: int, window: Window) -> None:
        self.per_s = per_s
        self.sliding = window == "sliding"
        self.log: collections.deque[tuple[float, int]] = collections.deque()  # (admitted at, cost)
        self.used = 0  # in the log, or in the current fixed slice
        self.slice_start = -math.inf

    def expire(self, now: float) -> None:
        if self.sliding:
            while self.log and self.log[0][0] <= now - 1.0:
                self.used -= self.log.popleft()[1]
        elif now - self.slice_start >= 1.0:
            self.slice_start, self.used = now, 0

    def fits(self, cost: int) -> bool:
        return self.used + cost <= self.per_s

    def add(self, now: float, cost: int) -> None:
        self.used += cost
        if self.sliding:
            self.log.append((now, cost))

    def reset_s(self, now: float) -> float:
        """Until some of the budget comes back: the oldest entry leaves the log, or the slice ends."""
        if not self.sliding:
            return self.slice_start + 1.0 - now
        return self.log[0][0] + 1.0 - now if self.log else 0.0

    def wait_s(self, now: float, cost: int) -> float:
        """Until `cost` more would fit."""
        if not self.sliding:
            return self.reset_s(now)
        freed = self.used + cost - self.per_s
        for at, spent in self.log:
            freed -= spent
            if freed <= 0:
                return at + 1.0 - now
        return 1.0  # more than a second's budget: never, but a client should not hammer


class _Minute:
    """A budget of `limit` a minute as OpenAI's headers count it, refilled continuously."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.level = float(limit)
        self.at: float | None = None

    def refill(self, now: float) -> None:
        if self.at is not None:
            self.level = min(float(self.limit), self.level + (now - self.at) * self.limit / 60)
        self.at = now

    def remaining(self) -> int:
        return max(0, math.floor(self.level))

    def reset_s(self) -> float:
        return (self.limit - self.level) * 60 / self.limit


@dataclass(frozen=True)
class Verdict:
    """A request's admission: refused for what (requests or tokens), and the headers to send."""

    refused: Kind | None
    headers: dict[str, str]


class RateLimits:
    """rpm and tpm, each enforced per 1 s; their headers per second or per minute."""

    def __init__(self, rpm: int | None, tpm: int | None, window: Window, headers: HeaderMode) -> None:
        given: tuple[tuple[Kind, int | None], ...] = (("requests", rpm), ("tokens", tpm))
        self._limits = {kind: limit for kind, limit in given if limit}
        self._window = window
        self._per_minute = headers == "per-minute"
        self.counts_tokens = "tokens" in self._limits
        self.clear()

    def clear(self) -> None:
        """Every budget full again, as if no request had been made."""
        self._budgets = {
            kind: (_Second(max(1, limit // 60), self._window), _Minute(limit), limit)
            for kind, limit in self._limits.items()
        }

    def admit(self, now: float, tokens: int) -> Verdict:
        """Count a request of `tokens` (0 when tpm is off) if every budget has room for it."""
        costs: dict[Kind, int] = {"requests": 1, "tokens": tokens}
        for second, minute, _ in self._budgets.values():
            second.expire(now)
            minute.refill(now)
        refused: Kind | None = next(
            (k for k, (s, _, _) in self._budgets.items() if not s.fits(costs[k])), None
        )
        if refused is None:
            for kind, (second, minute, _) in self._budgets.items():
                second.add(now, costs[kind])
                minute.level -= costs[kind]
        headers: dict[str, str] = {}
        for kind, (second, minute, limit) in self._budgets.items():
            if self._per_minute:
                remaining, reset = minute.remaining(), go_duration(minute.reset_s())
            else:
                remaining, reset = second.per_s - second.used, f"{second.reset_s(now):.3f}s"
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, remaining))
            headers[f"x-ratelimit-reset-{kind}"] = reset
        if refused is not None:
            wait_s = self._budgets[refused][0].wait_s(now, costs[refused])
            headers["Retry-After"] = str(math.ceil(wait_s))
            headers["retry-after-ms"] = str(math.ceil(wait_s * 1000))
        return Verdict(refused, headers)


def go_duration(seconds: float) -> str:
    """A reset as OpenAI writes it (Go's duration format): `12ms`, `8.64s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"
