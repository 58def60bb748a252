"""Progress on stderr: a tqdm bar on a terminal, plain periodic lines otherwise, nothing with -q."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

from batchrun.checkpoint import RowResult

PLAIN_INTERVAL_S = 10.0  # cron and CI logs want a line now and then, not a redrawn bar
POSTFIX_INTERVAL_S = 0.5


class Progress:
    """Counts finished rows; resumed rows start out counted as done."""

    def __init__(
        self,
        total: int,
        done_before: int,
        quiet: bool,
        stream: TextIO | None = None,
        *,
        cost_usd: float | None = None,  # spent before this run; None: the model has no price
        budget_usd: float | None = None,
    ):
        self.total = total
        self.done = done_before
        self.ok = 0
        self.failed = 0
        self.tokens = 0
        self.status: Callable[[], str] | None = None  # more to show, e.g. the in-flight limit
        self.cost_usd = cost_usd
        self._budget_usd = budget_usd
        self._quiet = quiet
        self._stream = stream or sys.stderr
        self._started = time.monotonic()
        self._done_at_start = done_before
        self._bar: tqdm[None] | None = None
        if not quiet and self._stream.isatty():
            self._bar = tqdm(
                total=total,
                initial=done_before,
                unit="row",
                file=self._stream,
                dynamic_ncols=True,
                smoothing=0.1,
            )
        self._next_update = self._started + (0 if self._bar else PLAIN_INTERVAL_S)

    def row_finished(self, result: RowResult) -> None:
        self.done += 1
        if result.status == "ok":
            self.ok += 1
        else:
            self.failed += 1
        self.tokens += result.total_tokens or 0
        if self.cost_usd is not None:
            self.cost_usd += result.cost_usd or 0.0
        if self._bar is not None:
            self._bar.update(1)
        now = time.monotonic()
        if now >= self._next_update:
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._counts(), refresh=False)
            self._next_update = now + POSTFIX_INTERVAL_S
        elif not self._quiet:
            if now > self._started:
                print(
                    f"progress: {self.done}/{self.total} rows, {self._rate(now):.1f} rows/s, "
                    f"{self._counts()}",
                    file=self._stream,
                    flush=True,
                )
            self._next_update = now + PLAIN_INTERVAL_S

    def _counts(self) -> str:
        counts = f"ok={self.ok} failed={self.failed} tokens={self.tokens:,}"
        if self.cost_usd is not None:
            counts += f" cost=${self.cost_usd:.4f}"
            counts += f" of ${self._budget_usd:g}" if self._budget_usd is not None else ""
        return f"{counts} {self.status()}" if self.status else counts

    def _rate(self, now: float) -> float:
        return (self.done - self._done_at_start) / max(now - self._started, 1e-9)

    def refresh_status(self) -> None:
        """Redraw the bar's postfix now: during an outage no row finishes to trigger it."""
        if self._bar is not None:
            self._bar.set_postfix_str(self._counts())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._counts(), refresh=False)
            self._bar.close()

    def say(self, message: str) -> None:
        """A line that does not tear the bar (tqdm.write), unless quiet."""
        if self._quiet:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)
