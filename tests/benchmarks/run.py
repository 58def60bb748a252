"""Throughput, CPU and rate-limit behaviour of the whole CLI against peers, same server, same run.

    python tests/benchmarks/run.py [--quick] [--scenarios S1,S2,S3,S3m,S3t] [--rounds 3]

The simulator runs in its own process pinned to core 1 and every client on core 0 (`taskset`).
Clients, each a separate process writing the same Parquet output, each with a pool of C
connections for C in flight:
  * batchrun: the real CLI (`batchrun JOB -q --fresh`);
  * openai SDK: AsyncOpenAI + asyncio.Semaphore + gather over all rows (peer_openai.py);
  * httpx chunked: httpx.AsyncClient + gather over chunks of C rows (peer_httpx.py).
Each scenario runs every client --rounds times, the order rotated each round (no client always
first), each run in a folder of its own; a client's figures are those of its median run by rows/s.
A run counts only if the client exited as it does when it finished (batchrun 0, or 1: rows
failed, counted as lost; a peer 0) and wrote its output in that run, one row per input row;
otherwise the table says the client failed, and why, in place of its figures.
Scenarios (issue #4; S4 issue #12):
  S1  no latency, 20,000 rows, 64 in flight
  S2  lognormal latency (mean 200 ms, sigma 1, seeded), 5,000 rows, 128 in flight; the bound is
      what a client with zero overhead keeping 128 in flight would do on the same latencies
  S3  a limit of 6,000 requests/min enforced over a sliding 1 s window (at most 100 requests in
      the second before each one, as many gateways count), 50 ms latency, 3,000 rows, 64 in
      flight; batchrun both with `rate_limit` set to exactly the limit and without (adaptive)
  S3m S3 with OpenAI's per-minute headers (`--headers per-minute`: remaining of the minute, which
      never runs short; the 1 s window still enforced): batchrun paced and adaptive only, with
      targets: adaptive >= 92% of the limit with < 1% 429s, paced >= 97% with < 0.5%
  S3t S3m by tokens: 1,000,000 tokens/min (16,667 a second over a sliding 1 s window, about 98
      of these requests of ~170 tokens each), no request limit; "% of limit" counts tokens
  S4  S2's latencies with 512 in flight and 20,000 rows: the client's CPU per row decides throughput;
      the bound is computed as S2's
Rows/s counts rows answered (not lost) over the client process's whole life (start-up included);
CPU is its user + sys time; "wall - active" is the client's wall time less the server's first
arrival to last answer: start-up, reading, writing and reporting, what a short job pays whatever
its rows; peak RSS is its own VmHWM, polled while it runs (see `watch`);
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
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
    tpm: int | None = None
    headers: str = "window"

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm)

    @property
    def per_minute(self) -> bool:
        """S3m and S3t: batchrun's clients only, measured against the targets."""
        return self.headers == "per-minute"


SCENARIOS = {
    "S1": Scenario("S1", 20_000, 64),
    "S2": Scenario("S2", 5_000, 128, latency_ms=200, sigma=1.0),
    "S3": Scenario("S3", 3_000, 64, latency_ms=50, rpm=6000),
    "S4": Scenario("S4", 20_000, 512, latency_ms=200, sigma=1.0),
    "S3m": Scenario("S3m", 3_000, 64, latency_ms=50, rpm=6000, headers="per-minute"),
    "S3t": Scenario("S3t", 3_000, 64, latency_ms=50, tpm=1_000_000, headers="per-minute"),
}
TARGETS = {"batchrun (adaptive)": (0.92, 0.01), "batchrun (rate_limit set)": (0.97, 0.005)}  # S3m, S3t


@dataclass(frozen=True)
class Outcome:
    client: str
    rows: int
    wall_s: float
    cpu_s: float
    rss_mb: float
    requests: int
    rate_limited: int
    tokens: int  # in the usage the server answered
    lost: int
    span_s: float
    server_busy: float  # share of its core the simulator used while this client ran
    failure: str | None = None  # why this run's figures are not a result (a crash, no output ...)

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


def write_job(
    folder: Path, input_path: Path, base_url: str, concurrency: int, rate_limit: dict[str, int] | None
) -> Path:
    job: dict[str, Any] = {
        "input": {"path": str(input_path), "id_column": "id"},
        "output": {"path": str(folder / "batchrun.parquet")},
        "model": "grok-4.3",
        "prompt": {"system": "You are a news editor.", "user": "Summarize: {title}\n\n{text}"},
        "params": {"temperature": 0.2, "max_tokens": 60},
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV},
        "concurrency": concurrency,
    }
    if rate_limit:
        job["rate_limit"] = rate_limit
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def start_simulator(s: Scenario) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "batchrun", "simulate", "--port", "0", "--seed", str(SEED)]
    cmd += ["--latency-ms", str(s.latency_ms), "--latency-sigma", str(s.sigma)]
    cmd += ["--rpm", str(s.rpm)] if s.rpm else []
    cmd += ["--tpm", str(s.tpm)] if s.tpm else []
    cmd += ["--window", s.window, "--headers", s.headers] if s.limited else []
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


@dataclass(frozen=True)
class Watched:
    """One process run to its end: how it ended and what it used."""

    exit_code: int
    started: float  # time.monotonic() at its start: CLOCK_MONOTONIC, the simulator's clock too
    started_wall: float  # time.time() at its start, to compare with a file's modification time
    wall_s: float
    cpu_s: float  # user + sys
    rss_mb: float  # its own peak resident set (VmHWM)
    killed_for_memory: bool
    output_at: float | None  # time.monotonic() when `output` was first seen


def memory_mb(pid: int, field: Literal["VmRSS", "VmHWM"]) -> float:
    """A live process's resident set now (VmRSS) or at its peak so far (VmHWM) (Linux), 0 once
    it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    line = next((x for x in status.splitlines() if x.startswith(f"{field}:")), f"{field}: 0 kB")
    return int(line.split()[1]) / 1024


def watch(
    cmd: list[str],
    output: Path | None = None,
    max_rss_mb: float = math.inf,
    tick: Callable[[int, float], None] | None = None,
    stderr: list[str] | None = None,
    cwd: Path | None = None,
) -> Watched:
    """Run `cmd` (with KEY_ENV set) until it exits, polling it every 20 ms: its peak RSS by its
    own VmHWM (not wait4's ru_maxrss, which on Linux keeps the high-water mark of the memory the
    child had before its exec: this script's own), when `output` appeared; killed above
    `max_rss_mb` (the machine is shared); `tick(pid, now)` on every poll; its stderr's lines
    into `stderr` when given."""
    started, started_wall = time.monotonic(), time.time()
    pipe = subprocess.PIPE if stderr is not None else None
    proc = subprocess.Popen(cmd, env={**os.environ, KEY_ENV: "bench"}, stderr=pipe, text=True, cwd=cwd)
    reader = None
    if stderr is not None:
        reader = threading.Thread(target=lambda: stderr.extend(proc.stderr or ()), daemon=True)
        reader.start()
    output_at = None
    killed_for_memory = False
    peak_mb = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.monotonic()
        if output_at is None and output is not None and output.exists():
            output_at = now
        peak_mb = max(peak_mb, memory_mb(proc.pid, "VmHWM"))
        if memory_mb(proc.pid, "VmRSS") > max_rss_mb and not killed_for_memory:
            killed_for_memory = True
            os.kill(proc.pid, signal.SIGKILL)
        if tick is not None:
            tick(proc.pid, now)
        time.sleep(0.02)  # polling a child's state: there is no event to wait on
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if output_at is None and output is not None and output.exists():
        output_at = time.monotonic()  # appeared within the last poll interval
    if reader is not None:
        reader.join()
    return Watched(
        exit_code=proc.returncode,
        started=started,
        started_wall=started_wall,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        rss_mb=peak_mb,
        killed_for_memory=killed_for_memory,
        output_at=output_at,
    )


def failure(run: Watched, exits: tuple[int, ...], output: Path, rows: int) -> str | None:
    """Why a client's run is not a result, or None: an exit other than `exits`, no output, an
    output not written by this run, or not one row per input row."""
    if run.exit_code not in exits:
        return f"exit {run.exit_code}"
    if not output.exists():
        return "no output"
    if output.stat().st_mtime < run.started_wall:
        return "output older than the run"
    if (height := pl.scan_parquet(output).select(pl.len()).collect().item()) != rows:
        return f"{height:,} rows in the output, {rows:,} expected"
    return None


def timed(
    client: str,
    cmd: list[str],
    sim: subprocess.Popen[str],
    base_url: str,
    rows: int,
    output: Path,
    exits: tuple[int, ...] = (0,),
) -> Outcome:
    """Run one client process on core 0; its wall, CPU and peak RSS, and the server's counts;
    `failure` says why its figures are no result (`exits`: the exit codes of a finished run)."""
    server(base_url, "reset")
    server_cpu = cpu_s(sim.pid)
    run = watch(pinned(0, cmd))
    server_busy = (cpu_s(sim.pid) - server_cpu) / run.wall_s
    stats = server(base_url, "stats")
    failed = failure(run, exits, output, rows)
    ok = 0 if failed else pl.read_parquet(output).filter(pl.col("status") == "ok")["id"].n_unique()
    return Outcome(
        client=client,
        rows=rows,
        wall_s=run.wall_s,
        cpu_s=run.cpu_s,
        rss_mb=run.rss_mb,
        requests=stats["requests"],
        rate_limited=stats["by_status"].get("429", 0),
        tokens=stats["tokens"],
        lost=rows - ok,
        span_s=stats["span_s"],
        server_busy=server_busy,
        failure=failed,
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


BATCHRUN_EXITS = (0, 1)  # 1: finished, some rows failed (counted as lost)


def clients(s: Scenario, input_path: Path, base_url: str) -> list[tuple[str, Callable[[Path], list[str]]]]:
    """Each client's name, and its command for a run writing into a folder of its own (whose
    output is `output_of(name, folder)`)."""

    def batchrun(rate_limit: dict[str, int] | None) -> Callable[[Path], list[str]]:
        def command(folder: Path) -> list[str]:
            job = write_job(folder, input_path, base_url, s.concurrency, rate_limit)
            return [sys.executable, "-m", "batchrun", "run", str(job), "-q", "--fresh"]

        return command

    def peer(script: str) -> Callable[[Path], list[str]]:
        def command(folder: Path) -> list[str]:
            output = str(folder / "out.parquet")
            return [sys.executable, str(HERE / script), base_url, str(input_path), output, str(s.concurrency)]

        return command

    named = [("batchrun (adaptive)" if s.limited else "batchrun", batchrun(None))]
    if s.limited:
        limit = {"requests_per_minute": s.rpm} if s.rpm else {"tokens_per_minute": s.tpm or 0}
        named.insert(0, ("batchrun (rate_limit set)", batchrun(limit)))
    if s.per_minute:
        return named
    named += [
        ("openai SDK + semaphore", peer("peer_openai.py")),
        ("httpx chunked gather", peer("peer_httpx.py")),
    ]
    return named


def output_of(client: str, folder: Path) -> Path:
    return folder / ("batchrun.parquet" if client.startswith("batchrun") else "out.parquet")


def median_run(runs: list[Outcome]) -> Outcome:
    """The run with the median rows/s (the lower of the two middle ones), or the first that failed:
    a client that failed once has no figure."""
    failed = [o for o in runs if o.failure]
    if failed:
        return failed[0]
    return sorted(runs, key=lambda o: o.rows_per_s)[(len(runs) - 1) // 2]


def run_scenario(s: Scenario, rows: int, folder: Path, rounds: int) -> list[tuple[Outcome, str]]:
    input_path = make_input(rows, folder)
    sim, base_url = start_simulator(s)
    named = clients(s, input_path, base_url)
    runs: dict[str, list[Outcome]] = {name: [] for name, _ in named}
    try:
        if s.name == "S1":
            probe = folder / f"{s.name}-capacity"
            probe.mkdir()
            job = write_job(probe, input_path, base_url, s.concurrency, None)
            capacity = simulator_capacity(base_url, job, max(rows, 20_000))
            print(f"simulator capacity on core 1: {capacity:,.0f} requests/s", flush=True)
        numbered = list(enumerate(named))
        for r in range(rounds):
            turn = r % len(numbered)
            for n, (name, command) in numbered[turn:] + numbered[:turn]:  # rotated: nobody always first
                run_folder = folder / f"{s.name}-round{r + 1}-client{n}"  # fresh: no output of another run
                run_folder.mkdir()
                exits = BATCHRUN_EXITS if name.startswith("batchrun") else (0,)
                output = output_of(name, run_folder)
                outcome = timed(name, command(run_folder), sim, base_url, rows, output, exits)
                runs[name].append(outcome)
                said = (
                    f"failed: {outcome.failure}" if outcome.failure else f"{outcome.rows_per_s:,.0f} rows/s"
                )
                print(f"  round {r + 1}: {name}: {said}", flush=True)
    finally:
        sim.terminate()
        sim.wait()
    results = [median_run(runs[name]) for name, _ in named]
    done = [o for o in results if not o.failure]
    if s.name == "S1" and done:
        fastest = max(o.rows_per_s for o in done)
        print(f"  = {capacity / fastest:.1f}x the fastest client's rate ({fastest:,.0f} rows/s)", flush=True)
    return [(o, "" if o.failure else note(s, rows, o)) for o in results]


def note(s: Scenario, rows: int, o: Outcome) -> str:
    """The scenario's own figure for a client's (finished) run."""
    if s.name in ("S2", "S4"):
        bound = zero_overhead_rows_per_s(s, rows)
        return f"{rows / o.span_s / bound:.2f} of zero-overhead ({bound:.0f} rows/s)"
    if s.limited:
        used = o.tokens / (s.tpm / 60) if s.tpm else (rows - o.lost) / (s.rpm or 0) * 60
        share, refused = used / o.span_s, o.rate_limited / o.requests
        said = f"{share:.1%} of limit, {refused:.2%} 429s"
        if s.per_minute and o.client in TARGETS:
            least, most = TARGETS[o.client]
            met = "pass" if share >= least and refused < most else "fail"
            said += f"; target >= {least:.0%} & < {most:.1%} 429s: {met}"
        return said
    if s.name == "S1":
        return f"simulator core {o.server_busy:.0%} busy"
    return ""


def print_table(scenario: str, results: list[tuple[Outcome, str]]) -> None:
    """One line per client: its median run's figures, or that it failed (and why) and no figure."""
    peers = {o.client: o for o, _ in results}
    against = [peers.get("openai SDK + semaphore"), peers.get("httpx chunked gather")]
    for o, note in results:
        if o.failure:
            cells = [scenario, o.client, f"FAILED ({o.failure}): no figures", *[""] * 7]
        else:
            cells = [scenario, o.client, f"{o.rows_per_s:,.0f}", f"{o.cpu_s * 1000 / o.rows:.2f}"]
            cells += [f"{o.wall_s - o.span_s:.2f}", f"{o.rss_mb:.0f}", f"{o.rate_limited:,}", f"{o.lost:,}"]
            cells += [f"{o.rows_per_s / p.rows_per_s:.2f}x" if p and not p.failure else "-" for p in against]
            cells += [note]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the rows")
    parser.add_argument("--scenarios", default="S1,S2,S3")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each client; its median is shown")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; client on core 0, simulator on core 1")
    print(f"each client {args.rounds} times, the order rotated each round; figures: its median run by rows/s")
    header = (
        "| scenario | client | rows/s | CPU ms/row | wall - active s | peak RSS MB | 429s | rows lost "
        "| vs SDK | vs chunked | |"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tables = []
        for name in args.scenarios.split(","):
            s = SCENARIOS[name]
            rows = s.rows // 5 if args.quick else s.rows
            print(f"{name}: {rows:,} rows, {s.concurrency} in flight", flush=True)
            tables.append((name, run_scenario(s, rows, Path(tmp), args.rounds)))
        print(header)
        print("|" + "---|" * 11)
        for name, results in tables:
            print_table(name, results)


if __name__ == "__main__":
    main()
