"""The Ray driver (#14): bootstrap refusals, and the cluster's one rate limit and one budget.

Tests that need Ray share one local instance (conftest.ray_session: two CPUs, files in a temp dir).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batchrun.distributed.cluster import check_address, check_versions, host_and_port
from batchrun.distributed.limiter import ClusterBudget, ClusterLimiter, ClusterLimits
from tests.conftest import article_rows, run_batchrun, write_job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- bad input: no Ray call is made -------------------------------------------------------------


def test_ray_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    """A `ray` that cannot be imported (as without the extra): exit 2, one line, how to install."""
    fake = tmp_path / "site" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    job = write_job(tmp_path, article_rows(2), "http://127.0.0.1:9/v1")

    done = subprocess.run(
        [sys.executable, "-m", "batchrun", "run", str(job), "--ray"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert done.returncode == 2
    assert done.stderr == (
        "Error: --ray needs Ray, which the base install leaves out: pip install 'batchrun[ray]'\n"
    )


def test_an_address_where_no_ray_listens_is_refused_in_one_line_quickly(tmp_path: Path) -> None:
    job = write_job(tmp_path, article_rows(2), "http://127.0.0.1:9/v1")
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = run_batchrun("run", str(job), "--ray", address, timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: no Ray cluster answers at {address} ")
    assert not (tmp_path / "out").exists()  # nothing sent, no checkpoint


def test_an_address_that_never_answers_times_out() -> None:
    """A listener that never accepts (a full backlog stands in for a dropped SYN) within the timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # fill the backlog: further connects hang
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            started = time.monotonic()
            try:
                check_address(f"127.0.0.1:{port}", timeout_s=0.5)
            except Exception as exc:
                assert "no Ray cluster answers" in str(exc)
            assert time.monotonic() - started < 5
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.parametrize(
    ("address", "where"),
    [
        ("10.0.0.5:6380", ("10.0.0.5", 6380)),
        ("head", ("head", 6379)),
        ("ray://head", ("head", 10001)),
        ("ray://head:10002", ("head", 10002)),
        ("[::1]:6379", ("::1", 6379)),
    ],
)
def test_addresses_are_read_as_ray_reads_them(address: str, where: tuple[str, int]) -> None:
    assert host_and_port(address) == where


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_must_be_positive(tmp_path: Path, workers: str) -> None:
    job = write_job(tmp_path, article_rows(2), "http://127.0.0.1:9/v1")
    done = run_batchrun("run", str(job), "--ray", "--workers", workers)
    assert done.returncode == 2
    assert "Invalid value for '--workers'" in done.stderr


# --- with a local Ray -----------------------------------------------------------------------------


def test_a_cluster_with_another_batchrun_is_refused_naming_both(ray_session: Any) -> None:
    from batchrun.distributed.cluster import batchrun_version
    from batchrun.errors import BatchrunError

    check_versions(ray_session)  # the same: accepted
    with pytest.raises(BatchrunError) as refused:
        check_versions(ray_session, ours="0.0.1")
    assert f"the Ray cluster runs batchrun {batchrun_version()}, this driver batchrun 0.0.1" in str(
        refused.value
    )


def limits_actor(ray: Any, **kwargs: Any) -> Any:
    """A limiter actor, started (its process takes about a second to come up)."""
    actor = ray.remote(num_cpus=0)(ClusterLimits).remote(**kwargs)
    ray.get(actor.counts.remote())
    return actor


def test_two_workers_leasing_share_one_rate(ray_session: Any) -> None:
    """300 permits over two adapters at 200/s: together never faster than the one limit."""
    rpm = 12_000
    actor = limits_actor(ray_session, requests_per_minute=rpm, tokens_per_minute=None)

    async def main() -> list[float]:
        workers = [ClusterLimiter(actor, 16, requests_per_minute=rpm) for _ in range(2)]
        times: list[float] = []

        async def send(limiter: ClusterLimiter) -> None:
            permit = await limiter.acquire(10)
            times.append(time.monotonic())
            limiter.release(permit, ok=True)

        await asyncio.gather(*(send(workers[i % 2]) for i in range(300)))
        return sorted(times)

    times = asyncio.run(main())
    per_s = rpm / 60
    busiest = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
    assert busiest <= per_s * 1.05  # transit jitter between the actor and the workers, no more
    assert times[-1] - times[0] >= (len(times) - per_s * 1.05) / per_s
    counts = ray_session.get(actor.counts.remote())
    assert counts["slots"] >= 300 and counts["leases"] < 300 / 4  # leased in batches, not one by one


def test_a_429_seen_by_one_worker_holds_the_other(ray_session: Any) -> None:
    actor = limits_actor(ray_session, requests_per_minute=60_000, tokens_per_minute=None)

    async def main() -> float:
        told, other = (ClusterLimiter(actor, 4, requests_per_minute=60_000) for _ in range(2))
        permit = await told.acquire(10)
        told.release(permit, ok=False, rate_limited=True, retry_after_s=0.6)
        started = time.monotonic()
        other.release(await other.acquire(10), ok=True)
        return time.monotonic() - started

    assert asyncio.run(main()) >= 0.5


def test_an_unpaced_worker_learns_of_a_hold_within_the_poll_interval(ray_session: Any) -> None:
    """Without a rate_limit no lease is asked for: the hold comes by polling."""
    actor = limits_actor(ray_session, requests_per_minute=None, tokens_per_minute=None)

    async def main() -> list[float]:
        told, other = ClusterLimiter(actor, 4), ClusterLimiter(actor, 4)
        told.release(await told.acquire(10), ok=False, rate_limited=True, retry_after_s=1.0)
        said = time.monotonic()
        gaps = []
        while (gap := time.monotonic() - said) < 0.9:
            other.release(await other.acquire(10), ok=True)
            gaps.append(gap)
            await asyncio.sleep(0.01)
        return gaps

    gaps = asyncio.run(main())
    assert gaps and gaps[-1] < 0.5  # some went before it polled; none after, until the hold ended


def test_the_budget_is_one_for_every_worker(ray_session: Any) -> None:
    actor = limits_actor(
        ray_session, requests_per_minute=None, tokens_per_minute=None, max_cost_usd=1.0, spent_usd=0.25
    )
    budgets = [ClusterBudget(actor, 1.0, width=2, get=ray_session.get) for _ in range(2)]
    reserved = 0
    for i in range(40):  # alternate: each worker reserves from its own grants
        if budgets[i % 2].reserve(0.05):
            reserved += 1
    assert reserved <= 15  # (1.00 - 0.25) / 0.05
    assert budgets[0].stopped or budgets[1].stopped
    committed = ray_session.get(actor.counts.remote())["committed_usd"]
    assert committed <= 1.0 + 1e-9
    budgets[1].settle(budgets[1].reserved_usd, 0.0)  # its rows cost nothing after all
    budgets[1].give_back()
    after = ray_session.get(actor.counts.remote())["committed_usd"]
    assert after < committed
