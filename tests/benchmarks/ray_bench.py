"""What a run on Ray costs and what bounds it (#14): rows/s with 1 and 2 workers against the
simulator, the share of a cluster-wide rate limit reached under the simulator's sliding window,
the rows/s the driver can checkpoint from workers, the permits/s the limiter actor grants, and
what a shard costs the driver per row when it sends the rows and when the workers read them.

    python tests/benchmarks/ray_bench.py [--only throughput|limit|checkpoint|leases|shards]

Starts its own local Ray (two CPUs, files in a temp dir) and a simulator in its own process, and
stops both. Targets (issue #14) are printed pass/fail beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from batchrun.api import Job
from batchrun.checkpoint import open_checkpoint
from batchrun.distributed.limiter import ClusterLimiter, ClusterLimits
from batchrun.results import RowResult

KEY_ENV = "RAY_BENCH_KEY"  # set in the nodes' environment before Ray starts, as on a cluster


@contextlib.contextmanager
def simulator(*flags: str) -> Iterator[str]:
    """`batchrun simulate` in its own process (so it does not share the driver's CPU); its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "simulate", "--port", str(port), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sim_stats(url)
                break
            except OSError:
                assert time.monotonic() < deadline, "the simulator did not start"
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/simulator/stats", timeout=5) as answer:
        return dict(json.loads(answer.read()))


def write_job(folder: Path, rows: int, url: str, concurrency: int, rpm: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {"id": range(rows), "text": [f"Row {i}. A second sentence." for i in range(rows)]}
    ).write_csv(folder / "input.csv")
    job: dict[str, Any] = {
        "input": {"path": "input.csv", "id_column": "id"},
        "output": {"path": "out/result.parquet"},
        "model": "grok-4.3",
        "prompt": {"user": "{text}"},
        "params": {"max_tokens": 20},
        "endpoint": {"base_url": f"{url}/v1", "api_key_env": KEY_ENV, "timeout_s": 30},
        "concurrency": concurrency,
    }
    if rpm is not None:
        job["rate_limit"] = {"requests_per_minute": rpm}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_job(
    folder: Path, url: str, workers: int, rows: int, concurrency: int, rpm: int | None = None
) -> dict[str, Any]:
    """One run on the local Ray; rows/s over the simulator's span (first request to last answer:
    the workers' start-up is not the machinery's steady cost)."""
    job = Job.from_yaml(write_job(folder, rows, url, concurrency, rpm))
    urllib.request.urlopen(urllib.request.Request(f"{url}/simulator/reset", method="POST"), timeout=5).close()
    started = time.monotonic()
    result = job.run(ray=True, workers=workers, quiet=True, fresh=True)
    wall = time.monotonic() - started
    stats = sim_stats(url)
    out = pl.read_parquet(folder / "out" / "result.parquet")
    return {
        "workers": workers,
        "rows": rows,
        "ok": result.ok,
        "rows_per_s": round(rows / stats["span_s"]),
        "wall_s": round(wall, 1),
        "requests": stats["requests"],
        "responses_429": stats["by_status"].get("429", 0),
        "requests_per_min": round((stats["requests"] - 1) / stats["span_s"] * 60),
        "lost": rows - out.height,
        "duplicates": out.height - out["id"].n_unique(),
    }


def bench_throughput(base: Path, rows: int = 4000, concurrency: int = 32) -> list[dict[str, Any]]:
    """1 then 2 workers, the same job (the cluster's concurrency split between them), against a
    simulator at 40 ms a request: at most concurrency / 0.04 = 800 rows/s if nothing else bounds it."""
    with simulator("--latency-ms", "40") as url:
        return [run_job(base / f"w{n}", url, n, rows, concurrency) for n in (1, 2)]


def bench_limit(base: Path, rpm: int = 9000, rows: int = 2500) -> dict[str, Any]:
    """Two workers and one rate limit R, which the simulator enforces at R over a sliding 1 s window."""
    with simulator("--latency-ms", "20", "--rpm", str(rpm), "--window", "sliding") as url:
        figures = run_job(base / "limit", url, 2, rows, 32, rpm)
    figures["share_of_limit"] = round(figures["requests_per_min"] / rpm, 3)
    return figures


class _Returner:
    """A worker that returns finished rows as fast as it can, in the batches a Worker yields."""

    def stream(self, batches: int, size: int, first: int) -> Iterator[tuple[str, list[RowResult]]]:
        for b in range(batches):
            start = first + b * size
            yield (
                "rows",
                [
                    RowResult(
                        row=row,
                        id=str(row),
                        status="ok",
                        content="Row. A second sentence.",
                        finish_reason="stop",
                        prompt_tokens=20,
                        completion_tokens=8,
                        total_tokens=28,
                        attempts=1,
                        latency_ms=40.0,
                        model="grok-4.3",
                        response_id=f"chatcmpl-{row}",
                        request_key=row.to_bytes(32, "big"),
                    )
                    for row in range(start, start + size)
                ],
            )


def bench_checkpoint(
    ray: Any, base: Path, workers: int = 2, batches: int = 40, size: int = 500
) -> dict[str, Any]:
    """Rows/s the driver takes from workers (Ray's transfer and unpickling) into its checkpoint
    (one SQLite transaction a batch), as the driver does: a thread per worker, one writer."""
    base.mkdir(parents=True, exist_ok=True)
    checkpoint = open_checkpoint(base / "bench.checkpoint.sqlite", "fresh", {"bench": 1})
    actors = [ray.remote(num_cpus=0)(_Returner).remote() for _ in range(workers)]
    lock = threading.Lock()

    def drain(index: int) -> None:
        call = actors[index].stream.options(num_returns="streaming")
        for ref in call.remote(batches, size, index * batches * size):
            _, rows = ray.get(ref)
            with lock:
                checkpoint.record(rows)

    ray.get([actor.__ray_ready__.remote() for actor in actors])
    started = time.monotonic()
    threads = [threading.Thread(target=drain, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    checkpoint.close()
    with sqlite3.connect(base / "bench.checkpoint.sqlite") as db:
        recorded = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    for actor in actors:
        ray.kill(actor)
    return {"rows": recorded, "batch": size, "rows_per_s": round(recorded / wall)}


def bench_leases(ray: Any, adapters: int = 2, width: int = 512, seconds: float = 3.0) -> dict[str, float]:
    """Calls/s and slots/s the actor grants to `adapters` leasing as fast as they can (a rate far
    above what they ask, so no slot waits): the actor's ceiling, not the pacing's. `width` 1 makes
    every permit a lease call of its own: the actor's call rate."""
    actor = ray.remote(num_cpus=0)(ClusterLimits).remote(10**9, None)
    ray.get(actor.counts.remote())
    rpm = 60 * 1_000_000

    async def drive() -> int:
        limiters = [ClusterLimiter(actor, width, requests_per_minute=rpm) for _ in range(adapters)]
        deadline = time.monotonic() + seconds
        granted = 0

        async def loop(limiter: ClusterLimiter) -> None:
            nonlocal granted
            while time.monotonic() < deadline:
                limiter.release(await limiter.acquire(100), ok=True)
                granted += 1

        await asyncio.gather(*(loop(limiters[i % adapters]) for i in range(max(256, adapters))))
        return granted

    started = time.monotonic()
    granted = asyncio.run(drive())
    wall = time.monotonic() - started
    counts = ray.get(actor.counts.remote())
    ray.kill(actor)
    return {
        "lease_calls_per_s": round(counts["leases"] / wall),
        "slots_per_lease": round(counts["slots"] / max(counts["leases"], 1), 1),
        "permits_per_s": round(granted / wall),
    }


class _Taker:
    """A worker that takes a shard and says how many rows it holds."""

    def take(self, shard: Any) -> int:
        return len(shard)


def bench_shards(
    ray: Any, base: Path, rows: int = 2000, chars: int = 2000, rounds: int = 5
) -> dict[str, Any]:
    """What reaches a worker per row when the driver sends the rows (rendered requests) and when
    the workers read Parquet from object storage (row numbers and request keys): pickled bytes,
    and the driver-to-worker time of one shard (Ray's serialising, transfer, unpickling); then the
    worker's own read of that shard from moto's S3 server on loopback, the cost moved to it."""
    import io
    import logging
    import pickle

    import boto3
    from moto.server import ThreadedMotoServer

    from batchrun.distributed.shards import RowsToRead, read_rows
    from batchrun.job import load_job
    from batchrun.plan import KeyedPlan, prepare

    base.mkdir(parents=True, exist_ok=True)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "near",
        "riverbank",
        "at",
        "dawn",
    ]
    text = [" ".join(words[(i + j) % len(words)] for j in range(chars // 5))[:chars] for i in range(rows)]
    table = pl.DataFrame({"id": range(rows), "text": text})
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server: a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ALLOW_HTTP": "true",
    }
    os.environ.update(env)  # this process reads as a worker would (the actors below only unpickle)
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket="bench")
        data = io.BytesIO()
        table.write_parquet(data)
        client.put_object(Bucket="bench", Key="in.parquet", Body=data.getvalue())
        job_path = write_job(base, rows, "http://127.0.0.1:9", 8)
        spec = yaml.safe_load(job_path.read_text())
        spec["input"]["path"] = "s3://bench/in.parquet"
        job_path.write_text(yaml.safe_dump(spec))
        job = prepare(load_job(job_path), write=False)
        checkpoint = open_checkpoint(base / "shards.checkpoint.sqlite", "fresh", job.fingerprint(False))
        keys = job.keys(False)
        plan = KeyedPlan(job, checkpoint.key_index(dedupe=False), keys)
        planned = [p for batch in iter(plan.next_batch, None) for p in batch]
        by_reference = RowsToRead.of(planned)
        taker = ray.remote(num_cpus=0)(_Taker).remote()
        ray.get(taker.take.remote([]))

        def per_row_us(shard: Any) -> float:
            started = time.perf_counter()
            for _ in range(rounds):
                assert ray.get(taker.take.remote(shard)) == rows
            return round((time.perf_counter() - started) / rounds / rows * 1e6, 1)

        started = time.perf_counter()
        read = read_rows(job, by_reference, keys)
        read_us = round((time.perf_counter() - started) / rows * 1e6, 1)
        assert [p.body for p in read] == [p.body for p in planned]
        figures = {
            "rows": rows,
            "prompt_chars": chars,
            "rows_bytes_per_row": len(pickle.dumps(planned, protocol=5)) // rows,
            "reference_bytes_per_row": len(pickle.dumps(by_reference, protocol=5)) // rows,
            "rows_us_per_row": per_row_us(planned),
            "reference_us_per_row": per_row_us(by_reference),
            "worker_read_us_per_row": read_us,
        }
        ray.kill(taker)
        checkpoint.close()
        return figures
    finally:
        for name in env:
            os.environ.pop(name, None)
        server.stop()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", choices=["throughput", "limit", "checkpoint", "leases", "shards"])
    only = parser.parse_args().only
    import ray

    os.environ[KEY_ENV] = "sk-bench"  # the nodes' environment: Ray's workers inherit it
    base = Path(tempfile.mkdtemp(prefix="raybench", dir="/tmp"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(base / "ray"))
    try:
        if only in (None, "throughput"):
            one, two = bench_throughput(base)
            print("1 worker: ", one)
            print("2 workers:", two)
            ratio = two["rows_per_s"] / one["rows_per_s"]
            print(f"  2 workers / 1 worker = {ratio:.2f}x rows/s (target >= 0.9x): {verdict(ratio >= 0.9)}")
        if only in (None, "limit"):
            limit = bench_limit(base)
            print("limit:    ", limit)
            refused = limit["responses_429"] / limit["requests"]
            good = (
                limit["share_of_limit"] >= 0.95 and refused < 0.01 and not limit["lost"] + limit["duplicates"]
            )
            print(
                f"  {limit['share_of_limit']:.1%} of the limit, {refused:.2%} 429s, {limit['lost']} lost, "
                f"{limit['duplicates']} duplicates (target >= 95%, < 1%, 0, 0): {verdict(good)}"
            )
        if only in (None, "checkpoint"):
            written = bench_checkpoint(ray, base / "checkpoint")
            print(
                "driver checkpoint:",
                written,
                f"(target >= 20,000/s): {verdict(written['rows_per_s'] >= 20_000)}",
            )
        if only in (None, "leases"):
            leases = bench_leases(ray)
            print(
                "limiter actor:",
                leases,
                f"(target >= 20,000/s): {verdict(leases['permits_per_s'] >= 20_000)}",
            )
            print("  one slot a lease, 32 workers:", bench_leases(ray, adapters=32, width=1))
        if only in (None, "shards"):
            print(
                "shards to workers (rows vs Parquet in object storage):", bench_shards(ray, base / "shards")
            )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
