"""A Ray worker: the same async core as on one machine, on the shards the driver hands it.

Each shard runs a Core on the worker's own thread and event loop, with its own HTTP pool, its
share of `concurrency`, the cluster's limiter (ClusterLimiter) and budget (ClusterBudget). Rows
finished go back to the driver in batches, one at least every FLUSH_S (the window in which rows
answered are sent again if this worker dies); the worker writes no checkpoint. The API key is
read here, from this worker's environment, never passed in.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from batchrun.core import CoreSettings, RunStats, Stop
from batchrun.cost import Price, output_tokens_cap
from batchrun.distributed.limiter import ClusterBudget, ClusterLimiter
from batchrun.distributed.shards import RowsToRead, read_rows
from batchrun.errors import BatchrunError
from batchrun.events import Level, RunStarted
from batchrun.executors import build_core
from batchrun.loop import run_async
from batchrun.plan import Planned, PreparedJob
from batchrun.results import RowResult

FLUSH_S = 0.25  # finished rows reach the driver within this


@dataclass(frozen=True)
class ShardSettings:
    """What a worker needs besides the job and the rows (no secret: the key is read here)."""

    base_url: str
    simulated: bool
    width: int  # this worker's requests in flight
    grace_s: float
    price: Price | None
    max_cost_usd: float | None
    format_step: int = 0  # the response_format the endpoint took in an earlier run


class _Relay:
    """The core's sink and events: finished rows and warnings onto a queue the shard's generator
    drains; progress is the driver's to draw."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue()

    def record(self, results: Sequence[RowResult]) -> None:
        self.queue.put(("rows", results))

    def started(self, run: RunStarted) -> None:
        pass

    def row_finished(self, result: RowResult) -> None:
        pass

    def say(self, message: str, level: Level = "info") -> None:
        if level != "info":
            self.queue.put(("say", (message, level)))

    def status_changed(self) -> None:
        pass

    def finished(self) -> None:
        pass


class Worker:
    """The actor class (made a Ray actor by the driver, with max_concurrency=2 so that `stop`
    runs beside `run`)."""

    def __init__(self) -> None:
        # One for the actor's life, not per shard: a shard that starts after the driver asked
        # to stop (the request crossed its start) stops at once too.
        self._stop = Stop()

    def stop(self, at_once: bool = False) -> None:
        wanted = 2 if at_once else 1
        while self._stop.requests < wanted:
            self._stop.request()

    def run(
        self,
        job: PreparedJob,
        shard: list[Planned] | RowsToRead,
        settings: ShardSettings,
        limits: Any,
        holder: str = "",
    ) -> Iterator[tuple[str, Any]]:
        """Send the shard (its rows, or which rows to read from the input: shards.py); yield
        ("rows", [RowResult...]) and ("say", (message, level)) as they come, then ("stats",
        RunStats). `holder` names this worker's leases to the limiter actor."""
        import ray

        if self._stop.requests:  # the stop crossed this shard's start: its rows stay pending
            yield "stats", RunStats(0, 0, 0, 0, 0, 0.0, {}, 0, 0, "interrupted")
            return
        if isinstance(shard, RowsToRead):
            try:
                shard = read_rows(job, shard, job.keys(settings.simulated))
            except BatchrunError as exc:  # the job stops, as on a core's error: its rows stay pending
                yield "stats", RunStats(0, 0, 0, 0, 0, 0.0, {}, 0, 0, "aborted", error=exc)
                return
        spec = job.spec
        params = job.params
        relay = _Relay()
        budget = (
            None
            if settings.max_cost_usd is None
            else ClusterBudget(limits, settings.max_cost_usd, settings.width, ray.get)
        )
        limiter = ClusterLimiter(
            limits,
            settings.width,
            spec.rate_limit.requests_per_minute,
            spec.rate_limit.tokens_per_minute,
            max_tokens=output_tokens_cap(params),
            max_hold_s=spec.retry.max_backoff_s,
            holder=holder,
        )
        core = build_core(
            job,
            _each(shard),
            limiter,
            relay.record,
            relay,
            CoreSettings.of(job, settings.width, settings.grace_s, settings.base_url, settings.price),
            simulated=settings.simulated,
            budget=budget,
            stop=self._stop,
            format_step=settings.format_step,
        )
        outcome: list[RunStats | BaseException] = []

        def work() -> None:
            try:
                outcome.append(run_async(core.run()))
            except BaseException as exc:  # handed to the driver below
                outcome.append(exc)
            finally:
                relay.queue.put(("done", None))

        threading.Thread(target=work, name="batchrun-shard", daemon=True).start()
        yield from _drain(relay, budget)
        limiter.close()
        if budget is not None:
            budget.report()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        yield "stats", outcome[0]


def _drain(relay: _Relay, budget: ClusterBudget | None) -> Iterator[tuple[str, Any]]:
    """What the core relays, until it is done: its rows in batches of up to FLUSH_S, its words
    as they come; the budget's spending reported to the cluster with each batch."""
    finished = False
    while not finished:
        batch: list[RowResult] = []
        try:
            kind, item = relay.queue.get(timeout=FLUSH_S)
            while True:
                if kind == "rows":
                    batch.extend(item)
                elif kind == "say":
                    yield kind, item
                else:
                    finished = True
                kind, item = relay.queue.get_nowait()
        except queue.Empty:
            pass
        if batch:
            if budget is not None:
                budget.report()
            yield "rows", batch


async def _each(shard: list[Planned]) -> AsyncIterator[Planned]:
    for planned in shard:
        yield planned
