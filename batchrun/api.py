"""The Python driver: run a job from Python code or a notebook cell.

    out = batchrun.run(df, model="grok-4.3", prompt="Summarize: {text}", checkpoint="runs/s.sqlite")
    out = await batchrun.arun(df, ...)                  # the same, in async code
    job = batchrun.Job.from_yaml("jobs/summarize.yaml"); job.run(); job.estimate(); job.status()

`Job` does what each command of the CLI does (run, validate, status, estimate with a pilot, cost,
report, prune, models), and `cost_table` and `draw_report` take an output table too; the CLI only parses
flags and renders what they return.

Every job-file key is a keyword argument with the same meaning, checked by the same validators
(job.job_from_mapping), and so is every run option (RunOptions): named, typed and explained in the
signatures and docstrings that cog writes from the schema (tests/docgen.py), for help(), IDEs and
mypy. `run` returns the rows given with the result columns beside them, as the kind of table
given (tables.py). It works inside a running event loop (a Jupyter cell is one): the run gets a
thread and a loop of its own. A KeyboardInterrupt or a cancelled `arun` stops like the
CLI's first Ctrl-C: in-flight rows finish within the grace period and are checkpointed, the
output is written, then the interruption is raised again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

import polars as pl

from batchrun.core import Stop
from batchrun.errors import BatchrunError, RequestFailed
from batchrun.estimate import Estimate, Pilot, estimate_job, plan_pilot
from batchrun.executors import api_key
from batchrun.job import (
    EndpointSpec,
    JobSpec,
    RetrySpec,
    TableFormat,
    job_from_mapping,
    load_job,
    without_model_check,
)
from batchrun.loop import run_async
from batchrun.models import check_model, list_models
from batchrun.plan import CHECKPOINT_SUFFIX, REPORT_SUFFIX, SIMULATED_KEY, PreparedJob, prepare
from batchrun.plan import beside as next_to
from batchrun.progress import Progress
from batchrun.report import RunResult, cost_report, job_table, read_output_table
from batchrun.results import OUTPUT_RESULT_COLUMNS
from batchrun.runner import RunOptions, prune, run_job
from batchrun.sources import input_format, scan_table
from batchrun.status import Status, job_status, made_for
from batchrun.storage import Location, Url, location
from batchrun.tables import Given, ReturnType, beside, checked_return_type, given, own_id

if TYPE_CHECKING:
    import httpx2

    from batchrun.batch import BatchOptions
    from batchrun.distributed import RayOptions

T = TypeVar("T")
P = ParamSpec("P")
PathLike = str | Path


def _raised_here(call: Callable[P, T]) -> Callable[P, T]:
    """`call`, raising batchrun's errors from itself with the frames beneath it cut: a notebook
    shows the message and the line that called batchrun (every frame with BATCHRUN_DEBUG=1)."""

    @functools.wraps(call)
    def called(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return call(*args, **kwargs)
        except BatchrunError as exc:
            raise _cut(exc) from None

    return called


def _araised_here(call: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """`_raised_here` for a coroutine function."""

    @functools.wraps(call)
    async def called(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await call(*args, **kwargs)
        except BatchrunError as exc:
            raise _cut(exc) from None

    return called


def _cut(exc: BatchrunError) -> BatchrunError:
    return exc if os.environ.get("BATCHRUN_DEBUG") == "1" else exc.with_traceback(None)


@dataclass(frozen=True)
class Validation:
    """What `Job.validate` found: the rows, where they come from and go, the first request the job
    would send, and a note when the model name could not be checked."""

    rows: int
    input: Location
    model: str
    output: Location
    first_request: dict[str, Any]  # an image's data URL cut short
    note: str | None
    image_problems: tuple[str, ...] = ()  # the first rows' images that would fail their row, by row


def _keywords_of(
    function: Callable[P, Any],
) -> Callable[[Callable[..., Coroutine[Any, Any, T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """The async twin of `function` takes its keywords: one signature (generated), which help(),
    editors and mypy show for both."""

    def twin(coroutine: Callable[..., Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        coroutine.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
        return coroutine

    return twin


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
        self._input_name: str | None = None  # how errors call a table given in memory

    @classmethod
    @_raised_here
    def from_yaml(
        cls, path: PathLike, *, checkpoint: PathLike | None = None, output: str | None = None
    ) -> Job:
        """The job in a job file; `output` (a path or URL) in place of its output.path."""
        return cls(load_job(path), checkpoint, output=output)

    # [[[cog from tests.docgen import python_api; python_api("Job.define")]]]
    @classmethod
    @_raised_here
    def define(
        cls,
        data: Any = None,
        *,
        input: Mapping[str, Any] | None = None,
        output: Mapping[str, Any] | PathLike | None = None,
        model: str | None = None,
        prompt: Mapping[str, Any] | str | None = None,
        params: Mapping[str, Any] | None = None,
        endpoint: Mapping[str, Any] | None = None,
        concurrency: int | None = None,
        retry: Mapping[str, Any] | None = None,
        rate_limit: Mapping[str, Any] | None = None,
        stall_warning_s: float | None = None,
        pricing: Mapping[str, Any] | None = None,
        budget: Mapping[str, Any] | None = None,
        checkpoint: PathLike | None = None,
        dedupe: bool | None = None,
        images: Mapping[str, Any] | None = None,
        mode: Literal["online", "batch"] | None = None,
        batches: Mapping[str, Any] | None = None,
        folder: PathLike = ".",
    ) -> Job:
        """A job from job-file keys given as arguments, checked as a job file is; a job key left out (None)
        takes the job file's default.

        Args:
            data: The rows: a path or URL, a polars DataFrame or LazyFrame, a pandas DataFrame or pyarrow
                Table.
            input: Where the rows come from. Keys: path, id_column, on_null, messages_column, format.
            output: Where the output table goes: a path or URL, or `{path, format, include_columns, fields}`.
            model: The model name sent with every request. Required.
            prompt: The user template alone (`"Summarize: {text}"`), or `{system, user}` or `{messages}`.
            params: Merged into each request body. Keys: temperature, max_tokens, top_p, stop, tools.
            endpoint: The OpenAI-compatible server. Keys: base_url, api_key_env, timeout_s,
                allow_insecure_http, check_model, max_response_mb, batch_api.
            concurrency: Requests in flight at most (on Ray: across the whole cluster). Default: `16`.
            retry: How failed requests are tried again. Keys: max_attempts, max_parse_attempts,
                initial_backoff_s, max_backoff_s, max_outage_s.
            rate_limit: Your key's limits. Keys: requests_per_minute, tokens_per_minute.
            stall_warning_s: Warn when no row has finished for this long. Default: `300`.
            pricing: Your prices, instead of the model's list price (from the `genai-prices` package). Keys:
                input_per_million, output_per_million, cached_input_per_million, discount, batch_discount,
                per_image.
            budget: A spending limit. Keys: max_cost_usd.
            checkpoint: Where the checkpoint lives (default: beside `output`, else in a temporary folder).
            dedupe: Send identical requests once. Default: `false`.
            images: How the images of `prompt.images` are read and sent. Files, bytes and object-store images
                go inline as `data:` URLs (PNG, JPEG, WebP or GIF, told by their bytes). Keys: detail,
                max_side, fetch, max_mb.
            mode: `online` sends each row as a chat request. Default: `online`.
            batches: How batch mode makes its batches and looks after them. Keys: poll_s, max_lines, max_mb,
                add_mb.
            folder: What relative paths (input, output, checkpoint) are relative to.
        """
        # [[[end]]]
        keys = _given(locals())
        folder, checkpoint = Path(keys.pop("folder")).resolve(), keys.pop("checkpoint", None)
        table = given(data)
        note = None
        if checkpoint is None and keys.get("output") is None:
            checkpoint = Path(tempfile.mkdtemp(prefix="batchrun-")) / "checkpoint.sqlite"
            note = f"note: no checkpoint= given; checkpointing in {checkpoint} (pass checkpoint= to resume)"
        elif checkpoint is not None:
            checkpoint = folder / checkpoint
        try:
            spec = job_from_mapping(_job_keys(data, table, keys, checkpoint, folder), folder)
            if table is not None:  # a table in memory: its image paths are relative to `folder`
                spec = spec.model_copy(update={"image_folder": folder})
            job = cls(spec, checkpoint, note)
            if table is not None:
                job._take(table)
        except BaseException:
            if note is not None and checkpoint is not None:  # the temporary folder made for it
                shutil.rmtree(checkpoint.parent, ignore_errors=True)
            raise
        return job

    def _take(self, table: Given) -> None:
        """Write a table given in memory where the job reads its input, and check the job against
        it as a run does before sending; one that does not fit leaves no file behind."""
        path = self.spec.input.path
        assert isinstance(path, Path)  # _job_keys put it beside the checkpoint
        self._input_name = table.called
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            table.frame.write_parquet(path)
            self.prepared()
        except BaseException:  # refused, or interrupted
            path.unlink(missing_ok=True)
            raise

    # [[[cog from tests.docgen import python_api; python_api("Job.run")]]]
    @_raised_here
    def run(
        self,
        *,
        simulate: bool = False,
        simulate_latency_ms: float = 0.0,
        fresh: bool = False,
        retry_failed: bool = False,
        limit: int | None = None,
        concurrency: int | None = None,
        output: str | Path | None = None,
        quiet: bool = False,
        grace_s: float = 10.0,
        max_cost_usd: float | None = None,
        rows: frozenset[int] | None = None,
        yes: bool = False,
        ray: RayOptions | bool | str | None = None,
        batch: BatchOptions | bool = False,
        http_client: httpx2.AsyncClient | None = None,
        workers: int | None = None,
        check_model: bool = True,
    ) -> RunResult:
        """Run (or resume) the job; the figures, with the output table as `.table`. Job-wide errors raise
        BatchrunError (JobError, EndpointUnavailable...), whose `remedy` names the option that gets past it,
        if one does; a job changed since its last run so that finished rows would be sent again raises
        JobChanged (with .rows and .cost_usd) unless yes=True.

        Args:
            simulate: Send to the built-in simulator instead of the endpoint (`--simulate`).
            simulate_latency_ms: With `simulate`: each answer's delay.
            fresh: Drop the checkpoint's answers and send every row again.
            retry_failed: Send only the rows recorded as failed again.
            limit: Only the first N rows (a pilot).
            concurrency: Requests in flight at most, in place of the job's `concurrency`.
            output: An output path or URL in place of the job's `output.path`.
            quiet: No progress and no notes; warnings still show.
            grace_s: After an interrupt, how long the requests in flight may finish.
            max_cost_usd: The whole job's spending at most, in place of `budget.max_cost_usd`.
            rows: Only these rows (0-based), e.g. a random pilot.
            yes: Send finished rows again when the job changed since its last run (else `JobChanged`).
            ray: Run on Ray: `True` (a local Ray), `"HOST:PORT"`, or `RayOptions`.
            batch: Send the rows through the provider's Batch API (`--batch`): `True`, or
                `BatchOptions(wait=False)`.
            http_client: Your own `httpx2.AsyncClient` (for `run`: one not yet used on another event loop).
            workers: With `ray`: worker actors, sharing the job's concurrency.
            check_model: `False` skips the `GET /models` check, as `endpoint.check_model: false`.
        """
        # [[[end]]]
        options = _given(locals())
        stop = Stop()
        if (ray := _with_ray(options).get("ray")) is not None:
            from batchrun.distributed.cluster import connect

            connect(ray.address)  # on the caller's thread, which Ray prefers for ray.init
        return _in_own_thread(lambda: self._run(options, stop), stop, RunResult.interrupted_message)

    @_araised_here
    @_keywords_of(run)
    async def arun(self, **options: Any) -> RunResult:
        """`run` for async code, with its keywords: awaited on the caller's loop. Cancelling it
        stops the run as a first Ctrl-C does, and CancelledError is raised once the output is
        written."""
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
        spec = self.checked(check_model)
        return prepare(spec, self.output, write, checkpoint=self.checkpoint, input_name=self._input_name)

    @_raised_here
    def validate(self, *, check_model: bool = True) -> Validation:
        """Check the job and its input as `run` does before sending, and the model against the
        endpoint's list when the key is set (unless check_model=False); send no chat request."""
        job = self.prepared(write=True, check_model=check_model)
        first_request, image_problems = job.shown_request()
        return Validation(
            rows=job.source.row_count,
            input=job.source.path,
            model=job.spec.model,
            output=job.output_path,
            first_request=first_request,
            note=model_note(job.spec),
            image_problems=image_problems,
        )

    @_raised_here
    def status(self) -> Status:
        """Rows by status, failures, tokens and cost so far, from the checkpoint (checked against
        the job, as `run` does)."""
        return job_status(self.prepared())

    @_raised_here
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

    @_raised_here
    def cost(self, by: Sequence[str] = ()) -> pl.DataFrame:
        """Rows, tokens and cost per (by..., model, status) from the checkpoint, also while the
        job runs; `by` may name any column of the input."""
        job = self.prepared()
        with tempfile.TemporaryDirectory(prefix="batchrun-cost-") as workdir:
            return cost_report(job_table(job, tuple(by), made_for(job), Path(workdir)), tuple(by))

    @_raised_here
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
            sources = Sources(table, job.checkpoint_path, job.report_path, job_file, tuple(by), format, job)
            html_path = page_path(job.report_path)
            write_page(sources, html_path)
        return html_path

    @_raised_here
    def prune(self) -> tuple[int, int] | None:
        """Drop the answers in the checkpoint that no row of the job as it is now uses (an earlier
        prompt's, a removed row's); (dropped, kept), or None without a checkpoint."""
        spec = self.spec
        if self.checkpoint is not None:
            spec = spec.model_copy(update={"checkpoint": self.checkpoint})
        return prune(spec, self.output)

    @_raised_here
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


@_raised_here
def cost_table(path: PathLike, by: Sequence[str] = (), *, output: str | None = None) -> pl.DataFrame:
    """Rows, tokens and cost per (by..., model, status), as `batchrun cost` gives them: of a job
    file, from its checkpoint (`output` as in Job.from_yaml), or of an output table."""
    if _is_job_file(path):
        return Job.from_yaml(path, output=output).cost(by)
    _no_output_for_a_table(path, output)
    return cost_report(read_output_table(Path(path)), tuple(by))


@_raised_here
def draw_report(path: PathLike, by: Sequence[str] = (), *, output: str | None = None) -> Path:
    """Draw the run report page again, as `batchrun report` does: of a job file, from its
    checkpoint, or of an output table and the checkpoint beside it; where the page is."""
    if _is_job_file(path):
        return Job.from_yaml(path, output=output).report(by)
    _no_output_for_a_table(path, output)
    from batchrun.html_report import Sources, page_path, write_page

    table_path = Path(path)
    report_json = next_to(table_path, REPORT_SUFFIX)
    table, format = read_output_table(table_path), input_format(table_path)
    sources = Sources(table, next_to(table_path, CHECKPOINT_SUFFIX), report_json, None, tuple(by), format)
    html_path = page_path(report_json)
    write_page(sources, html_path)
    return html_path


def _is_job_file(path: PathLike) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def _no_output_for_a_table(path: PathLike, output: str | None) -> None:
    if output is not None:
        raise BatchrunError(f"{path} is an output table: `output=` goes with a job file")


# [[[cog from tests.docgen import python_api; python_api("run")]]]
@_raised_here
def run(
    data: Any = None,
    /,
    *,
    input: Mapping[str, Any] | None = None,
    output: Mapping[str, Any] | PathLike | None = None,
    model: str | None = None,
    prompt: Mapping[str, Any] | str | None = None,
    params: Mapping[str, Any] | None = None,
    endpoint: Mapping[str, Any] | None = None,
    concurrency: int | None = None,
    retry: Mapping[str, Any] | None = None,
    rate_limit: Mapping[str, Any] | None = None,
    stall_warning_s: float | None = None,
    pricing: Mapping[str, Any] | None = None,
    budget: Mapping[str, Any] | None = None,
    checkpoint: PathLike | None = None,
    dedupe: bool | None = None,
    images: Mapping[str, Any] | None = None,
    mode: Literal["online", "batch"] | None = None,
    batches: Mapping[str, Any] | None = None,
    folder: PathLike = ".",
    simulate: bool = False,
    simulate_latency_ms: float = 0.0,
    fresh: bool = False,
    retry_failed: bool = False,
    limit: int | None = None,
    quiet: bool = False,
    grace_s: float = 10.0,
    max_cost_usd: float | None = None,
    rows: frozenset[int] | None = None,
    yes: bool = False,
    ray: RayOptions | bool | str | None = None,
    batch: BatchOptions | bool = False,
    http_client: httpx2.AsyncClient | None = None,
    workers: int | None = None,
    check_model: bool = True,
    return_type: ReturnType | None = None,
) -> Any:
    """Run (or resume) a job over `data`; the rows given, in their order, with the result columns beside them
    (as `with_columns` puts them), as the kind of table given. A job key left out takes its default.

    Args:
        data: The rows: a path or URL, a polars DataFrame or LazyFrame, a pandas DataFrame or pyarrow Table.
        input: Where the rows come from. Keys: path, id_column, on_null, messages_column, format.
        output: Where the output table goes: a path or URL, or `{path, format, include_columns, fields}`.
        model: The model name sent with every request. Required.
        prompt: The user template alone (`"Summarize: {text}"`), or `{system, user}` or `{messages}`.
        params: Merged into each request body. Keys: temperature, max_tokens, top_p, stop, tools.
        endpoint: The OpenAI-compatible server. Keys: base_url, api_key_env, timeout_s, allow_insecure_http,
            check_model, max_response_mb, batch_api.
        concurrency: Requests in flight at most (on Ray: across the whole cluster). Default: `16`.
        retry: How failed requests are tried again. Keys: max_attempts, max_parse_attempts, initial_backoff_s,
            max_backoff_s, max_outage_s.
        rate_limit: Your key's limits. Keys: requests_per_minute, tokens_per_minute.
        stall_warning_s: Warn when no row has finished for this long. Default: `300`.
        pricing: Your prices, instead of the model's list price (from the `genai-prices` package). Keys:
            input_per_million, output_per_million, cached_input_per_million, discount, batch_discount,
            per_image.
        budget: A spending limit. Keys: max_cost_usd.
        checkpoint: Where the checkpoint lives (default: beside `output`, else in a temporary folder).
        dedupe: Send identical requests once. Default: `false`.
        images: How the images of `prompt.images` are read and sent. Files, bytes and object-store images go
            inline as `data:` URLs (PNG, JPEG, WebP or GIF, told by their bytes). Keys: detail, max_side,
            fetch, max_mb.
        mode: `online` sends each row as a chat request. Default: `online`.
        batches: How batch mode makes its batches and looks after them. Keys: poll_s, max_lines, max_mb,
            add_mb.
        folder: What relative paths (input, output, checkpoint) are relative to.
        simulate: Send to the built-in simulator instead of the endpoint (`--simulate`).
        simulate_latency_ms: With `simulate`: each answer's delay.
        fresh: Drop the checkpoint's answers and send every row again.
        retry_failed: Send only the rows recorded as failed again.
        limit: Only the first N rows (a pilot).
        quiet: No progress and no notes; warnings still show.
        grace_s: After an interrupt, how long the requests in flight may finish.
        max_cost_usd: The whole job's spending at most, in place of `budget.max_cost_usd`.
        rows: Only these rows (0-based), e.g. a random pilot.
        yes: Send finished rows again when the job changed since its last run (else `JobChanged`).
        ray: Run on Ray: `True` (a local Ray), `"HOST:PORT"`, or `RayOptions`.
        batch: Send the rows through the provider's Batch API (`--batch`): `True`, or
            `BatchOptions(wait=False)`.
        http_client: Your own `httpx2.AsyncClient` (for `run`: one not yet used on another event loop).
        workers: With `ray`: worker actors, sharing the job's concurrency.
        check_model: `False` skips the `GET /models` check, as `endpoint.check_model: false`.
        return_type: The kind of table returned, `"polars"`, `"pandas"` or `"pyarrow"`, in place of the kind
            given.
    """
    # [[[end]]]
    job, options, return_type = _split(data, _given(locals()))
    return _beside_input(data, job, job.run(**options), return_type)


@_araised_here
@_keywords_of(run)
async def arun(data: Any = None, /, **keys: Any) -> Any:
    """`run` for async code (a notebook cell can `await` it), with its keywords."""
    job, options, return_type = _split(data, keys)
    return _beside_input(data, job, await job.arun(**options), return_type)


def _beside_input(data: Any, job: Job, result: RunResult, return_type: ReturnType | None) -> Any:
    """The input's rows with the run's result columns beside them (not the output's `id` and
    include_columns: the input's own columns are all there)."""
    assert result.table is not None
    spec = job.spec
    results = result.table.select(*spec.output.fields, *OUTPUT_RESULT_COLUMNS)
    return beside(
        data, results, lambda n: scan_table(spec.input.path, spec.input.format).head(n).collect(), return_type
    )


def _given(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords a function of the API was given (its `locals()` as it starts): those left
    out (None) dropped, as a job file leaves a key out."""
    return {k: v for k, v in arguments.items() if v is not None and k not in ("self", "cls", "data")}


def _keywords(function: Callable[..., Any]) -> frozenset[str]:
    return frozenset(
        p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY
    )


# run()'s keywords that are not job keys (concurrency and output are: run() takes them as such).
RUN_OPTIONS = _keywords(Job.run) - _keywords(Job.define)


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


def _split(data: Any, given: Mapping[str, Any]) -> tuple[Job, dict[str, Any], ReturnType | None]:
    return_type = checked_return_type(given.get("return_type"))
    options = {k: v for k, v in given.items() if k in RUN_OPTIONS}
    keys = {k: v for k, v in given.items() if k not in (*RUN_OPTIONS, "return_type")}
    return Job.define(data, **keys), options, return_type


def _job_keys(
    data: Any, table: Given | None, keys: dict[str, Any], checkpoint: Path | None, folder: Path
) -> dict[str, Any]:
    """Job-file keys from the arguments: `prompt` may be the user template alone, `output` a
    path alone, and `data` fills input.path. A table in memory is to be written beside the
    checkpoint (byte for byte the same on a rerun, so the checkpoint's input hash still matches),
    and named by its own `id` column when it has one and input.id_column names none."""
    keys = dict(keys)
    if isinstance(keys.get("prompt"), str):
        keys["prompt"] = {"user": keys["prompt"]}
    output = keys.get("output")
    if isinstance(output, str | Path):
        keys["output"] = {"path": str(output)}
    elif output is None and checkpoint is not None:
        keys["output"] = {"path": str(checkpoint.with_name(checkpoint.name + ".output.parquet"))}
    if data is None:
        return keys
    given_input = keys.get("input")
    fields = dict(given_input) if isinstance(given_input, Mapping) else {}
    if table is None:
        fields["path"] = str(data)  # as given: Path() would turn s3://b/k into s3:/b/k
    else:
        # Beside the checkpoint, or beside the output that it goes beside (for an output URL,
        # where its checkpoint goes on local disk).
        out = location(keys["output"]["path"])
        at = checkpoint or (out.local_stem(Path.cwd()) if isinstance(out, Url) else folder / out)
        fields["path"] = str(at.with_name(at.name + ".input.parquet"))
        if fields.get("id_column") is None and (own := own_id(table)) is not None:
            fields["id_column"] = own
    keys["input"] = fields
    return keys


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


def _in_own_thread(
    make: Callable[[], Coroutine[Any, Any, T]], stop: Stop, interrupted: Callable[[T], str]
) -> T:
    """Run a coroutine on a thread with its own event loop, so that it works whether or not this
    thread runs a loop (a notebook's). An interrupt meanwhile (Ctrl-C, a kernel's "interrupt")
    asks the run to stop (a second, at once); once the run has written what it has,
    KeyboardInterrupt is raised here."""
    outcome: list[T] = []
    failure: list[BaseException] = []
    done = threading.Event()  # only read here: an interrupt inside Event.wait can leave its lock held
    wake = threading.Lock()  # what this thread waits on; the worker releases it when done
    wake.acquire()

    def work() -> None:
        try:
            outcome.append(run_async(make()))
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            done.set()
            wake.release()

    with _interrupts_stop(stop) as interrupts:
        threading.Thread(target=work, name="batchrun", daemon=True).start()
        while not done.is_set():
            try:
                wake.acquire(timeout=0.1)  # interrupt_main() trips no OS signal that would wake it
            except KeyboardInterrupt as exc:  # from a SIGINT handler of the caller's
                interrupts.append(exc)
                stop.request()
    if interrupts and outcome:  # stopped, and what it had is written: say what and how to resume
        raise KeyboardInterrupt(interrupted(outcome[0])) from None
    if interrupts:
        raise interrupts[0]
    if failure:
        raise failure[0]
    return outcome[0]


@contextlib.contextmanager
def _interrupts_stop(stop: Stop) -> Iterator[list[KeyboardInterrupt]]:
    """The interrupts that come within the block, each a stop request. On the main thread with
    Python's own SIGINT handler, a handler of ours takes them (as asyncio.Runner does): one raised
    wherever this thread happened to be could be lost (inside a finalizer, Python prints and drops
    it) or could escape before the run has stopped."""
    interrupts: list[KeyboardInterrupt] = []

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        interrupts.append(KeyboardInterrupt())
        stop.request()

    ours = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if ours:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupts
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _in_notebook() -> bool:
    """Under a Jupyter kernel, where tqdm.auto draws a widget."""
    return "ipykernel" in sys.modules and not sys.stderr.isatty()
