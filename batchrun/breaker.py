"""A circuit breaker for outages: when the endpoint stops answering, stop sending and probe.

Evidence is `EndpointDown` only (no answer at all, or a gateway's 502/503/504): 429s belong to
the limiter, and other errors are answers. After `threshold` such failures in a row with no
answer between them the breaker opens: workers hold, and one real request at a time probes,
at intervals that double from `first_probe_s` up to `max_probe_s`. Any answer closes it. An
outage longer than `max_outage_s` is the caller's cue to stop the job.

Time comes from `clock` (monotonic seconds), so tests drive it by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_PROBE_S = 30.0


class Breaker:
    """The breaker's state; the pipeline asks it before each attempt and tells it each outcome."""

    def __init__(
        self,
        threshold: int,
        first_probe_s: float,
        max_outage_s: float,
        max_probe_s: float = MAX_PROBE_S,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.threshold = threshold
        self.max_outage_s = max_outage_s
        self._first_probe_s = first_probe_s
        self._max_probe_s = max(max_probe_s, first_probe_s)
        self._clock = clock
        self._wall = wall
        self.failures = 0  # EndpointDown failures since the last answer
        self.is_open = False
        self.probing = False  # a probe is in flight
        self.down_since = 0.0  # clock time of the first failure of the run
        self.down_since_wall = 0.0  # the same, as wall-clock time, for people
        self._interval = first_probe_s
        self._next_probe_at = 0.0

    def failed(self, probe: bool = False) -> bool:
        """An attempt got no answer; True if this failure opened the breaker."""
        now = self._clock()
        if self.failures == 0:
            self.down_since, self.down_since_wall = now, self._wall()
        self.failures += 1
        if probe:
            self.probing = False
            self._interval = min(self._interval * 2, self._max_probe_s)
            self._next_probe_at = now + self._interval
        if self.is_open or self.failures < self.threshold:
            return False
        self.is_open = True
        self._interval = self._first_probe_s
        self._next_probe_at = now + self._interval
        return True

    def answered(self) -> bool:
        """Any answer but EndpointDown: the endpoint is there. True if this closed the breaker."""
        was_open = self.is_open
        self.failures = 0
        self.is_open = self.probing = False
        return was_open

    def try_probe(self) -> bool:
        """While open: whether this attempt may go out now as the one probe."""
        if not self.is_open or self.probing or self._clock() < self._next_probe_at:
            return False
        self.probing = True
        return True

    @property
    def expired(self) -> bool:
        """Open for longer than max_outage_s, counted from the first failure."""
        return self.is_open and self._clock() - self.down_since >= self.max_outage_s

    def wait_s(self) -> float:
        """How long a held attempt may sleep before something is due (a probe or the deadline)."""
        now = self._clock()
        deadline = self.down_since + self.max_outage_s
        due = deadline if self.probing else min(self._next_probe_at, deadline)
        return max(0.0, due - now)

    def describe(self) -> str:
        """For the progress line: since when, and when the next probe goes."""
        since = time.strftime("%H:%M:%S", time.localtime(self.down_since_wall))
        if self.probing:
            return f"endpoint down since {since}; probing"
        wait = max(0.0, self._next_probe_at - self._clock())
        return f"endpoint down since {since}; next probe in {wait:.0f} s"


class SameFailure:
    """The first answers of a job all failing the same permanent way: the job's fault, not its rows'.

    Fed every attempt's answer in order: None for a good one, else (status, message). Decided
    (never again doomed) by a good answer or a different failure; doomed after `needed` alike.
    """

    def __init__(self, needed: int):
        self.needed = needed
        self.seen = 0
        self.undecided = True
        self._failure: tuple[int, str] | None = None

    def answer(self, failure: tuple[int, str] | None) -> bool:
        """Count one answer; True when the first `needed` answers were all this same failure."""
        if not self.undecided:
            return False
        if failure is None or (self._failure is not None and failure != self._failure):
            self.undecided = False
            return False
        self._failure = failure
        self.seen += 1
        return self.seen >= self.needed
