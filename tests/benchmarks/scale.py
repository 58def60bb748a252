"""Scale: what grows with the number of rows, measured through the real CLI (issue #13 item 5).

    python tests/benchmarks/scale.py [--rows 1000000] [--big 10000000] [--skip-big | --big-only]

One simulator process (`batchrun simulate`, pinned to core 1) serves every part; each batchrun is
its own process pinned to core 0 (`taskset`), as in run.py. Peak RSS is the batchrun process's
alone: its VmHWM, polled every 20 ms (not wait4's ru_maxrss, which on Linux keeps the high-water
mark of the memory the child had before its exec: this script's own). A watchdog kills it above
--max-rss-mb (the machine is shared), which is reported as a failed target. Times are on
CLOCK_MONOTONIC, one clock for every process on Linux: "first request" is the simulator's first
arrival minus the moment batchrun was started; "output build" is the moment the output file
appeared (polled every 20 ms; it is renamed into place whole) minus the simulator's last answer.

  (a) end to end: N generated rows (Parquet: `id` + ~300 characters of text, deterministic),
      `batchrun run JOB -q --fresh`, concurrency 64; rows/s over the process's whole life.
  (b) at N = --rows and N = --big, with a checkpoint written through the checkpoint's own code
      (fill_checkpoint: the one function to change when its API does):
      - output build: every row done but the last, so the run sends one request and then builds
        the output: output build = output written - that answer;
      - resume: a pseudo-random half done; the process is killed (-9) 2 s after its first request.
  (c) incremental: N done (the finished job of (b)), 1,000 rows appended to the input file, rerun:
      requests at the simulator (must be 1,000) and the time to finish.
  S1: run.py's scenario S1 (batchrun only) beside the README's figure from before #13.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from run import KEY_ENV, REPO, SCENARIOS, make_input, pinned, server, start_simulator, timed, watch
from run import write_job as write_s1_job

from batchrun.checkpoint import open_checkpoint
from batchrun.cost import job_price, request_cost
from batchrun.job import load_job
from batchrun.plan import PreparedJob, prepare
from batchrun.results import RowResult
from batchrun.sources import ROW

S1_README_ROWS_PER_S = 6_116  # README "Speed", S1 batchrun, before issue #13
APPENDED = 1_000
WORDS_PER_ROW = 42  # ~300 characters with the articles' vocabulary
GEN_CHUNK = 500_000
FILL_BATCH = 50_000
LINGER_S = 2.0  # a resume runs this long after its first request before the kill
HALF = 2**31  # a row is in the "random half" when its hash (mix) is below this


def rss_target_mb(rows: int) -> float:
    """Issue #13: peak RSS <= 250 MB + 60 bytes per input row."""
    return 250 + 60 * rows / 1e6


def mix(column: pl.Expr) -> pl.Expr:
    """A 32-bit integer hash (multiply, xor-shift): deterministic on every polars version, unlike
    polars' hash()."""
    x = (column.cast(pl.UInt64) * 2654435761) % 2**32
    x = x.xor(x // 2**16)
    x = (x * 0x45D9F3B) % 2**32
    return x.xor(x // 2**16)


# --- input and job ---------------------------------------------------------------------------


def vocabulary() -> pl.Series:
    """The words of the sample articles, sorted: the same list on every run."""
    text = pl.read_parquet(REPO / "sample_data" / "articles.parquet")["text"]
    return text.str.extract_all(r"[A-Za-z]+").explode().unique().sort()


def generate_input(path: Path, rows: int) -> None:
    """`rows` rows of `id` (1..rows) and text made of words picked by hashing (id, position):
    every text differs, and row i is the same whatever `rows` is, so a longer file is the shorter
    one with rows appended. Written a chunk at a time, then streamed into one file."""
    words = vocabulary()
    parts = path.with_name(path.name + ".parts")
    parts.mkdir()
    for start in range(0, rows, GEN_CHUNK):
        ids = pl.DataFrame({"id": pl.int_range(start + 1, min(start + GEN_CHUNK, rows) + 1, eager=True)})
        picked = [
            pl.lit(words).gather(mix(pl.col("id") * 64 + j) % words.len()) + ("." if j % 12 == 11 else "")
            for j in range(WORDS_PER_ROW)
        ]
        text = pl.concat_str(picked, separator=" ") + "."
        ids.select("id", text=text).write_parquet(parts / f"{start:012d}.parquet")
    pl.scan_parquet(sorted(parts.iterdir())).sink_parquet(path)
    shutil.rmtree(parts)


def write_job(folder: Path, input_path: Path, base_url: str) -> Path:
    job = {
        "input": {"path": str(input_path), "id_column": "id"},
        "output": {"path": str(folder / "out.parquet")},
        "model": "grok-4.3",
        "prompt": {"system": "You are a news editor.", "user": "Summarize in one line:\n\n{text}"},
        "params": {"temperature": 0.2, "max_tokens": 60},
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV},
        "concurrency": 64,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


# --- the checkpoint, through its own code ----------------------------------------------------


def fill_checkpoint(
    path: Path, job: PreparedJob, n_done: int, pick: Literal["first", "half"] = "first"
) -> int:
    """Record finished rows as a run on the job's endpoint would: the first `n_done` rows, or
    (pick="half") a pseudo-random half of all rows. Returns the rows recorded.

    The one place that knows the checkpoint's API (open_checkpoint, reprice, key_index, record):
    each row's result is keyed as the CLI keys it (request_key, occurrence), by the plan's own
    key pass over the whole input (PreparedJob.keyed_batches into the checkpoint's KeyIndex),
    which records the input's identity as a run's pass does: a resume then skips its pass.
    """
    price = job_price(job.spec)
    checkpoint = open_checkpoint(path, "fresh", job.fingerprint(simulate=False))
    try:
        # As runner.py does first: records the price, so the CLI finds nothing to reprice.
        checkpoint.reprice(repr(price), functools.partial(request_cost, price))
        cost = request_cost(price, 90, 60, 150, None)
        index = checkpoint.key_index(dedupe=False)
        recorded = 0
        # Every row keyed, as a run's pass keys them (and records the input's identity at its end).
        for batch in job.keyed_batches(index, job.keys(simulate=False)):
            positions = pl.Series([row[ROW] for row in batch.rows], dtype=pl.UInt64)
            keep = (positions < n_done).to_list()
            if pick == "half":
                keep = pl.select(mix(pl.lit(positions)) < HALF).to_series().to_list()
            done = [
                finished(row[ROW], row["id"], row["text"][:280], key, occurrence, cost)
                for row, key, occurrence, kept in zip(
                    batch.rows, batch.keys, batch.occurrences, keep, strict=True
                )
                if kept
            ]
            checkpoint.record(done)
            recorded += len(done)
        return recorded
    finally:
        checkpoint.close()


def finished(
    row: int, row_id: int, content: str, request_key: bytes, occurrence: int, cost_usd: float | None
) -> RowResult:
    """A row answered as the simulator answers (`max_tokens` 60 cut it short)."""
    return RowResult(
        row=row, id=str(row_id), status="ok", content=content, finish_reason="length", prompt_tokens=90,
        completion_tokens=60, total_tokens=150, cost_usd=cost_usd, attempts=1, latency_ms=3.1,
        model="grok-4.3", response_id=f"chatcmpl-{row}", request_key=request_key, occurrence=occurrence,
    )  # fmt: skip


# --- one batchrun process, watched -----------------------------------------------------------


@dataclass
class Run:
    exit_code: int
    wall_s: float
    rss_mb: float
    requests: int
    first_request_s: float | None  # simulator's first arrival - process start
    output_build_s: float | None  # output appeared - simulator's last answer
    killed_for_memory: bool
    stderr: list[str] = field(default_factory=list)

    def error(self) -> str:
        """The CLI's `Error:` line, if it gave one."""
        return next((line for line in self.stderr if line.startswith("Error:")), "")


def run_batchrun(
    args: list[str], base_url: str, output: Path, max_rss_mb: float, kill_after_first_s: float | None = None
) -> Run:
    """Run `batchrun ARGS` on core 0 until it exits (or is killed `kill_after_first_s` after its
    first request reached the simulator, or for memory), watched by run.watch."""
    output.unlink(missing_ok=True)
    server(base_url, "reset")
    kill_at: float | None = None

    def tick(pid: int, now: float) -> None:
        nonlocal kill_at
        if kill_after_first_s is not None and kill_at is None and server(base_url, "stats")["requests"]:
            kill_at = now + kill_after_first_s
        if kill_at is not None and now >= kill_at:
            os.kill(pid, signal.SIGKILL)
            kill_at = float("inf")

    stderr: list[str] = []
    cmd = pinned(0, [sys.executable, "-m", "batchrun", "run", *args])
    run = watch(cmd, output=output, max_rss_mb=max_rss_mb, tick=tick, stderr=stderr)
    stats = server(base_url, "stats")
    first, last = stats.get("first_arrival_monotonic"), stats.get("last_answer_monotonic")
    return Run(
        exit_code=run.exit_code,
        wall_s=run.wall_s,
        rss_mb=run.rss_mb,
        requests=stats["requests"],
        first_request_s=None if first is None else first - run.started,
        output_build_s=None if run.output_at is None or last is None else run.output_at - last,
        killed_for_memory=run.killed_for_memory,
        stderr=[line.rstrip("\n") for line in stderr],
    )


# --- report ----------------------------------------------------------------------------------

verdicts: list[tuple[str, bool]] = []


def show(label: str, value: str, target: str = "", ok: bool | None = None, part: str = "") -> None:
    """One figure, with its target and pass/fail when it has one; `part` names it in the summary."""
    mark = "" if ok is None else ("PASS" if ok else "FAIL")
    print(f"  {label:<44} {value:>16}   {target} {mark}".rstrip(), flush=True)
    if ok is not None:
        verdicts.append((f"{part} {label}".strip(), ok))


def show_rss(run: Run, rows: int, part: str) -> None:
    limit = rss_target_mb(rows)
    value = f"{run.rss_mb:,.0f} MB" + (" (killed)" if run.killed_for_memory else "")
    show("peak RSS", value, f"<= {limit:,.0f} MB", run.rss_mb <= limit and not run.killed_for_memory, part)


def refused(run: Run) -> str:
    if run.killed_for_memory:
        return "killed for memory"
    return f"exit {run.exit_code}: {run.error() or (run.stderr[-1] if run.stderr else '')}"


# --- the parts -------------------------------------------------------------------------------


def end_to_end(folder: Path, rows: int, base_url: str, max_rss_mb: float) -> None:
    print(f"(a) end to end: {rows:,} rows, concurrency 64, `batchrun run JOB -q --fresh`", flush=True)
    job = write_job(folder, folder / "input.parquet", base_url)
    run = run_batchrun([str(job), "-q", "--fresh"], base_url, folder / "out.parquet", max_rss_mb)
    if run.exit_code != 0:
        show("exit code", str(run.exit_code), "0", False)
        print(f"    {refused(run)}")
    show("rows/s (whole process)", f"{rows / run.wall_s:,.0f}")
    show("wall", f"{run.wall_s:,.1f} s")
    show_rss(run, rows, "(a)")
    show("output build (last answer -> output)", fmt_s(run.output_build_s))


def grows_with_n(folder: Path, rows: int, base_url: str, max_rss_mb: float, incremental: bool) -> None:
    print(f"(b) N = {rows:,}", flush=True)
    job_path = write_job(folder, folder / "input.parquet", base_url)
    job = prepare(load_job(job_path))
    target = 5.0 if rows >= 10_000_000 else None

    started = time.monotonic()
    done = fill_checkpoint(job.checkpoint_path, job, rows, pick="half")
    took = time.monotonic() - started
    print(f"  checkpoint: {done:,} rows done (a pseudo-random half), written in {took:.0f} s")
    run = run_batchrun(
        [str(job_path), "-q"], base_url, job.output_path, max_rss_mb, kill_after_first_s=LINGER_S
    )
    first = run.first_request_s
    show(
        "resume, half done: first request",
        fmt_s(first),
        "<= 5 s" if target else "(target at 10M: <= 5 s)",
        None if target is None else first is not None and first <= target,
    )
    if first is None:
        print(f"    {refused(run)}")
    show_rss(run, rows, f"(b) {rows:,} resume")

    started = time.monotonic()
    done = fill_checkpoint(job.checkpoint_path, job, rows - 1)
    took = time.monotonic() - started
    print(f"  checkpoint: {done:,} rows done (all but the last), written in {took:.0f} s")
    run = run_batchrun([str(job_path), "-q"], base_url, job.output_path, max_rss_mb)
    build = run.output_build_s
    build_ok = build is not None and run.exit_code == 0 and (rows < 10_000_000 or build <= 120)
    show(
        "output build (last answer -> output)",
        fmt_s(build if run.exit_code == 0 else None),
        "<= 120 s" if rows >= 10_000_000 else "(target at 10M: <= 120 s)",
        build_ok if rows >= 10_000_000 or run.exit_code != 0 else None,
    )
    if run.exit_code != 0:
        print(f"    {refused(run)}")
    show("  its run: first request / wall", f"{fmt_s(run.first_request_s)} / {fmt_s(run.wall_s)}")
    show_rss(run, rows, f"(b) {rows:,} output build")
    if incremental:
        append_rows(folder, rows, base_url, max_rss_mb, job_path, job)


def append_rows(
    folder: Path, rows: int, base_url: str, max_rss_mb: float, job_path: Path, job: PreparedJob
) -> None:
    print(f"(c) incremental: {rows:,} done, {APPENDED:,} rows appended to the input, rerun", flush=True)
    longer = folder / "longer.parquet"
    generate_input(longer, rows + APPENDED)
    os.replace(longer, folder / "input.parquet")  # the same file, grown, as a daily input grows
    run = run_batchrun([str(job_path), "-q"], base_url, job.output_path, max_rss_mb)
    show(
        "requests sent",
        f"{run.requests:,}",
        f"== {APPENDED:,}",
        run.requests == APPENDED and run.exit_code == 0,
    )
    if run.exit_code != 0:
        print(f"    {refused(run)}")
    show("time to finish", fmt_s(run.wall_s))
    show_rss(run, rows + APPENDED, "(c)")


def s1(folder: Path) -> None:
    """run.py's S1 with batchrun alone, on its own simulator (its default seed and settings)."""
    print("S1 (run.py's scenario, batchrun only)", flush=True)
    scenario = SCENARIOS["S1"]
    s1_folder = folder / "s1"
    s1_folder.mkdir()
    input_path = make_input(scenario.rows, s1_folder)
    sim, base_url = start_simulator(scenario)
    try:
        job = write_s1_job(s1_folder, input_path, base_url, scenario.concurrency, None)
        cmd = [sys.executable, "-m", "batchrun", "run", str(job), "-q", "--fresh"]
        outcome = timed("batchrun", cmd, sim, base_url, scenario.rows, s1_folder / "batchrun.parquet")
    finally:
        sim.terminate()
        sim.wait()
    low = S1_README_ROWS_PER_S * 0.85
    target = f">= {low:,.0f} (README {S1_README_ROWS_PER_S:,} - 15%)"
    if outcome.failure:  # a run that did not finish has no figure
        show("S1 rows/s", f"failed: {outcome.failure}", target, False)
        return
    show("S1 rows/s", f"{outcome.rows_per_s:,.0f}", target, outcome.rows_per_s >= low)


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:,.2f} s"


def at_scale(rows: int, workdir: Path | None, step: Callable[[Path, str], None]) -> None:
    """A folder holding a generated input of `rows` rows, and a simulator of its own."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="batchrun-scale-") as tmp:
        folder = Path(tmp)
        started = time.monotonic()
        generate_input(folder / "input.parquet", rows)
        mean = (
            pl.scan_parquet(folder / "input.parquet").select(pl.col("text").str.len_chars().mean()).collect()
        )
        print(
            f"input: {rows:,} rows, text {mean.item():.0f} characters on average, generated in "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
        sim, base_url = start_simulator(SCENARIOS["S1"])
        try:
            step(folder, base_url)
        finally:
            sim.terminate()
            sim.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="N of (a), (c) and the first (b)")
    parser.add_argument("--big", type=int, default=10_000_000, help="N of the second (b)")
    parser.add_argument("--skip-big", action="store_true", help="no second (b): it needs ~10 GB of disk")
    parser.add_argument("--big-only", action="store_true", help="only the second (b): no S1, (a), (c)")
    parser.add_argument("--skip-s1", action="store_true")
    parser.add_argument("--max-rss-mb", type=float, default=4000, help="kill a batchrun above this")
    parser.add_argument("--workdir", type=Path, help="where the inputs and checkpoints go (default: TMPDIR)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, polars {pl.__version__}, {os.cpu_count()} cores;", end=" ")
    print("batchrun on core 0, simulator on core 1; other sessions share the machine: figures are noisy")
    if not (args.skip_s1 or args.big_only):
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="batchrun-scale-") as tmp:
            s1(Path(tmp))

    def at_rows(folder: Path, base_url: str) -> None:
        end_to_end(folder, args.rows, base_url, args.max_rss_mb)
        grows_with_n(folder, args.rows, base_url, args.max_rss_mb, incremental=True)

    if not args.big_only:
        at_scale(args.rows, args.workdir, at_rows)
    if not args.skip_big:
        at_scale(
            args.big,
            args.workdir,
            lambda folder, url: grows_with_n(folder, args.big, url, args.max_rss_mb, incremental=False),
        )
    failed = [label for label, ok in verdicts if not ok]
    print(
        f"targets: {len(verdicts) - len(failed)} of {len(verdicts)} met"
        + (f"; missed: {', '.join(failed)}" if failed else "")
    )


if __name__ == "__main__":
    main()
