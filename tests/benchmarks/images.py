"""Images in rows: peak RSS and rows/s of a job whose every row sends a ~1 MB image, beside the
same rows as a text-only job (the peer), through the real CLI, in the same run.

    python tests/benchmarks/images.py [--rows 100000] [--images 300] [--rounds 1]

A few hundred distinct image files (PNGs of seeded noise, which does not compress: 580 x 580,
~1 MB each, 765 tokens at the simulator's tile rule) are written once and reused across rows:
row i names image i % --images, by a path relative to its Parquet input, so the disk holds
--images MB however many rows there are. The image job sends each row's text and image
(`prompt.images`, inline as a data URL of ~1.35 MB); the peer sends the same text alone.

One simulator process (`batchrun simulate`, pinned to core 1) serves both; each batchrun is its
own process pinned to core 0 (`taskset`), as in run.py: `batchrun run JOB -q --fresh` at
concurrency 64, the report page drawn as a run draws it. Each job runs --rounds times, the
order rotated; a job's figures are those of its median run by rows/s. Rows/s is over the
process's whole life; CPU is its user + sys; peak RSS is its own VmHWM, polled every 20 ms (see
run.watch); "simulator busy" is the share of core 1 the simulator used while the job ran (it
decodes every image's base64 to read its size). A watchdog kills a run above --max-rss-mb.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from run import KEY_ENV, REPO, SEED, cpu_s, pinned, server, watch

sys.path.insert(0, str(REPO / "sample_data"))
from make_sample_data import png as sample_png

SIDE = 580  # 580 x 580 x 3 bytes of noise: ~1 MB as a PNG, 2 x 2 tiles
CONCURRENCY = 64


@dataclass(frozen=True)
class Result:
    job: str
    rows: int
    wall_s: float
    cpu_s: float
    rss_mb: float
    server_busy: float
    requests: int
    failure: str | None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s


def png(side: int, pixels: bytes) -> bytes:
    """An 8-bit RGB PNG of `pixels` (side x side), stored with little compression: noise does
    not compress, and zlib's level 1 keeps generating a few hundred of them quick."""
    row = side * 3
    lines = b"".join(b"\0" + pixels[i * row : (i + 1) * row] for i in range(side))
    return sample_png(side, side, lines, level=1)


def make_input(folder: Path, rows: int, images: int) -> Path:
    """`images` distinct noise pictures in folder/images, and a Parquet table of `rows` rows
    (id, text, photo), row i naming picture i % images."""
    pictures = folder / "images"
    pictures.mkdir()
    rng = random.Random(SEED)
    for i in range(images):
        (pictures / f"{i:04d}.png").write_bytes(png(SIDE, rng.randbytes(SIDE * SIDE * 3)))
    ids = pl.int_range(1, rows + 1, eager=True).alias("id")
    table = pl.DataFrame(ids).with_columns(
        text=pl.format("Product {} of the catalogue, a picture of it taken in the studio.", pl.col("id")),
        photo=pl.format("images/{}.png", ((pl.col("id") - 1) % images).cast(pl.String).str.zfill(4)),
    )
    path = folder / "input.parquet"
    table.write_parquet(path)
    return path


def write_job(folder: Path, input_path: Path, base_url: str, images: bool) -> Path:
    prompt: dict[str, object] = {"system": "You describe products.", "user": "Describe it: {text}"}
    if images:
        prompt["images"] = ["photo"]
    job = {
        "input": {"path": str(input_path), "id_column": "id"},
        "output": {"path": str(folder / "out.parquet")},
        "model": "grok-4.3",
        "prompt": prompt,
        "params": {"temperature": 0.2, "max_tokens": 60},
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV},
        "concurrency": CONCURRENCY,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def start_simulator() -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "batchrun", "simulate", "--port", "0", "--seed", str(SEED)]
    proc = subprocess.Popen(pinned(1, cmd), stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    return proc, proc.stderr.readline().rsplit(" ", 1)[-1].strip()


def run_job(
    name: str,
    folder: Path,
    job: Path,
    sim: subprocess.Popen[str],
    base_url: str,
    rows: int,
    max_rss_mb: float,
) -> Result:
    server(base_url, "reset")
    before = cpu_s(sim.pid)
    stderr: list[str] = []
    cmd = pinned(0, [sys.executable, "-m", "batchrun", "run", str(job), "-q", "--fresh"])
    run = watch(cmd, max_rss_mb=max_rss_mb, stderr=stderr)
    busy = (cpu_s(sim.pid) - before) / run.wall_s
    stats = server(base_url, "stats")
    failure = None
    if run.killed_for_memory:
        failure = f"killed above {max_rss_mb:,.0f} MB"
    elif run.exit_code != 0:
        failure = f"exit {run.exit_code}: {''.join(stderr)[-300:]}"
    elif (ok := ok_rows(folder / "out.parquet")) != rows:
        failure = f"{ok:,} rows ok of {rows:,}"
    return Result(name, rows, run.wall_s, run.cpu_s, run.rss_mb, busy, stats["requests"], failure)


def ok_rows(output: Path) -> int:
    return int(pl.scan_parquet(output).filter(pl.col("status") == "ok").select(pl.len()).collect().item())


def median(results: list[Result]) -> Result:
    failed = [r for r in results if r.failure]
    return failed[0] if failed else sorted(results, key=lambda r: r.rows_per_s)[(len(results) - 1) // 2]


def run_rounds(folder: Path, input_path: Path, args: argparse.Namespace) -> dict[str, list[Result]]:
    """Each job --rounds times against one simulator, the order rotated."""
    sim, base_url = start_simulator()
    runs: dict[str, list[Result]] = {"images": [], "text only (peer)": []}
    names = list(runs)
    try:
        for r in range(args.rounds):
            for name in names[r % 2 :] + names[: r % 2]:  # rotated: neither always first
                run_folder = folder / f"round{r + 1}-{name.split()[0]}"
                run_folder.mkdir()
                job = write_job(run_folder, input_path, base_url, images=name == "images")
                result = run_job(name, run_folder, job, sim, base_url, args.rows, args.max_rss_mb)
                runs[name].append(result)
                said = f"failed: {result.failure}" if result.failure else f"{result.rows_per_s:,.0f} rows/s"
                print(f"  round {r + 1}: {name}: {said}, peak RSS {result.rss_mb:,.0f} MB", flush=True)
    finally:
        sim.terminate()
        sim.wait()
    return runs


def print_table(runs: dict[str, list[Result]]) -> None:
    """A job's median run a line, the image job's ratios to the peer's."""
    image, text = median(runs["images"]), median(runs["text only (peer)"])
    print("| job | rows/s | CPU ms/row | peak RSS MB | simulator busy | vs text only |")
    print("|---|---|---|---|---|---|")
    for res in (image, text):
        if res.failure:
            print(f"| {res.job} | FAILED ({res.failure}) | | | | |")
            continue
        ratio = ""
        if res is image and not text.failure:
            ratio = f"{res.rows_per_s / text.rows_per_s:.2f}x rows/s, {res.rss_mb / text.rss_mb:.2f}x RSS"
        print(
            f"| {res.job} | {res.rows_per_s:,.0f} | {res.cpu_s * 1000 / res.rows:.2f} | {res.rss_mb:,.0f} | "
            f"{res.server_busy:.0%} | {ratio} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=300, help="distinct ~1 MB image files")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each job; its median is shown")
    parser.add_argument("--max-rss-mb", type=float, default=4000, help="kill a batchrun above this")
    parser.add_argument("--workdir", type=Path, help="where the images and outputs go (default: TMPDIR)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the images, jobs and outputs (to draw pages)"
    )
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, polars {pl.__version__}, {os.cpu_count()} cores;", end=" ")
    print("batchrun on core 0, simulator on core 1; other sessions share the machine: figures are noisy")
    with contextlib.ExitStack() as stack:
        if args.keep:
            folder = Path(tempfile.mkdtemp(dir=args.workdir, prefix="batchrun-images-"))
            print(f"kept in {folder}")
        else:
            made = tempfile.TemporaryDirectory(dir=args.workdir, prefix="batchrun-images-")
            folder = Path(stack.enter_context(made))
        started = time.monotonic()
        input_path = make_input(folder, args.rows, args.images)
        size = sum(f.stat().st_size for f in (folder / "images").iterdir())
        print(
            f"input: {args.rows:,} rows, {args.images} distinct images ({size / 1e6:,.0f} MB, "
            f"{size / args.images / 1e6:.2f} MB each), made in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        runs = run_rounds(folder, input_path, args)
    print_table(runs)


if __name__ == "__main__":
    main()
