"""Resume without the key pass (#13): the first request of a resume at N rows, with the key pass
(the checkpoint's input identity dropped, so the run keys every row as before) and from the
checkpoint's index (the input unchanged since the pass that filled it).

    python tests/benchmarks/skip_pass.py [--rows 1000000]

scale.py's machinery: its generated input, fill_checkpoint, one simulator on core 1 and each
batchrun on core 0; "first request" is the simulator's first arrival minus batchrun's start.
Two checkpoints: all rows done but the last (the run sends one request and finishes), and a
pseudo-random half done (killed 2 s after its first request). Each is copied once filled and
put back before each run, so both runs resume the same checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).parent))
from scale import LINGER_S, at_scale, fill_checkpoint, fmt_s, run_batchrun, show, write_job

from batchrun.job import load_job
from batchrun.plan import prepare

CASES: tuple[tuple[str, Literal["first", "half"], int], ...] = (
    ("all done but the last", "first", -1),
    ("a random half done", "half", 0),
)


def resumes(folder: Path, base_url: str, rows: int) -> None:
    job_path = write_job(folder, folder / "input.parquet", base_url)
    job = prepare(load_job(job_path))
    saved = folder / "filled.sqlite"
    for label, pick, less in CASES:
        restore(job.checkpoint_path, None)
        done = fill_checkpoint(job.checkpoint_path, job, rows + less, pick)
        shutil.copyfile(job.checkpoint_path, saved)
        print(f"{rows:,} rows, {label} ({done:,})", flush=True)
        for how in ("key pass (as before)", "from the index"):
            restore(job.checkpoint_path, saved)
            if how.startswith("key pass"):
                with sqlite3.connect(job.checkpoint_path) as db:
                    db.execute("DELETE FROM meta WHERE key = 'input'")
            linger = LINGER_S if pick == "half" else None
            run = run_batchrun([str(job_path), "-q"], base_url, job.output_path, 4000, linger)
            show(f"{how}: first request", fmt_s(run.first_request_s))
            if run.exit_code not in (0, -9):
                print("    " + "\n    ".join(run.stderr[-3:]))
            if pick == "first":
                show(f"{how}: requests / wall", f"{run.requests} / {fmt_s(run.wall_s)}")


def restore(checkpoint: Path, saved: Path | None) -> None:
    """Put `saved` back as the checkpoint (None: no checkpoint), the last run's WAL removed."""
    for suffix in ("", "-wal", "-shm"):
        checkpoint.with_name(checkpoint.name + suffix).unlink(missing_ok=True)
    if saved is not None:
        shutil.copyfile(saved, checkpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    at_scale(args.rows, None, lambda folder, url: resumes(folder, url, args.rows))


if __name__ == "__main__":
    main()
