"""Ways of running a job's rows, behind one protocol: in this process (Local, here) or on a Ray
cluster (distributed/). Each takes the plan's rows and hands finished rows to the checkpoint's
one writer; the runner asks for an executor by its kind and never learns which it has.

A kind (`LOCAL`, or `RayOptions`) answers what the runner must know before the checkpoint opens
(its name in the record, whether it needs the done-counts before the first request, what it
refuses); its executor runs. `build_core` makes the async core for both: in this process for
Local, in each worker actor for Ray.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from batchrun.budget import BudgetGuard
from batchrun.client import ChatClient
from batchrun.core import Core, CoreSettings, RunStats, Stop
from batchrun.cost import Price, output_tokens_cap
from batchrun.errors import BatchrunError, Remedy
from batchrun.events import Events
from batchrun.images import ImageSender
from batchrun.job import EndpointSpec
from batchrun.limits import Limiter
from batchrun.plan import SIMULATED_KEY, IndexedPlan, KeyedPlan, Planned, PreparedJob
from batchrun.results import RowResult

if TYPE_CHECKING:
    import httpx2

    from batchrun.checkpoint import Checkpoint


@dataclass(frozen=True)
class Execution:
    """What any executor is given: the job, its rows, where finished rows go, and the run's settings."""

    job: PreparedJob
    plan: KeyedPlan | IndexedPlan
    record: Callable[[Sequence[RowResult]], None]  # the checkpoint's: the one writer
    events: Events
    stop: Stop
    base_url: str
    simulated: bool
    width: int  # requests in flight, over all workers
    grace_s: float
    price: Price | None
    max_cost_usd: float | None
    spent_usd: float  # before this run, from the checkpoint
    to_send: int  # about how many rows the plan will yield
    format_step: int  # the response_format the endpoint last took (Checkpoint.accepted_format)
    accept_format: Callable[[dict[str, Any] | None], None]
    http_client: httpx2.AsyncClient | None = None
    checkpoint: Checkpoint | None = None  # for an executor that keeps its own record (batch mode)


class Executor(Protocol):
    def describe(self) -> str:
        """A word on its state, beside the progress (the breaker's, the limiter's, the split)."""
        ...

    async def run(self) -> RunStats: ...

    def workers(self) -> list[dict[str, int]] | None:
        """Each worker's share of the run, for report.json; None in one process."""
        ...


class ExecutorKind(Protocol):
    @property
    def name(self) -> str:
        """In the checkpoint's record of runs."""
        ...

    @property
    def needs_counts(self) -> bool:
        """Whether it must know what is done before the first request (to size its shards)."""
        ...

    def check(self, http_client: object) -> None:
        """Refuse, before anything is opened, what this kind cannot do."""
        ...

    def executor(self, execution: Execution) -> Executor: ...


def api_key(endpoint: EndpointSpec) -> str:
    """The key, read from the environment at the last moment and never stored."""
    name = endpoint.api_key_env
    key = os.environ.get(name, "").strip()
    if not key:
        raise BatchrunError(
            f"{name} is not set: export your API key as {name}",
            remedy=Remedy("simulate", True, "to try the job offline"),
        )
    return key


def build_core(
    job: PreparedJob,
    planned: AsyncIterable[Planned],
    limiter: Limiter,
    record: Callable[[Sequence[RowResult]], None],
    events: Events,
    settings: CoreSettings,
    *,
    simulated: bool,
    budget: BudgetGuard | None,
    stop: Stop,
    http_client: httpx2.AsyncClient | None = None,
    format_step: int = 0,
    accept_format: Callable[[dict[str, Any] | None], None] | None = None,
) -> Core:
    """The async core over the job's endpoint, as every executor runs it; a job with images
    has each row's images read, checked and inlined as the row is sent (images.ImageSender)."""
    endpoint = job.spec.endpoint
    client = ChatClient(
        settings.base_url,
        SIMULATED_KEY if simulated else api_key(endpoint),
        endpoint.timeout_s,
        settings.width,
        max_response_mb=endpoint.max_response_mb,
        http_client=http_client,
    )
    images = job.prompts.images
    return Core(
        settings,
        planned,
        client,
        limiter,
        record,
        events,
        budget=budget,
        stop=stop,
        format_step=format_step,
        accept_format=accept_format,
        resolve=ImageSender(images, settings.width) if images else None,
    )


class _Local:
    """The rows sent from this process, by one core."""

    name = "local"
    needs_counts = False

    def check(self, http_client: object) -> None:
        """Anything goes in one process."""

    def executor(self, execution: Execution) -> Executor:
        return LocalExecutor(execution)


class LocalExecutor:
    def __init__(self, execution: Execution):
        job, width = execution.job, execution.width
        params, spec = job.params, job.spec
        limiter = Limiter(
            width,
            spec.rate_limit.requests_per_minute,
            spec.rate_limit.tokens_per_minute,
            max_tokens=output_tokens_cap(params),
            max_hold_s=spec.retry.max_backoff_s,
        )
        max_cost = execution.max_cost_usd
        self._core = build_core(
            job,
            execution.plan.requests(),
            limiter,
            execution.record,
            execution.events,
            CoreSettings.of(job, width, execution.grace_s, execution.base_url, execution.price),
            simulated=execution.simulated,
            budget=None if max_cost is None else BudgetGuard(max_cost, spent_usd=execution.spent_usd),
            stop=execution.stop,
            http_client=execution.http_client,
            format_step=execution.format_step,
            accept_format=execution.accept_format,
        )

    def describe(self) -> str:
        return self._core.describe()

    async def run(self) -> RunStats:
        return await self._core.run()

    def workers(self) -> None:
        return None


LOCAL: ExecutorKind = _Local()
