"""The Python driver: run a job from Python code or a notebook cell.

    out = batchrun.run(df, model="grok-4.3", prompt="Summarize: {text}", checkpoint="runs/s.sqlite")
    out = await batchrun.arun(df, ...)                  # the same, in async code
    job = batchrun.Job.from_yaml("jobs/summarize.yaml"); job.run(); job.estimate(); job.status()

Every job-file key is a keyword argument with the same meaning, checked by the same validators
(job.job_from_mapping). `run` works inside a running event loop (a Jupyter cell is one): the run
gets a thread and a loop of its own. A KeyboardInterrupt or a cancelled `arun` stops like the
CLI's first Ctrl-C: in-flight rows finish within the grace period and are checkpointed, the
output is written, then the interruption is raised again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from batchrun.core import Stop
from batchrun.estimate import Estimate, estimate_job
from batchrun.job import JobSpec, job_from_mapping, load_job
from batchrun.loop import run_async
from batchrun.plan import SIMULATED_ENDPOINT, prepare
from batchrun.progress import Progress
from batchrun.report import RunResult
from batchrun.runner import RunOptions, run_job
from batchrun.sources import scan_table
from batchrun.storage import Url, location

T = TypeVar("T")
PathLike = str | Path


class Job:
    """A validated job: from a job file (`Job.from_yaml`) or from keyword arguments (`Job.define`)."""

    def __init__(self, spec: JobSpec, checkpoint: PathLike | None = None, note: str | None = None):
        self.spec = spec
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None  # None: beside the output
        self._note = note  # said when the job runs

    @classmethod
    def from_yaml(cls, path: PathLike, *, checkpoint: PathLike | None = None) -> Job:
        return cls(load_job(path), checkpoint)

    @classmethod
    def define(
        cls, data: Any = None, *, checkpoint: PathLike | None = None, folder: PathLike = ".", **keys: Any
    ) -> Job:
        """A job from job-file keys given as arguments; `data` is the input (a path, a polars
        DataFrame or LazyFrame, a pandas DataFrame or a pyarrow Table), relative paths are
        resolved against `folder`. Without `checkpoint`, it goes beside `output` when given,
        else to a temporary folder (a note says where)."""
        folder = Path(folder).resolve()
        note = None
        if checkpoint is None and keys.get("output") is None:
            checkpoint = Path(tempfile.mkdtemp(prefix="batchrun-")) / "checkpoint.sqlite"
            note = f"note: no checkpoint= given; checkpointing in {checkpoint} (pass checkpoint= to resume)"
        elif checkpoint is not None:
            checkpoint = folder / checkpoint
        return cls(job_from_mapping(_job_keys(data, keys, checkpoint, folder), folder), checkpoint, note)

    def run(self, **options: Any) -> RunResult:
        """Run (or resume) the job; the figures, with the output table as `.table`. Options:
        simulate, simulate_latency_ms, fresh, retry_failed, limit, concurrency, max_cost_usd,
        grace_s, quiet, yes, ray (True, an address or RayOptions), workers, and http_client (your
        own httpx2.AsyncClient; with `run`, one not yet used on another loop). Job-wide errors raise
        BatchrunError (JobError, EndpointUnavailable...); a job changed since its last run so that
        finished rows would be sent again raises JobChanged (with .rows and .cost_usd) unless
        yes=True."""
        stop = Stop()
        if (ray := _with_ray(options).get("ray")) is not None:
            from batchrun.distributed.cluster import connect

            connect(ray.address)  # on the caller's thread, which Ray prefers for ray.init
        return _in_own_thread(lambda: self._run(options, stop), stop)

    async def arun(self, **options: Any) -> RunResult:
        """`run` for async code: awaited on the caller's loop. Cancelling it stops the run as a
        first Ctrl-C does, and CancelledError is raised once the output is written."""
        return await self._run(options, Stop())

    async def _run(self, options: Mapping[str, Any], stop: Stop) -> RunResult:
        run_options = RunOptions(checkpoint=self.checkpoint, **_with_ray(options))
        progress = Progress(run_options.quiet, notebook=_in_notebook())
        if self._note:
            progress.say(self._note, "note")
        try:
            with _simulator(self.spec, run_options) as base_url:
                result = await run_job(self.spec, run_options, progress, base_url=base_url, stop=stop)
        finally:
            progress.close()
        # The caller asked for a table in memory: read back as written (built in flat memory).
        table = scan_table(result.output_path, self.spec.output.format).collect()
        return dataclasses.replace(result, table=table)

    def estimate(self, *, simulate: bool = False) -> Estimate:
        """What the rows still to do should cost, as `batchrun estimate` projects it."""
        job = prepare(self.spec, checkpoint=self.checkpoint, write=False)
        fingerprint = job.fingerprint(simulate=False)
        return estimate_job(job, (fingerprint, fingerprint | {"endpoint.base_url": SIMULATED_ENDPOINT}))

    def status(self) -> dict[str, int]:
        """Rows by status so far, from the checkpoint (checked against the job, as `run` does)."""
        from batchrun.plan import read_checkpoint

        job = prepare(self.spec, checkpoint=self.checkpoint, write=False)
        counts = {"ok": 0, "failed": 0, "skipped": 0}
        if job.checkpoint_path.exists():
            fingerprint = job.fingerprint(simulate=False)
            simulated = fingerprint | {"endpoint.base_url": SIMULATED_ENDPOINT}
            checkpoint = read_checkpoint(job, (fingerprint, simulated))
            try:
                counts.update(checkpoint.status_counts(below=job.source.row_count))
            finally:
                checkpoint.close()
        done = sum(counts.values())
        return {**counts, "pending": job.source.row_count - done, "total": job.source.row_count}


def run(data: Any = None, /, *, checkpoint: PathLike | None = None, **keys_and_options: Any) -> pl.DataFrame:
    """Run a job given as keyword arguments over `data`; the output table, one row per input row."""
    job, options = _split(data, checkpoint, keys_and_options)
    table = job.run(**options).table
    assert table is not None
    return table


async def arun(
    data: Any = None, /, *, checkpoint: PathLike | None = None, **keys_and_options: Any
) -> pl.DataFrame:
    """`run` for async code (a notebook cell can `await` it)."""
    job, options = _split(data, checkpoint, keys_and_options)
    table = (await job.arun(**options)).table
    assert table is not None
    return table


RUN_OPTIONS = (
    "simulate",
    "simulate_latency_ms",
    "fresh",
    "retry_failed",
    "limit",
    "max_cost_usd",
    "grace_s",
    "quiet",
    "yes",
    "ray",
    "workers",
    "http_client",
)


def _with_ray(options: Mapping[str, Any]) -> dict[str, Any]:
    """`ray=True` (a local Ray), `ray="HOST:PORT"` or `ray=RayOptions(...)`, with `workers=N`."""
    options = dict(options)
    ray, workers = options.pop("ray", None), options.pop("workers", None)
    if ray is None or ray is False:
        if workers is not None:
            raise TypeError("workers= goes with ray=")
        return options
    from batchrun.distributed import RayOptions

    if not isinstance(ray, RayOptions):
        ray = RayOptions(None if ray is True else str(ray), workers)
    return {**options, "ray": ray}


def _split(data: Any, checkpoint: PathLike | None, given: Mapping[str, Any]) -> tuple[Job, dict[str, Any]]:
    options = {k: v for k, v in given.items() if k in RUN_OPTIONS}
    keys = {k: v for k, v in given.items() if k not in RUN_OPTIONS}
    return Job.define(data, checkpoint=checkpoint, **keys), options


def _job_keys(data: Any, keys: dict[str, Any], checkpoint: Path | None, folder: Path) -> dict[str, Any]:
    """Job-file keys from the arguments: `prompt` may be the user template alone, `output` a
    path alone, and `data` fills input.path (a table in memory is written beside the checkpoint,
    byte for byte the same on a rerun, so the checkpoint's input hash still matches)."""
    keys = dict(keys)
    if isinstance(keys.get("prompt"), str):
        keys["prompt"] = {"user": keys["prompt"]}
    output = keys.get("output")
    if isinstance(output, str | Path):
        keys["output"] = {"path": str(output)}
    elif output is None and checkpoint is not None:
        keys["output"] = {"path": str(checkpoint.with_name(checkpoint.name + ".output.parquet"))}
    if data is not None:
        # A table in memory goes beside the checkpoint, or beside the output that it goes beside
        # (for an output URL, where its checkpoint goes on local disk).
        output_at = location(keys["output"]["path"])
        beside = checkpoint or (
            output_at.local_stem(Path.cwd()) if isinstance(output_at, Url) else folder / output_at
        )
        given = keys.get("input")
        path = _input_path(data, beside.with_name(beside.name + ".input.parquet"))
        keys["input"] = {**(given if isinstance(given, Mapping) else {}), "path": str(path)}
    return keys


def _input_path(data: Any, path: Path) -> str | Path:
    if isinstance(data, str | Path):
        return data  # as given: Path() would turn s3://b/k into s3:/b/k
    if isinstance(data, pl.LazyFrame):
        data = data.collect()
    if not isinstance(data, pl.DataFrame):
        module = type(data).__module__.split(".")[0]
        if module == "pandas":
            data = pl.from_pandas(data)
        elif module == "pyarrow":
            data = pl.from_arrow(data)
        else:
            raise TypeError(
                f"batchrun cannot read a {type(data).__name__}: give a path, a polars DataFrame or "
                "LazyFrame, a pandas DataFrame or a pyarrow Table"
            )
    assert isinstance(data, pl.DataFrame)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_parquet(path)
    return path


@contextlib.contextmanager
def _simulator(spec: JobSpec, options: RunOptions) -> Iterator[str | None]:
    """The simulator's URL for simulate=True (started here: production code never starts it)."""
    if not options.simulate:
        yield None
        return
    from batchrun.simulator import SimulatorConfig, serve_in_thread

    config = SimulatorConfig(latency_ms=options.simulate_latency_ms, extra_models=(spec.model,))
    with serve_in_thread(config) as sim:
        yield sim.base_url


def _in_own_thread(make: Callable[[], Coroutine[Any, Any, T]], stop: Stop) -> T:
    """Run a coroutine on a thread with its own event loop, so that it works whether or not this
    thread runs a loop (a notebook's). A KeyboardInterrupt here asks the run to stop (a second, at
    once), waits for it to write what it has, and is raised again."""
    outcome: list[T] = []
    failure: list[BaseException] = []
    finished = threading.Event()  # not thread.join(): a KeyboardInterrupt inside join breaks is_alive()

    def work() -> None:
        try:
            outcome.append(run_async(make()))
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            finished.set()

    threading.Thread(target=work, name="batchrun", daemon=True).start()
    interrupted: KeyboardInterrupt | None = None
    while not finished.is_set():
        try:
            finished.wait(0.1)
        except KeyboardInterrupt as exc:
            interrupted = exc
            stop.request()
    if interrupted is not None:
        raise interrupted
    if failure:
        raise failure[0]
    return outcome[0]


def _in_notebook() -> bool:
    """Under a Jupyter kernel, where tqdm.auto draws a widget."""
    return "ipykernel" in sys.modules and not sys.stderr.isatty()
