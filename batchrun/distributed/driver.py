"""The Ray driver: the rows still to do, in shards, to N worker actors; one checkpoint, here."""

from __future__ import annotations

from typing import Any

from batchrun.distributed import RayOptions
from batchrun.distributed.cluster import connect
from batchrun.errors import BatchrunError
from batchrun.job import JobSpec


def run_on_ray(spec: JobSpec, options: Any, ray_options: RayOptions) -> None:
    connect(ray_options.address)
    raise BatchrunError("the Ray driver is not built yet (#14 phase 2)")
