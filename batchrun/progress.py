"""Renders a run's events (events.py) on stderr: a tqdm bar on a terminal, tqdm.auto's widget in a
notebook, plain periodic lines in a log, no progress when quiet (warnings still show)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Never, TextIO

from tqdm import tqdm

from batchrun.events import Level, RunStarted
from batchrun.results import RowResult, RowStatus, RowTally
from batchrun.terminal import printable

if TYPE_CHECKING:
    from IPython.display import DisplayHandle

PLAIN_INTERVAL_S = 10.0  # cron and CI logs want a line now and then, not a redrawn bar
BAR_INTERVAL_S = 0.2


class Progress:
    """Counts finished rows; rows finished before this run (a resume) start out counted.

    The bar's count and its ok= / failed= / skipped= are one count: both are drawn together, at
    most every BAR_INTERVAL_S, never the count on its own (tqdm would draw it on every update).
    """

    def __init__(self, quiet: bool, stream: TextIO | None = None, *, notebook: bool = False):
        self.total = 0
        self.ok = self.failed = self.skipped = self.done = 0
        self.run = RowTally()  # this run's rows
        self.earlier = RowTally()  # tokens used before this run, counted as cost_usd is
        self.status: Callable[[], str] | None = None  # more to show, e.g. the in-flight limit
        self.cost_usd: float | None = None
        self._budget_usd: float | None = None
        self._quiet = quiet
        self._notebook = notebook
        self._stream = stream or sys.stderr
        self._started = time.monotonic()
        self._done_at_start = 0
        self._bar: tqdm[Never] | None = None  # a bar over no iterable
        self._next_update = self._started + PLAIN_INTERVAL_S
        self._counted: asyncio.Future[RowTally] | None = None
        self._reused: Callable[[], int] | None = None
        self._shown: DisplayHandle | None = None  # the notebook widget's display, and the widget
        self._widget: Any = None

    def started(self, run: RunStarted) -> None:
        """Rows finished before this run (a resume) start out counted."""
        self.total = run.total
        self.ok = run.done_before.get(RowStatus.OK, 0)
        self.failed = run.done_before.get(RowStatus.FAILED, 0)
        self.skipped = run.done_before.get(RowStatus.SKIPPED, 0)
        self.done = self._done_at_start = self.ok + self.failed + self.skipped
        self.cost_usd = run.cost_usd
        self.earlier = RowTally(tokens=run.tokens, without_usage=run.without_usage)
        self._budget_usd = run.budget_usd
        self.status = run.status or self.status
        self._counted = run.counted
        self._reused = run.reused
        self._started = time.monotonic()
        if not self._quiet and (self._notebook or self._stream.isatty()):
            self._bar = self._open_bar()
        self._next_update = self._started + (BAR_INTERVAL_S if self._bar else PLAIN_INTERVAL_S)

    def _open_bar(self) -> tqdm[Never]:
        """The terminal's bar, or under Jupyter tqdm.auto's widget, shown with a display id: a
        saved notebook keeps the widget's text form, which close() then updates to the end."""
        options: dict[str, Any] = {
            "total": self.total,
            "initial": self.done,
            "postfix": self._counts(),
            "unit": "row",
            "file": self._stream,
            "dynamic_ncols": True,
            "smoothing": 0.1,
            "mininterval": 0,  # update() is called only when a line is due, and draws it
            "miniters": 1,  # nor does tqdm's monitor thread redraw on its own
        }
        if not self._notebook:
            return tqdm(**options)
        from tqdm import auto, notebook

        if not issubclass(auto.tqdm, notebook.tqdm_notebook):  # no ipywidgets: the terminal's bar
            return auto.tqdm(**options)
        from IPython.display import display

        bar = auto.tqdm(display=False, **options)
        assert isinstance(bar, notebook.tqdm_notebook)
        self._widget = bar.container
        self._shown = display(self._widget, display_id=True)  # type: ignore[no-untyped-call]  # IPython's
        return bar

    def _take_counted(self) -> None:
        """Rows finished before this run, counted while the first rows went out: counted from
        the start, as if they had been known then (not in this run's rate)."""
        counted, self._counted = self._counted, None
        assert counted is not None
        if counted.cancelled() or counted.exception() is not None:
            return  # the runner raises it
        done = counted.result()
        counts = done.by_status
        self.ok += counts.get(RowStatus.OK, 0)
        self.failed += counts.get(RowStatus.FAILED, 0)
        self.skipped += counts.get(RowStatus.SKIPPED, 0)
        n = sum(counts.values())
        self.done += n
        self._done_at_start += n
        if self.cost_usd is not None:
            self.cost_usd += done.cost_usd
        self.earlier.tokens += done.tokens
        self.earlier.without_usage += done.without_usage
        if self._bar is not None:
            self._bar.initial += n
            self._bar.n += n
            self._bar.last_print_n += n

    def row_finished(self, result: RowResult) -> None:
        if self._counted is not None and self._counted.done():
            self._take_counted()
        self.done += 1
        self.run.add(result)
        if result.status == RowStatus.OK:
            self.ok += 1
        elif result.status == RowStatus.SKIPPED:
            self.skipped += 1
        else:
            self.failed += 1
        if self.cost_usd is not None:
            self.cost_usd += result.cost_usd or 0.0
        now = time.monotonic()
        if now >= self._next_update:
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        if self._bar is not None:
            self._draw()
            self._next_update = now + BAR_INTERVAL_S
        elif not self._quiet:
            if now > self._started:
                print(
                    f"progress: {self.shown}/{self.total} rows, {self._rate(now):.1f} rows/s, "
                    f"{self._counts()}",
                    file=self._stream,
                    flush=True,
                )
            self._next_update = now + PLAIN_INTERVAL_S

    def _draw(self) -> None:
        """The count and the counts in one line: the postfix first, then the update that draws."""
        assert self._bar is not None
        self._bar.set_postfix_str(self._counts(), refresh=False)
        self._bar.update(self.shown - self._bar.n)

    @property
    def shown(self) -> int:
        """The bar's count: rows finished, and rows that reuse another row's answer (dedupe):
        they are in its total and never sent."""
        return self.done + (self._reused() if self._reused else 0)

    def _counts(self) -> str:
        counts = f"ok={self.ok} failed={self.failed}"
        counts += f" skipped={self.skipped}" if self.skipped else ""
        counts += f" reused={reused}" if self._reused and (reused := self._reused()) else ""
        counts += f" tokens={self._tokens()}"
        if self.cost_usd is not None:
            counts += f" cost=${self.cost_usd:.4f}"
            counts += f" of ${self._budget_usd:g}" if self._budget_usd is not None else ""
        return f"{counts} {self.status()}" if self.status else counts

    @property
    def run_tokens(self) -> int | None:
        """This run's tokens; None when answers came and none reported usage."""
        return self.run.known_tokens

    def _tokens(self) -> str:
        """The job's tokens, as cost= is the job's (a resume's earlier rows too): unknown when no
        answer reported usage; `N+` when some did not (their share is missing)."""
        tokens = self.earlier.tokens + self.run.tokens
        without_usage = self.earlier.without_usage + self.run.without_usage
        if without_usage and not tokens:
            return "unknown"
        return f"{tokens:,}+" if without_usage else f"{tokens:,}"

    def _rate(self, now: float) -> float:
        return (self.done - self._done_at_start) / max(now - self._started, 1e-9)

    def status_changed(self) -> None:
        """Redraw the bar's postfix now: during an outage no row finishes to trigger it."""
        if self._bar is not None:
            self._bar.set_postfix_str(self._counts())

    def finished(self) -> None:
        self.close()

    def close(self) -> None:
        if self._counted is not None and self._counted.done():
            self._take_counted()
        if self._bar is not None:
            self._draw()
            self._bar.close()
            if self._shown is not None:  # without the widget's state, a notebook shows its text
                self._shown.update(self._widget)  # type: ignore[no-untyped-call]  # IPython's, unannotated
            self._bar = None

    def say(self, message: str, level: Level = "info") -> None:
        """A line that does not tear the bar (tqdm.write); when quiet, warnings only: -q silences
        the chatter, not what the user should act on."""
        if self._quiet and level != "warning":
            return
        message = printable(message)  # it may quote a server's words
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)
