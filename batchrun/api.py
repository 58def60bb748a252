"""The Python driver: run a job from Python code or a notebook cell.

    out = batchrun.run(df, model="grok-4.3", prompt="Summarize: {text}", checkpoint="runs/s.sqlite")
    out = await batchrun.arun(df, ...)                  # the same, in async code
    job = batchrun.Job.from_yaml("jobs/summarize.yaml"); job.run(); job.estimate(); job.status()

`Job` does what each command of the CLI does (run, validate, status, estimate with a pilot, cost,
report, prune, models), and `cost_table` and `draw_report` take an output table too; the CLI only parses
flags and renders what they return.

Every job-file key is a keyword argument with the same meaning, checked by the same validators
(job.job_from_mapping). `run` works inside a running event loop (a Jupyter cell is one): the run
gets a thread and a loop of its own. A KeyboardInterrupt or a cancelled `arun` stops like the
CLI's first Ctrl-C: in-flight rows finish within the grace period and are checkpointed, the
output is written, then the interruption is raised again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from batchrun.core import Stop
from batchrun.errors import BatchrunError, RequestFailed
from batchrun.estimate import Estimate, Pilot, estimate_job, plan_pilot
from batchrun.executors import api_key
from batchrun.job import EndpointSpec, JobSpec, RetrySpec, TableFormat, job_from_mapping, load_job
from batchrun.loop import run_async
from batchrun.models import check_model, list_models, without_model_check
from batchrun.plan import CHECKPOINT_SUFFIX, REPORT_SUFFIX, SIMULATED_KEY, PreparedJob, beside, prepare
from batchrun.progress import Progress
from batchrun.report import RunResult, cost_report, job_table, read_output_table
from batchrun.runner import RunOptions, prune, run_job
from batchrun.sources import input_format, scan_table
from batchrun.status import Status, job_status, made_for
from batchrun.storage import Location, Url, location

T = TypeVar("T")
PathLike = str | Path


@dataclass(frozen=True)
class Validation:
    """What `Job.validate` found: the rows, where they come from and go, the first request the job
    would send, and a note when the model name could not be checked."""

    rows: int
    input: Location
    model: str
    output: Location
    first_request: dict[str, Any]
    note: str | None


class Job:
    """A validated job: from a job file (`Job.from_yaml`) or from keyword arguments (`Job.define`)."""

    def __init__(
        self,
        spec: JobSpec,
        checkpoint: PathLike | None = None,
        note: str | None = None,
        *,
        output: str | None = None,
    ):
        self.spec = spec
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None  # None: beside the output
        self.output = output  # None: output.path
        self._note = note  # said when the job runs

    @classmethod
    def from_yaml(
        cls, path: PathLike, *, checkpoint: PathLike | None = None, output: str | None = None
    ) -> Job:
        """The job in a job file; `output` (a path or URL) in place of its output.path."""
        return cls(load_job(path), checkpoint, output=output)

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
        grace_s, quiet, yes, ray (True, an address or RayOptions), workers, batch (True, or
        BatchOptions: through the provider's Batch API), and http_client (your
        own httpx2.AsyncClient; with `run`, one not yet used on another loop), check_model=False
        (as endpoint.check_model: false). Job-wide errors raise BatchrunError (JobError,
        EndpointUnavailable...), whose `remedy` names the option that gets past it, if one does; a
        job changed since its last run so that finished rows would be sent again raises JobChanged
        (with .rows and .cost_usd) unless yes=True."""
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
        options = dict(options)
        spec = self.checked(options.pop("check_model", True))
        run_options = RunOptions(checkpoint=self.checkpoint, **{"output": self.output, **_with_ray(options)})
        progress = Progress(run_options.quiet, notebook=_in_notebook())
        if self._note:
            progress.say(self._note, "note")
        try:
            with _simulator(spec, run_options) as base_url:
                result = await run_job(spec, run_options, progress, base_url=base_url, stop=stop)
        finally:
            progress.close()
        # The caller asked for a table in memory: read back as written (built in flat memory).
        table = scan_table(result.output_path, spec.output.format).collect()
        return dataclasses.replace(result, table=table)

    def checked(self, check_model: bool) -> JobSpec:
        """The job, with the model check off when `check_model` is False."""
        return self.spec if check_model else without_model_check(self.spec)

    def prepared(self, write: bool = False, check_model: bool = True) -> PreparedJob:
        """The job checked as a run checks it before sending; `write`: its output folder too."""
        return prepare(self.checked(check_model), self.output, write, checkpoint=self.checkpoint)

    def validate(self, *, check_model: bool = True) -> Validation:
        """Check the job and its input as `run` does before sending, and the model against the
        endpoint's list when the key is set (unless check_model=False); send no chat request."""
        job = self.prepared(write=True, check_model=check_model)
        return Validation(
            rows=job.source.row_count,
            input=job.source.path,
            model=job.spec.model,
            output=job.output_path,
            first_request=job.first_request(),
            note=model_note(job.spec),
        )

    def status(self) -> Status:
        """Rows by status, failures, tokens and cost so far, from the checkpoint (checked against
        the job, as `run` does)."""
        return job_status(self.prepared())

    def estimate(
        self,
        *,
        sample: int | None = None,
        simulate: bool = False,
        send: Callable[[Pilot], RunResult | None] | None = None,
    ) -> Estimate:
        """What the rows still to do should cost, saved beside the output for the next run's
        report to compare with. `sample=N` first sends a random pilot of N rows still to do (to
        the simulator with simulate=True) and projects from their usage: `send` sends it (by
        default `run(rows=pilot.rows, simulate=simulate, yes=True)`) or declines (returns None).
        The model is not checked here: `validate` checks it."""
        job = self.prepared(write=True)
        readable = made_for(job)
        projection = estimate_job(job, readable)
        if sample is not None and (pilot := plan_pilot(job, readable, projection, sample)):
            send = send or (lambda p: self.run(rows=p.rows, simulate=simulate, yes=True))
            if send(pilot) is not None:
                projection = estimate_job(job, readable)
        projection.save(job, readable[1] if simulate else readable[0])
        return projection

    def cost(self, by: Sequence[str] = ()) -> pl.DataFrame:
        """Rows, tokens and cost per (by..., model, status) from the checkpoint, also while the
        job runs; `by` may name any column of the input."""
        job = self.prepared()
        with tempfile.TemporaryDirectory(prefix="batchrun-cost-") as workdir:
            return cost_report(job_table(job, tuple(by), made_for(job), Path(workdir)), tuple(by))

    def report(self, by: Sequence[str] = ()) -> Path:
        """Draw the run report page (OUTPUT.report.html) again from the checkpoint as it is now,
        or from the output without one; where it is."""
        from batchrun.html_report import Sources, page_path, write_page

        job = self.prepared()
        format: TableFormat = "parquet"  # as job_table builds it
        with tempfile.TemporaryDirectory(prefix="batchrun-report-") as workdir:
            if job.checkpoint_path.exists():
                table = job_table(job, tuple(by), made_for(job), Path(workdir))
            elif isinstance(job.output_path, Path) and job.output_path.exists():
                table, format = read_output_table(job.output_path), input_format(job.output_path)
            else:
                raise BatchrunError(
                    f"{self.spec.job_path} has no checkpoint ({job.checkpoint_path}) and no output "
                    "yet: run it first"
                )
            job_file = str(self.spec.job_path)
            sources = Sources(table, job.checkpoint_path, job.report_path, job_file, tuple(by), format)
            html_path = page_path(job.report_path)
            write_page(sources, html_path)
        return html_path

    def prune(self) -> tuple[int, int] | None:
        """Drop the answers in the checkpoint that no row of the job as it is now uses (an earlier
        prompt's, a removed row's); (dropped, kept), or None without a checkpoint."""
        spec = self.spec
        if self.checkpoint is not None:
            spec = spec.model_copy(update={"checkpoint": self.checkpoint})
        return prune(spec, self.output)

    def models(self, *, simulate: bool = False) -> list[str]:
        """The models the job's endpoint offers to its key (the simulator's with simulate=True)."""
        return offered_models(self.spec, simulate)


def model_note(spec: JobSpec) -> str | None:
    """`run`'s start check, for commands that send no chat request: made when the key is set;
    a note when the model name was not checked."""
    if not spec.endpoint.check_model:
        return None
    if not os.environ.get(spec.endpoint.api_key_env, "").strip():
        return f"note: {spec.endpoint.api_key_env} is not set; model name not checked"
    return check_model(spec, spec.endpoint.base_url, api_key(spec.endpoint))


def offered_models(spec: JobSpec | None, simulate: bool = False) -> list[str]:
    """The models a job's endpoint (without a job: RelayDance's) offers to the key, sorted; with
    `simulate`, the simulator's and the job's."""
    from batchrun.simulator import SimulatorConfig, serve_in_thread

    endpoint = spec.endpoint if spec else EndpointSpec()
    retry = spec.retry if spec else RetrySpec()
    with contextlib.ExitStack() as stack:
        if simulate:
            config = SimulatorConfig(extra_models=(spec.model,) if spec else ())  # the job's model too
            endpoint = EndpointSpec(base_url=stack.enter_context(serve_in_thread(config)).base_url)
        key = SIMULATED_KEY if simulate else api_key(endpoint)
        try:
            offered = list_models(endpoint.base_url, key, endpoint, retry)
        except RequestFailed as exc:
            raise BatchrunError(f"cannot list models at {endpoint.base_url}: {exc}") from None
    if offered is None:
        raise BatchrunError(f"{endpoint.base_url} offers no model list (GET /models answered 404)")
    return sorted(offered)


def cost_table(path: PathLike, by: Sequence[str] = (), *, output: str | None = None) -> pl.DataFrame:
    """Rows, tokens and cost per (by..., model, status), as `batchrun cost` gives them: of a job
    file, from its checkpoint (`output` as in Job.from_yaml), or of an output table."""
    if _is_job_file(path):
        return Job.from_yaml(path, output=output).cost(by)
    _no_output_for_a_table(path, output)
    return cost_report(read_output_table(Path(path)), tuple(by))


def draw_report(path: PathLike, by: Sequence[str] = (), *, output: str | None = None) -> Path:
    """Draw the run report page again, as `batchrun report` does: of a job file, from its
    checkpoint, or of an output table and the checkpoint beside it; where the page is."""
    if _is_job_file(path):
        return Job.from_yaml(path, output=output).report(by)
    _no_output_for_a_table(path, output)
    from batchrun.html_report import Sources, page_path, write_page

    table_path = Path(path)
    report_json = beside(table_path, REPORT_SUFFIX)
    table, format = read_output_table(table_path), input_format(table_path)
    sources = Sources(table, beside(table_path, CHECKPOINT_SUFFIX), report_json, None, tuple(by), format)
    html_path = page_path(report_json)
    write_page(sources, html_path)
    return html_path


def _is_job_file(path: PathLike) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def _no_output_for_a_table(path: PathLike, output: str | None) -> None:
    if output is not None:
        raise BatchrunError(f"{path} is an output table: `output=` goes with a job file")


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
    "batch",
    "http_client",
    "check_model",
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
