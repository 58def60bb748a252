"""The Ray driver: the rows still to do, in shards, to N worker actors; the one checkpoint, here.

`concurrency` is the cluster's total: each worker gets an equal share (at least 1), so a job
file means the same load on its endpoint on a laptop and on a cluster. Workers hand finished
rows back within FLUSH_S; only this process writes them to the checkpoint. A shard whose worker
dies goes back to the queue without the rows already received (Ray restarts the actor, and never
retries a call: rows it returned are never asked for again); rows that were in flight are sent
again, as after a restart on one machine.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from batchrun.core import RunStats, Stop
from batchrun.distributed.cluster import connect
from batchrun.distributed.limiter import ClusterLimits
from batchrun.distributed.shards import RowsToRead, workers_read
from batchrun.distributed.worker import ShardSettings, Worker
from batchrun.errors import BatchrunError
from batchrun.events import Events
from batchrun.executors import Execution
from batchrun.plan import IndexedPlan, KeyedPlan, Planned, PreparedJob
from batchrun.results import RowResult, RowTally

if TYPE_CHECKING:
    from batchrun.distributed import RayOptions

SHARDS_PER_WORKER = 4  # smaller shards: a shorter tail, and less to send again after a death
MAX_SHARD_ROWS = 2_000


@dataclass
class WorkerTally:
    """One worker's share of the run, for report.json."""

    rows: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    restarts: int = 0

    def add(self, stats: RunStats) -> None:
        self.requests += stats.requests
        self.retries += sum(stats.retries.values())
        self.rate_limited += stats.rate_limited


@dataclass
class ClusterRun:
    """What the driver needs of run_job: the plan (its key pass runs here, beside the checkpoint),
    where finished rows go, and the run's settings."""

    job: PreparedJob
    plan: KeyedPlan | IndexedPlan
    record: Callable[[Sequence[RowResult]], None]  # the checkpoint's: the one writer
    events: Events
    stop: Stop
    to_send: int  # about how many rows the plan will yield, to size the shards
    width: int
    settings: ShardSettings
    spent_usd: float = 0.0  # before this run, from the checkpoint
    tallies: list[WorkerTally] = field(default_factory=list)


def worker_count(ray: Any, options: RayOptions) -> int:
    return options.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))


def shares(width: int, workers: int) -> int:
    """Each worker's in-flight share of the cluster's `concurrency`."""
    return max(1, -(-width // workers))


async def run_on_cluster(run: ClusterRun, ray_options: RayOptions) -> RunStats:
    """Send the rows still to do through N worker actors; record what they return."""
    ray = connect(ray_options.address)  # a no-op when the driver connected already
    spec = run.job.spec
    workers_n = worker_count(ray, ray_options)
    settings = replace(run.settings, width=shares(run.width, workers_n))
    limits = (
        ray.remote(num_cpus=0)(ClusterLimits)
        .options(max_restarts=-1)  # its state is a pace and a hold: a fresh one errs towards holding less
        .remote(
            spec.rate_limit.requests_per_minute,
            spec.rate_limit.tokens_per_minute,
            spec.retry.max_backoff_s,
            settings.max_cost_usd,
            run.spent_usd,
        )
    )
    actor = ray.remote(num_cpus=0, max_concurrency=2)(Worker)
    workers = [actor.options(max_restarts=-1, max_task_retries=0).remote() for _ in range(workers_n)]
    job_ref = ray.put(run.job)
    read_there = workers_read(run.job)
    run.tallies = [WorkerTally() for _ in workers]
    shards = _Shards(run, workers_n)
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
    stopping = threading.Event()

    def on_stop() -> None:
        stopping.set()
        at_once = run.stop.requests > 1
        for worker in workers:
            worker.stop.remote(at_once)

    run.stop.watch(on_stop)

    def drive(index: int) -> None:
        """One worker's loop, on a thread: shards in, batches out to the inbox."""
        worker = workers[index]
        while not stopping.is_set() and (shard := shards.take()) is not None:
            received: set[int] = set()
            sent = RowsToRead.of(shard) if read_there else shard
            try:
                call = worker.run.options(num_returns="streaming")
                for ref in call.remote(job_ref, sent, settings, limits, str(index)):
                    kind, item = ray.get(ref)
                    if kind == "rows":
                        received.update(r.row for r in item)
                    elif kind == "stats" and item.error is not None:
                        stopping.set()  # the job stops: no more shards
                    loop.call_soon_threadsafe(inbox.put_nowait, (index, kind, item))
            except ray.exceptions.RayActorError:
                limits.forget.remote(str(index))  # its leases died with it
                run.tallies[index].restarts += 1
                shards.give_back([planned for planned in shard if planned.row not in received])
            except BaseException as exc:
                loop.call_soon_threadsafe(inbox.put_nowait, (index, "error", exc))
                stopping.set()
                return
        loop.call_soon_threadsafe(inbox.put_nowait, (index, "idle", None))

    threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(workers_n)]
    for thread in threads:
        thread.start()
    try:
        return await _collect(run, inbox, workers_n)
    finally:
        run.stop.unwatch()
        stopping.set()
        for thread in threads:
            await asyncio.to_thread(thread.join)
        for handle in [*workers, limits]:
            ray.kill(handle)


async def _collect(run: ClusterRun, inbox: asyncio.Queue[tuple[int, str, Any]], workers_n: int) -> RunStats:
    """The one writer: every batch a worker returns goes into the checkpoint as it comes."""
    tally = RowTally()  # counted as the core counts its own: a local run reports the same
    totals = {"requests": 0, "rate_limited": 0}
    retries: collections.Counter[str] = collections.Counter()
    outcome = "finished"
    error: BatchrunError | None = None
    idle = 0
    while idle < workers_n:
        index, kind, item = await inbox.get()
        if kind == "rows":
            results: list[RowResult] = item
            run.record(results)
            run.tallies[index].rows += len(results)
            for result in results:
                tally.add(result)
                run.events.row_finished(result)
        elif kind == "say":
            run.events.say(*item)
        elif kind == "stats":
            stats: RunStats = item
            run.tallies[index].add(stats)
            totals["requests"] += stats.requests
            totals["rate_limited"] += stats.rate_limited
            retries.update(stats.retries)
            if stats.outcome == "stopped_by_budget" and outcome == "finished":
                outcome = "stopped_by_budget"
            if stats.error is not None and error is None:
                error = stats.error
        elif kind == "error":
            raise item
        else:
            idle += 1
    if run.stop.requests:
        outcome = "interrupted"
    if error is not None:
        outcome = "aborted"
    return RunStats.of(
        tally,
        dict(retries),
        totals["rate_limited"],
        totals["requests"],
        outcome,  # type: ignore[arg-type]
        error,
    )


class _Shards:
    """The plan's rows, cut into shards as workers ask; shards given back (a worker died) go out
    first. Thread-safe: each worker's thread takes from it."""

    def __init__(self, run: ClusterRun, workers: int):
        self.size = max(1, min(MAX_SHARD_ROWS, -(-run.to_send // (workers * SHARDS_PER_WORKER))))
        self._plan = run.plan
        self._ahead: collections.deque[Planned] = collections.deque()  # planned, not yet in a shard
        self._returned: collections.deque[list[Planned]] = collections.deque()
        self._lock = threading.Lock()

    def take(self) -> list[Planned] | None:
        with self._lock:
            if self._returned:
                return self._returned.popleft()
            while len(self._ahead) < self.size and (batch := self._plan.next_batch()) is not None:
                self._ahead.extend(batch)
            shard = [self._ahead.popleft() for _ in range(min(self.size, len(self._ahead)))]
            return shard or None

    def give_back(self, shard: list[Planned]) -> None:
        if shard:
            with self._lock:
                self._returned.append(shard)


class RayExecutor:
    """The rows sent by worker actors on a Ray cluster, each running the same core as Local."""

    def __init__(self, execution: Execution, options: RayOptions):
        self._options = options
        self._run = ClusterRun(
            execution.job,
            execution.plan,
            execution.record,
            execution.events,
            execution.stop,
            to_send=execution.to_send,
            width=execution.width,
            settings=ShardSettings(
                execution.base_url,
                execution.simulated,
                execution.width,
                execution.grace_s,
                execution.price,
                execution.max_cost_usd,
                execution.format_step,
            ),
            spent_usd=execution.spent_usd,
        )

    def describe(self) -> str:
        return describe_split(self._options, self._run.width)

    async def run(self) -> RunStats:
        return await run_on_cluster(self._run, self._options)

    def workers(self) -> list[dict[str, int]]:
        return [vars(tally) for tally in self._run.tallies]


def describe_split(options: RayOptions, width: int) -> str:
    """For the progress bar: how `concurrency` is split between the workers."""
    import ray

    workers = worker_count(ray, options)
    return f"concurrency {width} = {workers} workers x {shares(width, workers)}"
