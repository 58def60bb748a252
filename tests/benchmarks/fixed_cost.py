"""The fixed cost of a run: what a short job pays besides its rows, beside the openai SDK sending them.

    python tests/benchmarks/fixed_cost.py [--runs 5]

Its runs import the batchrun of the Python that runs this script (never the checkout's folder),
so another checkout's venv measures that checkout: `../other/.venv/bin/python fixed_cost.py`.

  sample job  `batchrun jobs/summarize.yaml --simulate` as the README runs it (300 rows, the
              built-in simulator in a child process, a fresh copy of jobs/ and sample_data/ each
              run): wall and peak RSS (the process's own VmHWM), median of --runs; the peer is
              peer_openai.py sending the same 300 rows to `batchrun simulate` and writing Parquet.
  imports     a Python that imports the libraries batchrun runs with (STACK) and exits, median
              of --runs: the floor under any run of batchrun on this machine, measured beside it.
  notebook    `batchrun.run` on 20 rows called inside a running event loop (as in a notebook
              cell), after one warm-up call in the same process: median of --runs calls; the peer
              sends the same 20 rows through AsyncOpenAI in the same process, to the same simulator.
A run that exited otherwise than as a finished run does, or wrote no fresh output of one row per
input row, gets no figure. Targets: the sample job <= 0.6 s wall and <= 160 MB; the notebook
call <= 0.4 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run import REPO, Watched, failure, watch

HERE = Path(__file__).parent
SAMPLE_ROWS = 300
NOTEBOOK_ROWS = 20
STACK = "polars, aiohttp, httpx2, pydantic, tenacity, click, yaml, tqdm, uvloop, orjson, sqlite3"

# Run by a fresh interpreter: times `calls` calls of one kind after one warm-up call, and prints
# their wall seconds as JSON. The simulator runs in a thread of this process, for both kinds.
NOTEBOOK = """
import asyncio, json, sys, time
from pathlib import Path
import polars as pl

kind, folder, calls = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
rows = pl.read_parquet(sys.argv[4]).head(20)
prompt = "Summarize: {title}\\n\\n{text}"

if kind == "batchrun":
    import batchrun

    def once(n):
        out = batchrun.run(rows, model="grok-4.3", prompt=prompt, params={"max_tokens": 60},
                           simulate=True, quiet=True, output=str(folder / f"out-{n}.parquet"))
        assert out.height == 20 and (out["status"] == "ok").all(), out
else:
    from openai import AsyncOpenAI
    from batchrun.simulator import SimulatorConfig, serve_in_thread

    simulator = serve_in_thread(SimulatorConfig())  # kept: once collected, its server stops
    server = simulator.__enter__()

    async def ask(client, row):
        r = await client.chat.completions.create(model="grok-4.3", max_tokens=60, messages=[
            {"role": "user", "content": prompt.format(**row)}])
        return {"id": row["id"], "content": r.choices[0].message.content,
                "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}

    def once(n):
        async def gather():  # a client per call: its pool belongs to the call's loop, as run's does
            async with AsyncOpenAI(base_url=server.base_url, api_key="bench") as client:
                return await asyncio.gather(*(ask(client, row) for row in rows.iter_rows(named=True)))
        import threading  # the cell's loop is busy: the SDK's requests get a thread and loop, as run's do
        answers = []
        t = threading.Thread(target=lambda: answers.extend(asyncio.run(gather())))
        t.start(); t.join()
        pl.DataFrame(answers).write_parquet(folder / f"out-{n}.parquet")
        assert len(answers) == 20

async def cell():
    once(0)  # warm-up: imports, first connections
    times = []
    for n in range(1, calls + 1):
        started = time.perf_counter()
        once(n)
        times.append(time.perf_counter() - started)
    print(json.dumps(times))

asyncio.run(cell())
"""


def sample_job(folder: Path) -> tuple[list[str], Path]:
    """A fresh copy of the sample job; its command and output."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for name in ("jobs", "sample_data"):
        shutil.copytree(REPO / name, folder / name)
    command = [sys.executable, "-m", "batchrun", str(folder / "jobs" / "summarize.yaml"), "--simulate"]
    return command, folder / "out" / "summaries.parquet"


def peer_run(folder: Path, base_url: str) -> tuple[list[str], Path]:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    output = folder / "out.parquet"
    source = str(REPO / "sample_data" / "articles.parquet")
    return [sys.executable, str(HERE / "peer_openai.py"), base_url, source, str(output), "16"], output


def median_watched(runs: list[tuple[Watched, str | None]]) -> tuple[float, float] | str:
    """Median wall and peak RSS, or why there is no figure (the first failure)."""
    failed = [why for _, why in runs if why]
    if failed:
        return failed[0]
    return statistics.median(w.wall_s for w, _ in runs), statistics.median(w.rss_mb for w, _ in runs)


def notebook_calls(kind: str, folder: Path, calls: int) -> list[float] | str:
    folder.mkdir()
    source = str(REPO / "sample_data" / "articles.parquet")
    command = [sys.executable, "-c", NOTEBOOK, kind, str(folder), str(calls), source]
    done = subprocess.run(command, capture_output=True, text=True, cwd=folder)  # as sample_job's
    if done.returncode != 0:
        return f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs (calls) of each; the median is shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchrun-fixed-") as tmp:
        root = Path(tmp)
        simulator = subprocess.Popen(
            [sys.executable, "-m", "batchrun", "simulate", "--port", "0"], stderr=subprocess.PIPE, text=True
        )
        assert simulator.stderr is not None
        base_url = simulator.stderr.readline().rsplit(" ", 1)[-1].strip()
        ours: list[tuple[Watched, str | None]] = []
        peers: list[tuple[Watched, str | None]] = []
        imports: list[float] = []
        try:
            for n in range(args.runs):  # alternated: neither always runs on a machine the other warmed
                for kind, runs in (("batchrun", ours), ("peer", peers))[:: 1 if n % 2 == 0 else -1]:
                    folder = root / f"{kind}-{n}"
                    command, output = sample_job(folder) if kind == "batchrun" else peer_run(folder, base_url)
                    watched = watch(
                        command, stderr=[], cwd=folder
                    )  # not the repo: -m batchrun imports from cwd
                    runs.append((watched, failure(watched, (0,), output, SAMPLE_ROWS)))
                imported = watch([sys.executable, "-c", f"import {STACK}"], cwd=root)
                assert imported.exit_code == 0, f"cannot import {STACK}"
                imports.append(imported.wall_s)
        finally:
            simulator.terminate()
            simulator.wait()
        ours_calls = notebook_calls("batchrun", root / "notebook-batchrun", args.runs)
        peer_calls = notebook_calls("peer", root / "notebook-peer", args.runs)
    print(f"python {sys.version.split()[0]}; median of {args.runs}")
    print("| what | batchrun | openai SDK | ratio | target |")
    print("|---|---|---|---|---|")
    a, b = median_watched(ours), median_watched(peers)
    if isinstance(a, str) or isinstance(b, str):
        why = (a if isinstance(a, str) else "", b if isinstance(b, str) else "")
        print(f"| sample job (300 rows) | {why[0]} | {why[1]} | FAILED: no figures | |")
    else:
        print(
            f"| sample job: wall s | {a[0]:.2f} | {b[0]:.2f} | {a[0] / b[0]:.2f}x | <= 0.6: "
            f"{'pass' if a[0] <= 0.6 else 'FAIL'} |"
        )
        print(
            f"| sample job: peak RSS MB | {a[1]:.0f} | {b[1]:.0f} | {a[1] / b[1]:.2f}x | <= 160: "
            f"{'pass' if a[1] <= 160 else 'FAIL'} |"
        )
        floor = statistics.median(imports)
        print(f"| importing batchrun's libraries, nothing else: wall s | {floor:.2f} | | | |")
    if isinstance(ours_calls, str) or isinstance(peer_calls, str):
        print(
            f"| notebook call (20 rows) | {ours_calls if isinstance(ours_calls, str) else ''} | "
            f"{peer_calls if isinstance(peer_calls, str) else ''} | FAILED: no figures | |"
        )
    else:
        x, y = statistics.median(ours_calls), statistics.median(peer_calls)
        print(
            f"| `batchrun.run` in a running loop, 20 rows: s | {x:.3f} | {y:.3f} | {x / y:.2f}x | <= 0.4: "
            f"{'pass' if x <= 0.4 else 'FAIL'} |"
        )


if __name__ == "__main__":
    main()
