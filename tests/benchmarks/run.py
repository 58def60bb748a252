"""Throughput of a 2,000-row job on the simulator, against a peer measured in the same run.

    python tests/benchmarks/run.py [--rows 2000] [--latencies 0,200]

For each simulated latency it times, against one simulator process on loopback:
  * batchrun: the real CLI (`batchrun JOB -q`), concurrency 16 (the default);
  * peer: the official `openai` SDK's AsyncOpenAI + asyncio.Semaphore(16) + gather over all rows,
    writing the same Parquet output: what a user would otherwise write.
and `batchrun JOB --simulate` itself (simulator in-process), the command the README shows.
It prints rows/s, CPU ms per row (user+sys of the client process) and batchrun's ratio to the peer.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[2]
CONCURRENCY = 16
KEY_ENV = "BENCH_KEY"

PEER = """
import asyncio, sys, polars as pl
from openai import AsyncOpenAI

async def main(base_url, path, out, concurrency):
    rows = pl.read_parquet(path).to_dicts()
    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=5)
    gate = asyncio.Semaphore(int(concurrency))
    async def one(row):
        async with gate:
            r = await client.chat.completions.create(
                model="grok-4.3", max_tokens=60, temperature=0.2,
                messages=[{"role": "system", "content": "You are a news editor."},
                          {"role": "user", "content": "Summarize: " + row["title"] + "\\n\\n" + row["text"]}])
            return {"id": row["id"], "content": r.choices[0].message.content,
                    "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}
    results = await asyncio.gather(*(one(r) for r in rows))
    pl.DataFrame(results).write_parquet(out)

asyncio.run(main(*sys.argv[1:]))
"""


def make_input(rows: int, folder: Path) -> Path:
    articles = pl.read_parquet(REPO / "sample_data" / "articles.parquet")
    repeats = -(-rows // articles.height)
    table = pl.concat([articles] * repeats).head(rows).with_columns(pl.int_range(1, rows + 1).alias("id"))
    path = folder / "input.parquet"
    table.write_parquet(path)
    return path


def write_job(folder: Path, input_path: Path, base_url: str) -> Path:
    job = {
        "input": {"path": str(input_path), "id_column": "id"},
        "output": {"path": str(folder / "out.parquet")},
        "model": "grok-4.3",
        "prompt": {"system": "You are a news editor.", "user": "Summarize: {title}\n\n{text}"},
        "params": {"temperature": 0.2, "max_tokens": 60},
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV},
        "concurrency": CONCURRENCY,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, KEY_ENV: "bench"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def start_simulator(latency_ms: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "simulate", "--port", "0", "--latency-ms", str(latency_ms)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    return proc, line.rsplit(" ", 1)[-1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--latencies", default="0,200", help="simulated latencies in ms")
    args = parser.parse_args()
    batchrun = [sys.executable, "-m", "batchrun"]
    print(f"{args.rows} rows, concurrency {CONCURRENCY}, one simulator process on loopback")
    print(f"{'latency':>8} {'client':<24} {'rows/s':>8} {'CPU ms/row':>11} {'vs peer':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        input_path = make_input(args.rows, folder)
        for latency in (float(x) for x in args.latencies.split(",")):
            sim, base_url = start_simulator(latency)
            try:
                job = write_job(folder, input_path, base_url)
                ours = timed([*batchrun, str(job), "-q", "--fresh"])
                peer_args = [base_url, str(input_path), str(folder / "peer.parquet"), str(CONCURRENCY)]
                peer = timed([sys.executable, "-c", PEER, *peer_args])
            finally:
                sim.terminate()
                sim.wait()
            simulate_flags = ["--simulate", "--simulate-latency-ms", str(latency)]
            simulate = timed([*batchrun, str(job), "-q", "--fresh", *simulate_flags])
            for name, (wall, cpu) in (
                ("batchrun", ours),
                ("openai SDK + semaphore", peer),
                ("batchrun --simulate", simulate),
            ):
                ratio = peer[0] / wall
                print(
                    f"{latency:>6.0f}ms {name:<24} {args.rows / wall:>8.0f} "
                    f"{cpu * 1000 / args.rows:>11.2f} {ratio:>7.2f}x"
                )


if __name__ == "__main__":
    main()
