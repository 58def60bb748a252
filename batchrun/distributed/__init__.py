"""Running a job on a Ray cluster (`batchrun run JOB --ray [ADDRESS]`; the `batchrun[ray]` extra).

    cluster.py   joining (or starting) Ray: the address checked first, the batchrun versions compared
    limiter.py   one rate limit and one money budget for the whole cluster: an actor, and the
                 worker-side adapters that lease from it (ClusterLimiter, ClusterBudget)

Nothing here is imported unless `--ray` (or `ray=`) is used: the base install has no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run on Ray (`--ray [ADDRESS] --workers N`)."""

    address: str | None = None  # None: start a local Ray
    workers: int | None = None  # None: one per CPU of the cluster

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            from batchrun.errors import BatchrunError

            raise BatchrunError(f"workers must be at least 1, not {self.workers}")
