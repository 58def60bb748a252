"""The `batchrun` command: parse flags, call the library, turn the outcome into an exit code."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click
from click_default_group import DefaultGroup

from batchrun.errors import BatchrunError, JobChanged, RequestFailed
from batchrun.terminal import printable

# Commands import what they use when they run, so that `--help` and `--version` need none of
# polars, aiohttp, pydantic or genai-prices (tests/test_startup.py).
if TYPE_CHECKING:
    from batchrun.checkpoint import Fingerprint
    from batchrun.job import JobSpec
    from batchrun.plan import PreparedJob
    from batchrun.report import RunResult
    from batchrun.runner import RunOptions

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES = """\b
Exit codes:
  0    every row ok
  1    finished, some rows failed (see the output's `status` and `error`)
  2    bad job, input or usage, or a job-wide error such as a rejected key
  3    stopped by the budget (rerun with a larger --max-cost to resume)
  4    the endpoint is unavailable (unreachable, or down past retry.max_outage_s);
       nothing was lost: rerun later to resume
  130  interrupted (checkpoint kept: rerun to resume)"""


ERROR_WIDTH = 200  # an error message in the summary; report.json has it whole


def friendly_errors(command: F) -> F:
    """One `Error: ...` line and the error's exit code; --debug or BATCHRUN_DEBUG=1 re-raise."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BatchrunError as exc:
            if debug or os.environ.get("BATCHRUN_DEBUG") == "1":
                raise
            click.echo(f"Error: {printable(str(exc), one_line=True)}", err=True)
            sys.exit(exc.exit_code)

    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(
        wrapper
    )  # type: ignore[return-value]


def echo(message: str | None = None, *, err: bool = False, nl: bool = True) -> None:
    """click.echo with control characters escaped: much of what is shown came from a server or
    an input table (an error's words, an id, a model name)."""
    click.echo(None if message is None else printable(message), err=err, nl=nl)


job_argument = click.argument("job_file", metavar="JOB", type=click.Path(dir_okay=False, path_type=Path))
output_option = click.option(
    "--output",
    type=click.Path(dir_okay=False),  # a str: Path() would turn s3://b/k into s3:/b/k
    help="Output table path or URL, as given to `run --output` (overrides the job's output.path).",
)
no_check_model_option = click.option(
    "--no-check-model",
    is_flag=True,
    help="Do not check the model against GET /models (as endpoint.check_model: false does).",
)


@click.group(cls=DefaultGroup, default="run", default_if_no_args=False)
@click.version_option(package_name="batchrun")
def main() -> None:
    """Run one LLM chat request per row of a table, resumably.

    \b
    batchrun jobs/summarize.yaml              run a job (same as `batchrun run ...`)
    batchrun jobs/summarize.yaml --simulate   run it offline against the built-in simulator
    batchrun validate jobs/summarize.yaml     check the job and show the first request
    batchrun status jobs/summarize.yaml       rows done / failed / pending so far
    batchrun models --job jobs/summarize.yaml the models the job's endpoint offers
    batchrun estimate jobs/summarize.yaml     what the rows still to do will cost
    batchrun cost out/summaries.parquet       rows, tokens and cost per model and status
    batchrun report jobs/summarize.yaml       the run report as a page to look at (HTML)
    batchrun prune jobs/summarize.yaml        drop the answers no row of the job uses
    """


@main.command(epilog=EXIT_CODES)
@job_argument
@click.option("--simulate", is_flag=True, help="Send to a built-in simulated endpoint (no key, no network).")
@click.option(
    "--simulate-latency-ms",
    type=click.FloatRange(min=0),
    help="With --simulate: the simulated endpoint's delay per request.",
)
@click.option("--fresh", is_flag=True, help="Discard the checkpoint and start over.")
@click.option("--retry-failed", is_flag=True, help="Send only the rows recorded as failed again.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N rows (a pilot).")
@click.option("--concurrency", type=click.IntRange(1, 4096), help="Requests in flight (overrides the job).")
@output_option
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress bar, notes or summary; errors and warnings only."
)
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0, min_open=True),
    metavar="USD",
    help="Stop sending before the job's cost could pass USD (overrides budget.max_cost_usd).",
)
@click.option(
    "-y",
    "--yes",
    is_flag=True,
    help="Send finished rows again when the job changed since its last run (else a terminal asks).",
)
@no_check_model_option
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="Run on Ray: join the cluster at ADDRESS (HOST:PORT or ray://HOST:PORT), or start a local "
    "Ray without one. Needs the extra: pip install 'batchrun[ray]'.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="With --ray: worker actors, sharing the job's concurrency (default: one per CPU of the cluster).",
)
@friendly_errors
def run(
    job_file: Path,
    simulate: bool,
    simulate_latency_ms: float | None,
    fresh: bool,
    retry_failed: bool,
    limit: int | None,
    concurrency: int | None,
    output: str | None,
    quiet: bool,
    max_cost: float | None,
    yes: bool,
    no_check_model: bool,
    ray_address: str | None,
    workers: int | None,
) -> None:
    """Run JOB, resuming from its checkpoint if it was interrupted.

    Every finished row is checkpointed beside the output (OUTPUT.checkpoint.sqlite; for a URL,
    in .batchrun/ beside JOB, or where the job's `checkpoint:` says); rerunning
    the same command sends only the rows not yet done. Results are kept by the request they
    answer: appended or edited rows are sent, reordered rows are not. After a change of the
    prompt, model, params or endpoint, batchrun says how many finished rows it would send
    again and what that should cost, and goes on only with --yes (a terminal asks); the old
    answers stay, so changing back sends nothing. `batchrun prune JOB` drops answers no row
    uses; --fresh drops them all.

    \b
    Examples:
      batchrun jobs/summarize.yaml --simulate
      batchrun run jobs/summarize.yaml --limit 20     # pilot on the first 20 rows
      batchrun jobs/summarize.yaml --retry-failed     # resend only failed rows
      batchrun jobs/summarize.yaml --max-cost 5       # spend at most $5 on the job
      batchrun jobs/summarize.yaml --ray --workers 2  # on a local Ray, two workers
    """
    if workers is not None and ray_address is None:
        raise click.UsageError("--workers goes with --ray")
    ray = None
    if ray_address is not None:
        from batchrun.distributed.cluster import import_ray

        import_ray()  # before the job is read: without the extra, say so first
        from batchrun.distributed import RayOptions

        ray = RayOptions(ray_address or None, workers)
    from batchrun.job import load_job
    from batchrun.runner import RunOptions

    spec = skip_model_check(load_job(job_file), no_check_model)
    if simulate_latency_ms is not None and not simulate:
        raise click.UsageError("--simulate-latency-ms goes with --simulate")
    options = RunOptions(
        simulate=simulate,
        simulate_latency_ms=simulate_latency_ms or 0.0,
        fresh=fresh,
        retry_failed=retry_failed,
        limit=limit,
        concurrency=concurrency,
        output=output,
        quiet=quiet,
        max_cost_usd=max_cost,
        yes=yes,
        ray=ray,
    )
    if ray is not None:
        from batchrun.distributed.cluster import connect

        connect(ray.address)  # here, on the main thread, before anything is sent
    try:
        result = run_in_process(spec, options)
    except JobChanged as exc:
        if not sys.stdin.isatty():
            raise
        if not click.confirm(f"{exc.what}; send them?", err=True):
            sys.exit(exc.exit_code)
        result = run_in_process(spec, dataclasses.replace(options, yes=True))
    if not quiet:
        echo(summary(result, job_file), err=True)
    elif result.budget_stopped:
        echo(budget_stop(result, job_file), err=True)
    sys.exit(result.exit_code)


def run_in_process(spec: JobSpec, options: RunOptions) -> RunResult:
    """Run a job as this process's one task: progress on stderr, and the process's signals.

    The first SIGINT or SIGTERM stops sending and lets in-flight rows finish within the grace
    period (the output is written, exit 130); a second exits at once (the checkpoint is consistent).
    """
    import asyncio
    import signal

    from batchrun.core import Stop
    from batchrun.loop import run_async
    from batchrun.progress import Progress
    from batchrun.runner import run_job
    from batchrun.simulator import SimulatorConfig, serve_in_thread

    progress = Progress(options.quiet)
    stop = Stop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.requests:
            print(
                "batchrun: stopped at once; the checkpoint is consistent, rerun to resume",
                file=sys.stderr,
                flush=True,
            )
            os._exit(130)
        progress.say(
            f"batchrun: {sig.name} received: finishing in-flight requests "
            f"(up to {options.grace_s:g} s; press Ctrl-C again to stop at once)"
        )
        stop.request()

    async def main(base_url: str | None) -> RunResult:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        before = [signal.getsignal(sig) for sig in signals]
        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await run_job(spec, options, progress, base_url=base_url, stop=stop)
        finally:  # as they were: uvloop would leave its own behind (the CLI may run in-process)
            for sig, handler in zip(signals, before, strict=True):
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)

    with contextlib.ExitStack() as stack:
        base_url = None
        if options.simulate:
            config = SimulatorConfig(latency_ms=options.simulate_latency_ms, extra_models=(spec.model,))
            base_url = stack.enter_context(serve_in_thread(config)).base_url
        try:
            return run_async(main(base_url))
        finally:
            progress.close()


def summary(result: RunResult, job_file: Path) -> str:
    failures = ", ".join(f"{kind}: {n}" for kind, n in result.failures_by_kind.items())
    lines = [
        f"rows: {result.ok} ok, {result.failed} failed"
        + (f" ({failures})" if failures else "")
        + (f", {result.skipped} skipped" if result.skipped else "")
        + (f", {result.pending} pending" if result.pending else "")
        + f" of {result.total}",
        *errors_lines(result.top_errors, result.failed),
        tokens_line(result.prompt_tokens, result.completion_tokens, result.rows_without_usage),
        f"time: {result.wall_s:.1f} s"
        + (f"; retries: {sum(result.retries.values())}" if result.retries else "")
        + (f"; 429s: {result.rate_limited}" if result.rate_limited else ""),
    ]
    if result.cost_usd is not None:
        budget = f" of a ${result.budget_usd:g} budget" if result.budget_usd is not None else ""
        lines.append(
            cost_line(result.cost_usd, result.prompt_tokens is None, result.rows_without_usage) + budget
        )
    lines.append(f"output: {result.output_path}")
    if result.report_path is not None:
        from batchrun.html_report import page_path

        page = page_path(result.report_path)
        lines.append(f"report: {result.report_path}" + (f", {page}" if page.exists() else ""))
    if result.interrupted:
        lines.append(f"interrupted: rerun `batchrun {job_file}` to resume")
    elif result.budget_stopped:
        lines.append(budget_stop(result, job_file))
    elif result.failed:
        lines.append(f"to resend the failed rows: batchrun {job_file} --retry-failed")
    return "\n".join(lines)


def errors_lines(top_errors: list[tuple[str, int]], failed: int) -> list[str]:
    """Why rows failed, not only how many: the commonest messages, each cut to a line."""
    lines = [f"  {n} {'row' if n == 1 else 'rows'}: {_one_line(error)}" for error, n in top_errors]
    if rest := failed - sum(n for _, n in top_errors):
        lines.append(f"  {rest} more {'row' if rest == 1 else 'rows'} with other errors")
    return lines


def _one_line(text: str, width: int = ERROR_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def tokens_line(prompt: int | None, completion: int | None, without_usage: int) -> str:
    """Tokens as far as the endpoint reported them: a missing count is unknown, never 0."""
    if prompt is None or completion is None:
        return f"tokens: unknown (the endpoint reported no usage for {without_usage:,} rows)"
    line = f"tokens: {prompt:,} prompt + {completion:,} completion"
    if without_usage:
        line += f", and {without_usage:,} rows without usage (the endpoint reported none)"
    return line


def cost_line(cost_usd: float, usage_unknown: bool, without_usage: int) -> str:
    """Cost as far as usage was reported: rows without usage have no cost to add."""
    if usage_unknown:
        return "cost: unknown (no usage reported)"
    return f"cost: ${cost_usd:.4f}" + (
        f" (not counting {without_usage:,} rows without usage)" if without_usage else ""
    )


def budget_stop(result: RunResult, job_file: Path) -> str:
    return (
        f"stopped by the budget: ${result.cost_usd or 0:.4f} spent of ${result.budget_usd:g}, the next "
        f"request could pass it; {result.pending} rows pending; rerun with a larger budget "
        f"(--max-cost N) to resume: batchrun {job_file} --max-cost N"
    )


def skip_model_check(spec: JobSpec, skip: bool) -> JobSpec:
    """The job with endpoint.check_model off when --no-check-model says so."""
    if not skip:
        return spec
    return spec.model_copy(update={"endpoint": spec.endpoint.model_copy(update={"check_model": False})})


def check_model_with_key(spec: JobSpec) -> None:
    """`run`'s start check, for commands that send no chat request: made when the key is set."""
    from batchrun.executors import api_key
    from batchrun.models import check_model

    if not spec.endpoint.check_model:
        return
    if not os.environ.get(spec.endpoint.api_key_env, "").strip():
        echo(f"note: {spec.endpoint.api_key_env} is not set; model name not checked", err=True)
    elif note := check_model(spec, spec.endpoint.base_url, api_key(spec.endpoint)):
        echo(note, err=True)


@main.command()
@job_argument
@output_option
@no_check_model_option
@friendly_errors
def validate(job_file: Path, output: str | None, no_check_model: bool) -> None:
    """Check JOB and its input, and print the first request it would send; send no request.

    When the job's key is set, the endpoint's model list (GET /models) is also fetched to check
    the model name and the key; without the key that check is skipped.
    """
    from batchrun.job import load_job
    from batchrun.plan import prepare

    job = prepare(skip_model_check(load_job(job_file), no_check_model), output)
    check_model_with_key(job.spec)
    echo(
        f"ok: {job_file}: {job.source.row_count} rows from {job.source.path.name}, "
        f"model {job.spec.model}, output {job.output_path}",
        err=True,
    )
    echo(json.dumps(job.first_request(), indent=2, ensure_ascii=False))


@main.command()
@job_argument
@output_option
@friendly_errors
def status(job_file: Path, output: str | None) -> None:
    """Show rows done / failed / pending and tokens so far, from JOB's checkpoint."""
    from batchrun.cost import job_price
    from batchrun.job import load_job
    from batchrun.plan import prepare, read_checkpoint

    job = prepare(load_job(job_file), output, write=False)
    if not job.checkpoint_path.exists():
        echo(f"not started: 0 of {job.source.row_count} rows done")
        return
    checkpoint = read_checkpoint(job, made_for(job))
    try:
        totals = checkpoint.totals()
        kinds = checkpoint.failures_by_kind()
        top_errors = checkpoint.top_errors()
        spent = checkpoint.spent_usd() if job_price(job.spec) is not None else None
    finally:
        checkpoint.close()
    pending = job.source.row_count - totals.ok - totals.failed - totals.skipped
    failures = ", ".join(f"{k}: {n}" for k, n in kinds.items())
    echo(f"ok: {totals.ok}\nfailed: {totals.failed}" + (f" ({failures})" if failures else ""))
    for line in errors_lines(top_errors, totals.failed):
        echo(line)
    echo(f"skipped: {totals.skipped}\npending: {pending}\nof: {job.source.row_count}")
    echo(tokens_line(totals.prompt_tokens, totals.completion_tokens, totals.without_usage))
    if spent is not None:
        echo(cost_line(spent, totals.prompt_tokens is None, totals.without_usage))


def made_for(job: PreparedJob) -> tuple[Fingerprint, Fingerprint]:
    """The job as run on its endpoint and as run with --simulate: a command that reads the
    checkpoint takes either run's."""
    from batchrun.plan import SIMULATED_ENDPOINT

    fingerprint = job.fingerprint(simulate=False)
    return fingerprint, fingerprint | {"endpoint.base_url": SIMULATED_ENDPOINT}


@main.command(name="estimate")
@job_argument
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    metavar="N",
    help="First send a random pilot of N rows still to do, then project from their usage.",
)
@click.option(
    "-y", "--yes", is_flag=True, help="Send the --sample pilot without asking (needed without a terminal)."
)
@click.option("--simulate", is_flag=True, help="Send the pilot to the built-in simulator; use its rows.")
@output_option
@no_check_model_option
@friendly_errors
def estimate_command(
    job_file: Path, sample: int | None, yes: bool, simulate: bool, output: str | None, no_check_model: bool
) -> None:
    """Estimate what the rows of JOB still to do will cost, before sending them.

    Prompt tokens are estimated from the prompts' characters, calibrated on finished rows (a
    `--limit` pilot, an interrupted run, or --sample N); output tokens come from the finished
    rows' answers, else from max_tokens. The estimate is saved beside the output, and the next
    run's report compares its actual cost with it.

    \b
    Examples:
      batchrun estimate jobs/summarize.yaml
      batchrun estimate jobs/summarize.yaml --sample 100 --yes --simulate
    """
    from batchrun.estimate import estimate_job, pilot_rows
    from batchrun.job import load_job
    from batchrun.plan import prepare
    from batchrun.runner import RunOptions

    spec = skip_model_check(load_job(job_file), no_check_model)
    job = prepare(spec, output)
    if not simulate:
        check_model_with_key(spec)
    readable = made_for(job)
    fingerprint = readable[1] if simulate else readable[0]
    projection = estimate_job(job, readable)
    if sample is not None and projection.to_do:
        rows = pilot_rows(job, readable, sample)
        share = len(rows) / projection.to_do
        if projection.expected.cost_usd is not None and projection.worst.cost_usd is not None:
            cost = (
                f" (about ${projection.expected.cost_usd * share:.4f}, "
                f"at most ${projection.worst.cost_usd * share:.4f})"
            )
        else:
            cost = ""
        where = "the simulator" if simulate else spec.endpoint.base_url
        question = f"send a pilot of {len(rows)} random rows{cost} to {where}?"
        if yes or _confirm(question):
            # yes: asked above, with the pilot's cost (a changed job's finished rows among them)
            pilot = RunOptions(simulate=simulate, rows=frozenset(rows), output=output, yes=True)
            result = run_in_process(spec, pilot)
            echo(summary(result, job_file), err=True)
            if result.interrupted or result.budget_stopped:
                sys.exit(result.exit_code)
            projection = estimate_job(job, readable)
    projection.save(job, fingerprint)
    echo("\n".join(projection.lines()))


def _confirm(question: str) -> bool:
    """Ask on stdin; with nothing to read there (no terminal, no piped answer), say how to go on."""
    try:
        return click.confirm(question, err=True)
    except click.Abort:
        echo(err=True)  # end the question's line
        raise BatchrunError("no answer on stdin (no terminal?): pass --yes to send the pilot") from None


@main.command(name="prune")
@job_argument
@output_option
@friendly_errors
def prune_command(job_file: Path, output: str | None) -> None:
    """Drop the answers in JOB's checkpoint that no row of JOB as it is now uses.

    Answers to an earlier version of the job (another prompt, model, params or endpoint) and to
    rows since removed from the input stay in the checkpoint, so changing back sends nothing;
    prune drops them (changing back then sends those rows again). --fresh drops every answer.

    \b
    Example:
      batchrun prune jobs/summarize.yaml
    """
    from batchrun.job import load_job
    from batchrun.runner import prune

    pruned = prune(load_job(job_file), output)
    if pruned is None:
        echo(f"nothing to prune: {job_file} has no checkpoint yet")
        return
    dropped, kept = pruned
    echo(f"pruned {dropped:,} answers no row of the job uses; {kept:,} kept")


@main.command(name="cost")
@click.argument("path", metavar="PATH", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--by", multiple=True, metavar="COLUMN", help="Also group by this column (repeatable).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="A table for reading, or CSV / JSON for other tools.",
)
@output_option
@friendly_errors
def cost_command(path: Path, by: tuple[str, ...], fmt: str, output: str | None) -> None:
    """Rows, tokens and cost per model and status, from an output table or a job file.

    For a job file the figures come from its checkpoint (also while it runs), and --by may name
    any column of its input.

    \b
    Examples:
      batchrun cost out/summaries.parquet
      batchrun cost jobs/summarize.yaml --by finish_reason --format csv
    """
    import tempfile

    from batchrun.job import load_job
    from batchrun.plan import prepare
    from batchrun.report import cost_report, format_cost_report, job_table, read_output_table

    with tempfile.TemporaryDirectory(prefix="batchrun-cost-") as workdir:
        if path.suffix.lower() in (".yaml", ".yml"):
            job = prepare(load_job(path), output, write=False)
            table = job_table(job, by, made_for(job), Path(workdir))
        elif output is not None:
            raise BatchrunError("--output goes with a job file: `batchrun cost JOB --output PATH`")
        else:
            table = read_output_table(path)
        report = cost_report(table, by)
    echo(format_cost_report(report, fmt), nl=False)


@main.command(name="report")
@click.argument("path", metavar="JOB|OUTPUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--open", "open_page", is_flag=True, help="Open the page in the default web browser.")
@click.option("--by", multiple=True, metavar="COLUMN", help="Also show cost by this column (repeatable).")
@output_option
@friendly_errors
def report_command(path: Path, open_page: bool, by: tuple[str, ...], output: str | None) -> None:
    """Draw the run report as one HTML page from a job's checkpoint, or from an output table.

    Every run that sends a request writes OUTPUT.report.html beside OUTPUT.report.json; this
    draws it again, from the checkpoint of JOB as it is now (also while it runs), or from
    OUTPUT and the checkpoint beside it. The page shows the outcome, rows, tokens and cost,
    throughput with retries and 429s over each run, latency, tokens per row, cost by model and
    status, and failures with example rows. It is one file that needs no network: mail it.

    \b
    Examples:
      batchrun report jobs/summarize.yaml --open
      batchrun report out/summaries.parquet --by title
    """
    import tempfile
    import webbrowser

    from batchrun.html_report import Sources, page_path, write_page
    from batchrun.job import TableFormat, load_job
    from batchrun.plan import CHECKPOINT_SUFFIX, REPORT_SUFFIX, beside, prepare
    from batchrun.report import job_table, read_output_table
    from batchrun.sources import input_format

    with tempfile.TemporaryDirectory(prefix="batchrun-report-") as workdir:
        if path.suffix.lower() in (".yaml", ".yml"):
            job = prepare(load_job(path), output, write=False)
            format: TableFormat = "parquet"  # as job_table builds it
            if job.checkpoint_path.exists():
                table = job_table(job, by, made_for(job), Path(workdir))
            elif isinstance(job.output_path, Path) and job.output_path.exists():
                table, format = read_output_table(job.output_path), input_format(job.output_path)
            else:
                raise BatchrunError(
                    f"{path} has no checkpoint ({job.checkpoint_path}) and no output yet: run it first"
                )
            sources = Sources(table, job.checkpoint_path, job.report_path, str(path), by, format)
            html_path = page_path(job.report_path)
        elif output is not None:
            raise BatchrunError("--output goes with a job file: `batchrun report JOB --output PATH`")
        else:
            report_json = beside(path, REPORT_SUFFIX)
            table, format = read_output_table(path), input_format(path)
            sources = Sources(table, beside(path, CHECKPOINT_SUFFIX), report_json, None, by, format)
            html_path = page_path(report_json)
        size = write_page(sources, html_path)
    echo(f"report: {html_path} ({size / 1024:,.0f} KiB)")
    if open_page:
        webbrowser.open(html_path.resolve().as_uri())


@main.command()
@click.option(
    "--job",
    "job_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Use this job's endpoint and key (default: RelayDance with $RELAYDANCE_API_KEY).",
)
@click.option("--simulate", is_flag=True, help="List the built-in simulator's models (and the job's).")
@friendly_errors
def models(job_file: Path | None, simulate: bool) -> None:
    """List the models the endpoint offers to your key (GET /v1/models), one per line."""
    from batchrun.executors import api_key
    from batchrun.job import EndpointSpec, RetrySpec, load_job
    from batchrun.models import list_models
    from batchrun.plan import SIMULATED_KEY
    from batchrun.simulator import SimulatorConfig, serve_in_thread

    spec = load_job(job_file) if job_file else None
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
    for model in sorted(offered):
        echo(model)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8787, show_default=True, type=int, help="0 picks a free port.")
@click.option(
    "--latency-ms", default=0.0, show_default=True, type=click.FloatRange(min=0), help="Mean delay."
)
@click.option(
    "--latency-sigma",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="> 0: lognormal delays with this sigma (seeded by --seed).",
)
@click.option(
    "--error-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of requests answered 5xx.",
)
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute before 429s (rpm/60 a second).")
@click.option(
    "--window",
    type=click.Choice(["sliding", "fixed"]),
    default="sliding",
    show_default=True,
    help="--rpm over the last 1 s before each request (sliding), or per whole 1 s slice (fixed).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds latencies and 5xx choices.")
@friendly_errors
def simulate(
    host: str,
    port: int,
    latency_ms: float,
    latency_sigma: float,
    error_rate: float,
    rpm: int | None,
    window: Literal["sliding", "fixed"],
    seed: int,
) -> None:
    """Serve a simulated OpenAI-compatible endpoint until Ctrl-C.

    Deterministic answers (the lead sentences of the last user message, cut to max_tokens),
    token usage, latency, injected 5xx and 429s with Retry-After. GET /simulator/stats counts
    answers by status; POST /simulator/reset starts the counts afresh. Point a job at it with
    `endpoint: {base_url: http://127.0.0.1:8787/v1}`.
    """
    from batchrun.loop import run_async
    from batchrun.simulator import SimulatorConfig, serve_forever

    config = SimulatorConfig(
        latency_ms=latency_ms,
        latency_sigma=latency_sigma,
        error_rate=error_rate,
        rpm=rpm,
        window=window,
        seed=seed,
    )
    ready = functools.partial(click.echo, err=True)
    try:
        run_async(serve_forever(config, host, port, lambda url: ready(f"simulator listening on {url}")))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise BatchrunError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
