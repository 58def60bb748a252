"""What leaves a run besides its result: the run's start, each finished row, lines to show the
user, and a changed status. The core never prints; each driver renders these its own way
(progress.py: a bar on a terminal or in a notebook, plain lines in a log)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from batchrun.results import RowResult, RowTally

# info: how the run goes (resuming, a stop); note: something the user may want to know;
# warning: something the user should act on, shown even when quiet.
Level = Literal["info", "note", "warning"]


@dataclass(frozen=True)
class RunStarted:
    total: int  # rows in scope, finished before this run included
    done_before: Mapping[str, int]  # rows finished before this run, by status
    cost_usd: float | None = None  # spent before this run; None: the model has no price
    tokens: int = 0  # used before this run (as cost_usd: by the results the rows use)
    without_usage: int = 0  # answers before this run that reported no usage
    budget_usd: float | None = None
    status: Callable[[], str] | None = None  # the limiter's or breaker's state, read when drawn
    # done_before, cost_usd and tokens still being counted (while the first rows go out): what to
    # add to them once it is done
    counted: asyncio.Future[RowTally] | None = None
    # rows in `total` that are never sent, found so far: they reuse another row's answer (dedupe)
    reused: Callable[[], int] | None = None


class Events(Protocol):
    def started(self, run: RunStarted) -> None: ...

    def row_finished(self, result: RowResult) -> None: ...

    def say(self, message: str, level: Level = "info") -> None: ...

    def status_changed(self) -> None: ...

    def finished(self) -> None:
        """No more rows finish in this run: what follows is writing the output and the reports
        (a progress bar stops its clock here, so their time is not taken for the rows')."""
