"""Running a job on a Ray cluster (`batchrun run JOB --ray [ADDRESS]`; the `batchrun[ray]` extra).

    cluster.py   joining (or starting) Ray: the address checked first, the batchrun versions compared
    limiter.py   one rate limit and one money budget for the whole cluster: an actor, and the
                 worker-side adapters that lease from it (ClusterLimiter, ClusterBudget)

Nothing here is imported unless `--ray` (or `ray=`) is used: the base install has no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from batchrun.executors import Execution, Executor


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run on Ray (`--ray [ADDRESS] --workers N`); the Ray executor's kind
    (executors.ExecutorKind)."""

    address: str | None = None  # None: start a local Ray
    workers: int | None = None  # None: one per CPU of the cluster
    name: ClassVar[str] = "ray"
    needs_counts: ClassVar[bool] = True  # the shards are sized by the rows still to do

    def check(self, http_client: object) -> None:
        if http_client is not None:
            from batchrun.errors import JobError

            raise JobError("http_client= cannot be sent to Ray workers; leave it out to run on Ray")

    def executor(self, execution: Execution) -> Executor:
        from batchrun.distributed.driver import RayExecutor

        return RayExecutor(execution, self)

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            from batchrun.errors import BatchrunError

            raise BatchrunError(f"workers must be at least 1, not {self.workers}")
