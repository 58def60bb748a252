"""Throughput, CPU and rate-limit behaviour of the whole CLI against peers, same server, same run.

    python tests/benchmarks/run.py [--quick] [--scenarios S1,S2,S3]

The simulator runs in its own process pinned to core 1 and every client on core 0 (`taskset`).
Clients, each a separate process writing the same Parquet output:
  * batchrun: the real CLI (`batchrun JOB -q --fresh`);
  * openai SDK: AsyncOpenAI + asyncio.Semaphore + gather over all rows (peer_openai.py);
  * httpx chunked: httpx.AsyncClient + gather over chunks of C rows (peer_httpx.py).
Scenarios (issue #4; S4 issue #12):
  S1  no latency, 20,000 rows, 64 in flight
  S2  lognormal latency (mean 200 ms, sigma 1, seeded), 5,000 rows, 128 in flight; the bound is
      what a client with zero overhead keeping 128 in flight would do on the same latencies
  S3  a limit of 6,000 requests/min enforced over a sliding 1 s window (at most 100 requests in
      the second before each one, as many gateways count), 50 ms latency, 3,000 rows, 64 in
      flight; batchrun both with `rate_limit` set to exactly the limit and without (adaptive)
  S4  S2's latencies with 512 in flight and 20,000 rows: the client's CPU per row decides throughput;
      the bound is computed as S2's
Rows/s counts rows answered (not lost) over the client process's whole life (start-up included);
CPU is its user + sys time;
"% of limit" and "vs zero-overhead" use the server's view (first arrival to last answer), where
start-up does not count. Before the runs, the simulator's own capacity is measured with
loadgen.py to show it is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import measure

from batchrun.job import load_job
from batchrun.plan import prepare
from batchrun.simulator import latencies

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
KEY_ENV = "BENCH_KEY"
SEED = 7


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: int
    concurrency: int
    latency_ms: float = 0.0
    sigma: float = 0.0
    rpm: int | None = None
    window: str = "sliding"


SCENARIOS = {
    "S1": Scenario("S1", 20_000, 64),
    "S2": Scenario("S2", 5_000, 128, latency_ms=200, sigma=1.0),
    "S3": Scenario("S3", 3_000, 64, latency_ms=50, rpm=6000),
    "S4": Scenario("S4", 20_000, 512, latency_ms=200, sigma=1.0),
}


@dataclass(frozen=True)
class Outcome:
    client: str
    rows: int
    wall_s: float
    cpu_s: float
    rss_mb: float
    requests: int
    rate_limited: int
    lost: int
    span_s: float
    server_busy: float  # share of its core the simulator used while this client ran

    @property
    def rows_per_s(self) -> float:
        """Rows answered per second: a row lost is not throughput."""
        return (self.rows - self.lost) / self.wall_s


def pinned(core: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if shutil.which("taskset") else cmd


def make_input(rows: int, folder: Path) -> Path:
    articles = pl.read_parquet(REPO / "sample_data" / "articles.parquet")
    table = pl.concat([articles] * -(-rows // articles.height)).head(rows)
    path = folder / f"input-{rows}.parquet"
    table.with_columns(pl.int_range(1, rows + 1).alias("id")).write_parquet(path)
    return path


def write_job(folder: Path, input_path: Path, base_url: str, concurrency: int, rpm: int | None) -> Path:
    job: dict[str, Any] = {
        "input": {"path": str(input_path), "id_column": "id"},
        "output": {"path": str(folder / "batchrun.parquet")},
        "model": "grok-4.3",
        "prompt": {"system": "You are a news editor.", "user": "Summarize: {title}\n\n{text}"},
        "params": {"temperature": 0.2, "max_tokens": 60},
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV},
        "concurrency": concurrency,
    }
    if rpm:
        job["rate_limit"] = {"requests_per_minute": rpm}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def start_simulator(s: Scenario) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "batchrun", "simulate", "--port", "0", "--seed", str(SEED)]
    cmd += ["--latency-ms", str(s.latency_ms), "--latency-sigma", str(s.sigma)]
    cmd += ["--rpm", str(s.rpm), "--window", s.window] if s.rpm else []
    proc = subprocess.Popen(pinned(1, cmd), stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    return proc, proc.stderr.readline().rsplit(" ", 1)[-1].strip()


def server(base_url: str, what: str) -> dict[str, Any]:
    root = base_url.removesuffix("/v1")
    method = "POST" if what == "reset" else "GET"
    with urllib.request.urlopen(urllib.request.Request(f"{root}/simulator/{what}", method=method)) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(
    client: str, cmd: list[str], sim: subprocess.Popen[str], base_url: str, rows: int, output: Path
) -> Outcome:
    """Run one client process on core 0; its wall, CPU and peak RSS, and the server's counts."""
    server(base_url, "reset")
    server_cpu = cpu_s(sim.pid)
    started = time.perf_counter()
    proc = subprocess.Popen(pinned(0, cmd), env={**os.environ, KEY_ENV: "bench"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    server_busy = (cpu_s(sim.pid) - server_cpu) / wall
    stats = server(base_url, "stats")
    ok = pl.read_parquet(output).filter(pl.col("status") == "ok")["id"].n_unique() if output.exists() else 0
    return Outcome(
        client=client,
        rows=rows,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        rss_mb=usage.ru_maxrss / 1024,
        requests=stats["requests"],
        rate_limited=stats["by_status"].get("429", 0),
        lost=rows - ok,
        span_s=stats["span_s"],
        server_busy=server_busy,
    )


def zero_overhead_rows_per_s(s: Scenario, rows: int) -> float:
    """Rows/s of a client that keeps every slot busy at no cost, on the server's seeded latencies."""
    slots = [0.0] * s.concurrency
    for delay in itertools.islice(latencies(s.latency_ms, s.sigma, SEED), rows):
        heapq.heappush(slots, heapq.heappop(slots) + delay)
    return rows / max(slots)


def simulator_capacity(base_url: str, job: Path, requests: int) -> float:
    """Requests/s the simulator serves to a near-free load generator, with batchrun's own body."""
    body = orjson.dumps(prepare(load_job(job)).first_request())
    rate, _ = asyncio.run(measure(base_url, requests, 64, body))
    return rate


def run_scenario(s: Scenario, rows: int, folder: Path) -> list[tuple[Outcome, str]]:
    input_path = make_input(rows, folder)
    sim, base_url = start_simulator(s)
    results: list[tuple[Outcome, str]] = []
    try:
        job = write_job(folder, input_path, base_url, s.concurrency, None)
        if s.name == "S1":
            capacity = simulator_capacity(base_url, job, max(rows, 20_000))
            print(f"simulator capacity on core 1: {capacity:,.0f} requests/s", flush=True)
        out = folder / "batchrun.parquet"
        variants = [("batchrun (adaptive)" if s.rpm else "batchrun", job)]
        if s.rpm:
            paced = write_job(folder, input_path, base_url, s.concurrency, s.rpm)
            variants.insert(0, ("batchrun (rate_limit set)", paced))
        for name, job_path in variants:
            cmd = [sys.executable, "-m", "batchrun", "run", str(job_path), "-q", "--fresh"]
            results.append((timed(name, cmd, sim, base_url, rows, out), ""))
        for name, script in (
            ("openai SDK + semaphore", "peer_openai.py"),
            ("httpx chunked gather", "peer_httpx.py"),
        ):
            peer_out = folder / f"{script}.parquet"
            cmd = [
                sys.executable,
                str(HERE / script),
                base_url,
                str(input_path),
                str(peer_out),
                str(s.concurrency),
            ]
            results.append((timed(name, cmd, sim, base_url, rows, peer_out), ""))
    finally:
        sim.terminate()
        sim.wait()
    if s.name == "S1":
        fastest = max(o.rows_per_s for o, _ in results)
        print(f"  = {capacity / fastest:.1f}x the fastest client's rate ({fastest:,.0f} rows/s)", flush=True)
        results = [(o, f"simulator core {o.server_busy:.0%} busy") for o, _ in results]
    if s.name in ("S2", "S4"):
        bound = zero_overhead_rows_per_s(s, rows)
        results = [
            (o, f"{rows / o.span_s / bound:.2f} of zero-overhead ({bound:.0f} rows/s)") for o, _ in results
        ]
    if s.rpm:
        limit = s.rpm / 60
        results = [
            (o, f"{(rows - o.lost) / o.span_s / limit:.1%} of limit, {o.rate_limited / o.requests:.2%} 429s")
            for o, _ in results
        ]
    return results


def print_table(scenario: str, results: list[tuple[Outcome, str]]) -> None:
    peers = {o.client: o for o, _ in results}
    sdk, chunked = peers["openai SDK + semaphore"], peers["httpx chunked gather"]
    for o, note in results:
        cells = [scenario, o.client, f"{o.rows_per_s:,.0f}", f"{o.cpu_s * 1000 / o.rows:.2f}"]
        cells += [f"{o.rss_mb:.0f}", f"{o.rate_limited:,}", f"{o.lost:,}"]
        cells += [f"{o.rows_per_s / p.rows_per_s:.2f}x" for p in (sdk, chunked)] + [note]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the rows")
    parser.add_argument("--scenarios", default="S1,S2,S3")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; client on core 0, simulator on core 1")
    header = (
        "| scenario | client | rows/s | CPU ms/row | peak RSS MB | 429s | rows lost | vs SDK | vs chunked | |"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tables = []
        for name in args.scenarios.split(","):
            s = SCENARIOS[name]
            rows = s.rows // 5 if args.quick else s.rows
            print(f"{name}: {rows:,} rows, {s.concurrency} in flight", flush=True)
            tables.append((name, run_scenario(s, rows, Path(tmp))))
        print(header)
        print("|" + "---|" * 10)
        for name, results in tables:
            print_table(name, results)


if __name__ == "__main__":
    main()
