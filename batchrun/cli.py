"""The `batchrun` command: parse flags, call the library, turn the outcome into an exit code."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click
from click_default_group import DefaultGroup

from batchrun.errors import BatchrunError, ExitCode, JobChanged, Remedy
from batchrun.terminal import printable

# Commands import what they use when they run, so that `--help` and `--version` need none of
# polars, aiohttp, pydantic or genai-prices (tests/test_startup.py).
if TYPE_CHECKING:
    from batchrun.batch import BatchOptions
    from batchrun.distributed import RayOptions
    from batchrun.estimate import Pilot
    from batchrun.job import JobSpec
    from batchrun.report import RunResult
    from batchrun.runner import RunOptions
    from batchrun.simulator_process import SimulatorProcess

F = TypeVar("F", bound=Callable[..., Any])

EXIT_MEANINGS = {
    ExitCode.OK: "every row ok",
    ExitCode.ROWS_FAILED: "finished, some rows failed (see the output's `status` and `error`)",
    ExitCode.USAGE: "bad job, input or usage, or a job-wide error such as a rejected key",
    ExitCode.BUDGET: "stopped by the budget (rerun with a larger --max-cost to resume)",
    ExitCode.UNAVAILABLE: "the endpoint is unavailable (unreachable, or down past retry.max_outage_s);\n"
    "       nothing was lost: rerun later to resume",
    ExitCode.INTERRUPTED: "interrupted (checkpoint kept: rerun to resume)",
}
# Every code, from the enum: one without a meaning above fails at import (tests/test_startup.py).
EXIT_CODES = "\b\nExit codes:\n" + "\n".join(f"  {code.value:<4} {EXIT_MEANINGS[code]}" for code in ExitCode)

DEBUG = "batchrun.debug"  # click's context meta: --debug or BATCHRUN_DEBUG=1


def friendly_errors(command: F) -> F:
    """One `Error: ...` line and the error's exit code; --debug or BATCHRUN_DEBUG=1 re-raise."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool, **kwargs: Any) -> Any:
        debug = debug or os.environ.get("BATCHRUN_DEBUG") == "1"
        click.get_current_context().meta[DEBUG] = debug
        try:
            return command(*args, **kwargs)
        except BatchrunError as exc:
            if debug:
                raise
            click.echo(f"Error: {printable(exc.describe(flag), one_line=True)}", err=True)
            sys.exit(exc.exit_code)

    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(
        wrapper
    )  # type: ignore[return-value]


def flag(remedy: Remedy) -> str:
    """A remedy as a flag of the CLI: yes=True is --yes, check_model=False --no-check-model."""
    name = remedy.option.replace("_", "-")
    if remedy.value is True:
        return f"--{name}"
    if remedy.value is False:
        return f"--no-{name}"
    return f"--{name} {remedy.value}"


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


def program() -> None:
    """The `batchrun` program: the installed script and `python -m batchrun`.

    Start-up builds a few hundred thousand objects that live as long as the process (polars,
    pydantic's models, aiohttp). Python's cycle collector would walk them again and again: while
    they are imported, then on every full collection during the run, about a fifth of a short
    run's CPU. So it stays off until a long-running command has imported what it runs with
    (`settle`); the rest are short and free their objects by reference counting.

    The process then leaves without the interpreter's teardown (freeing every object of every
    module, ~35 ms of a short run): by then every file is written and closed, and only stdout and
    stderr are left to flush. Not after Ray was imported: its exit handler stops the local
    cluster a run started.
    """
    gc.disable()
    try:
        main(prog_name="batchrun")  # not "python -m batchrun" in --version and usage lines
    except SystemExit as exit:
        if not isinstance(exit.code, int | None) or "ray" in sys.modules:
            raise
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a closed pipe (`| head`): as Python reports it
            raise exit from None
        os._exit(exit.code or 0)


def settle() -> None:
    """Set aside what start-up built (gc.freeze: never walked again) and collect from here on;
    nothing when the collector was on (the CLI run in-process, as tests and notebooks do)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


@click.group(cls=DefaultGroup, default="run", default_if_no_args=False)
@click.version_option(package_name="batchrun")
def main() -> None:
    """Run one LLM chat request per row of a table, resumably.

    \b
    batchrun jobs/summarize.yaml              run a job (same as `batchrun run ...`)
    batchrun jobs/summarize.yaml --simulate   run it offline against the built-in simulator
    batchrun jobs/summarize.yaml --batch      through the provider's Batch API, at its lower rate
    batchrun validate jobs/summarize.yaml     check the job and show the first request
    batchrun status jobs/summarize.yaml       rows done / failed / pending so far
    batchrun models --job jobs/summarize.yaml the models the job's endpoint offers
    batchrun estimate jobs/summarize.yaml     what the rows still to do will cost
    batchrun cost out/summaries.parquet       rows, tokens and cost per model and status
    batchrun report jobs/summarize.yaml       the run report as a page to look at (HTML)
    batchrun prune jobs/summarize.yaml        drop the answers no row of the job uses
    batchrun cancel jobs/summarize.yaml       cancel the job's live provider batches
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
@click.option(
    "--batch",
    is_flag=True,
    help="Send the rows through the provider's Batch API (as `mode: batch` does): cheaper, answers "
    "within 24 h.",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="In batch mode: submit the batches and exit; a later run collects their answers.",
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
    batch: bool,
    no_wait: bool,
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
      batchrun jobs/summarize.yaml --batch --no-wait  # submit batches; rerun to collect
    """
    ray = ray_options(ray_address, workers)
    spec = load_spec(job_file, no_check_model)
    if simulate_latency_ms is not None and not simulate:
        raise click.UsageError("--simulate-latency-ms goes with --simulate")
    if no_wait and not (batch or spec.mode == "batch"):
        raise click.UsageError("--no-wait goes with --batch (or the job's `mode: batch`)")
    if no_wait and simulate:
        raise click.UsageError("--no-wait cannot go with --simulate: the simulator ends with this run")
    with contextlib.ExitStack() as stack:
        simulator = None
        if simulate:  # started before the run's imports, so that it starts while they are imported
            from batchrun.simulator_process import SimulatorProcess

            simulator = stack.enter_context(SimulatorProcess(spec.model, simulate_latency_ms or 0.0))
        from batchrun.runner import RunOptions

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
            batch=batch_options(batch, no_wait),
        )
        if ray is not None:
            from batchrun.distributed.cluster import connect

            # here, on the main thread, before anything is sent; Ray's own log lines only with --debug
            connect(ray.address, debug=click.get_current_context().meta[DEBUG])
        try:
            result = run_in_process(spec, options, simulator)
        except JobChanged as exc:
            if not sys.stdin.isatty():
                raise
            if not click.confirm(f"{exc.what()}; send them?", err=True):
                sys.exit(exc.exit_code)
            result = run_in_process(spec, dataclasses.replace(options, yes=True), simulator)
    if not quiet:
        echo(summary(result, job_file), err=True)
    elif result.budget_stopped:
        echo(budget_stop(result, job_file), err=True)
    sys.exit(result.exit_code)


def ray_options(address: str | None, workers: int | None) -> RayOptions | None:
    """--ray and --workers; Ray is imported before the job is read: without the extra, say so first."""
    if workers is not None and address is None:
        raise click.UsageError("--workers goes with --ray")
    if address is None:
        return None
    from batchrun.distributed.cluster import import_ray

    import_ray()
    from batchrun.distributed import RayOptions

    return RayOptions(address or None, workers)


def batch_options(batch: bool, no_wait: bool) -> BatchOptions | bool:
    """--batch and --no-wait; False: as the job's `mode` says."""
    if not (batch or no_wait):
        return False
    from batchrun.batch import BatchOptions

    return BatchOptions(wait=not no_wait)


def run_in_process(
    spec: JobSpec, options: RunOptions, simulator: SimulatorProcess | None = None
) -> RunResult:
    """Run a job as this process's one task: progress on stderr, and the process's signals.

    The first SIGINT or SIGTERM stops sending and lets in-flight rows finish within the grace
    period (the output is written, exit 130), or in batch mode leaves the batches running at the
    provider; a second exits at once (the checkpoint is consistent).
    """
    import asyncio
    import signal

    from batchrun.core import Stop
    from batchrun.loop import run_async
    from batchrun.progress import Progress
    from batchrun.runner import run_job

    settle()
    progress = Progress(options.quiet)
    stop = Stop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.requests:
            print(
                "batchrun: stopped at once; the checkpoint is consistent, rerun to resume",
                file=sys.stderr,
                flush=True,
            )
            os._exit(ExitCode.INTERRUPTED)
        if options.batch or spec.mode == "batch":  # nothing is in flight: the batches run on their own
            progress.say(
                f"batchrun: {sig.name} received: submitting no more batches; those submitted keep "
                "running at the provider, and a rerun in batch mode collects them (press Ctrl-C "
                "again to stop at once)"
            )
        else:
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
            from batchrun.simulator_process import SimulatorProcess

            if simulator is None:
                simulator = stack.enter_context(SimulatorProcess(spec.model, options.simulate_latency_ms))
            base_url = simulator.base_url()
        try:
            return run_async(main(base_url))
        finally:
            progress.close()


def summary(result: RunResult, job_file: Path) -> str:
    lines = result.figures()
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


def budget_stop(result: RunResult, job_file: Path) -> str:
    return (
        f"stopped by the budget: ${result.cost_usd or 0:.4f} spent of ${result.budget_usd:g}, the next "
        f"request could pass it; {result.pending} rows pending; rerun with a larger budget "
        f"(--max-cost N) to resume: batchrun {job_file} --max-cost N"
    )


def load_spec(job_file: Path, no_check_model: bool) -> JobSpec:
    """The job in JOB, with endpoint.check_model off when --no-check-model says so."""
    from batchrun.job import load_job, without_model_check

    spec = load_job(job_file)
    return without_model_check(spec) if no_check_model else spec


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
    from batchrun.api import Job

    checked = Job(load_spec(job_file, no_check_model), output=output).validate()
    if checked.note:
        echo(checked.note, err=True)
    echo(
        f"ok: {job_file}: {checked.rows} rows from {checked.input.name}, "
        f"model {checked.model}, output {checked.output}",
        err=True,
    )
    for problem in checked.image_problems:
        echo(f"warning: {printable(problem, one_line=True)} (the row would fail, unsent)", err=True)
    echo(json.dumps(checked.first_request, indent=2, ensure_ascii=False))


@main.command()
@job_argument
@output_option
@friendly_errors
def status(job_file: Path, output: str | None) -> None:
    """Show rows done / failed / pending and tokens so far, from JOB's checkpoint."""
    from batchrun.api import Job

    status = Job.from_yaml(job_file, output=output).status()
    for line in status.figures():
        echo(line)
    if status.live_batches:
        echo(f"to collect them: batchrun {job_file} --batch; to cancel them: batchrun cancel {job_file}")


@main.command(name="cancel")
@job_argument
@output_option
@friendly_errors
def cancel_command(job_file: Path, output: str | None) -> None:
    """Cancel JOB's live provider batches; collect what they answered, the rest goes back to pending.

    Waits for the provider to end each batch (Ctrl-C leaves them cancelling: a later run in batch
    mode collects them), then writes the output as `run` does. Rows answered before the cancel
    are kept, and paid for; a rerun sends the others again.

    \b
    Example:
      batchrun cancel jobs/summarize.yaml
    """
    from batchrun.batch import BatchOptions
    from batchrun.runner import RunOptions

    options = RunOptions(output=output, batch=BatchOptions(cancel=True), yes=True)
    result = run_in_process(load_spec(job_file, no_check_model=True), options)
    echo(summary(result, job_file), err=True)
    sys.exit(result.exit_code)


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
    from batchrun.api import Job, model_note
    from batchrun.runner import RunOptions

    job = Job(load_spec(job_file, no_check_model), output=output)
    if not simulate and (note := model_note(job.spec)):
        echo(note, err=True)

    def send(pilot: Pilot) -> RunResult | None:
        """Ask (unless --yes), then send the pilot with progress and the process's signals."""
        cost = ""
        if pilot.expected_usd is not None and pilot.worst_usd is not None:
            images = ", images not included" if pilot.images_unpriced else ""
            cost = f" (about ${pilot.expected_usd:.4f}, at most ${pilot.worst_usd:.4f}{images})"
        where = "the simulator" if simulate else job.spec.endpoint.base_url
        if not (yes or _confirm(f"send a pilot of {len(pilot.rows)} random rows{cost} to {where}?")):
            return None
        # yes: asked above, with the pilot's cost (a changed job's finished rows among them)
        result = run_in_process(
            job.spec, RunOptions(simulate=simulate, rows=pilot.rows, output=output, yes=True)
        )
        echo(summary(result, job_file), err=True)
        if result.interrupted or result.budget_stopped:
            sys.exit(result.exit_code)
        return result

    projection = job.estimate(sample=sample, simulate=simulate, send=send)
    echo("\n".join(projection.figures()))


def _confirm(question: str) -> bool:
    """Ask on stdin; with nothing to read there (no terminal, no piped answer), say how to go on."""
    try:
        return click.confirm(question, err=True)
    except click.Abort:
        echo(err=True)  # end the question's line
        raise BatchrunError(
            "no answer on stdin (no terminal?)", remedy=Remedy("yes", True, "to send the pilot")
        ) from None


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
    from batchrun.api import Job

    pruned = Job.from_yaml(job_file, output=output).prune()
    if pruned is None:
        echo(f"nothing to prune: {job_file} has no checkpoint yet")
        return
    dropped, kept = pruned
    echo(f"pruned {dropped:,} answers no row of the job uses; {kept:,} kept")


def _output_with_a_job_file(command: str, path: Path, output: str | None) -> None:
    if output is not None and path.suffix.lower() not in (".yaml", ".yml"):
        raise BatchrunError(f"--output goes with a job file: `batchrun {command} JOB --output PATH`")


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
    from batchrun.api import cost_table
    from batchrun.report import format_cost_report

    _output_with_a_job_file("cost", path, output)
    report = cost_table(path, by, output=output)
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
    import webbrowser

    from batchrun.api import draw_report

    _output_with_a_job_file("report", path, output)
    html_path = draw_report(path, by, output=output)
    echo(f"report: {html_path} ({html_path.stat().st_size / 1024:,.0f} KiB)")
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
    from batchrun.api import offered_models
    from batchrun.job import load_job

    for model in offered_models(load_job(job_file) if job_file else None, simulate):
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
    "--tpm",
    type=click.IntRange(min=1),
    help="Tokens per minute before 429s (tpm/60 a second; prompt + completion).",
)
@click.option(
    "--window",
    type=click.Choice(["sliding", "fixed"]),
    default="sliding",
    show_default=True,
    help="--rpm and --tpm over the last 1 s before each request (sliding), or per whole 1 s slice (fixed).",
)
@click.option(
    "--headers",
    type=click.Choice(["window", "per-minute"]),
    default="window",
    show_default=True,
    help="What x-ratelimit-* headers count: that 1 s, or the minute as OpenAI's do (1 s still enforced).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds latencies and 5xx choices.")
@click.option(
    "--batch-s",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How long a batch of the Batch API takes, from its creation to its end.",
)
@click.option(
    "--batch-api",
    type=click.Choice(["openai", "xai", "none"]),
    default="openai",
    show_default=True,
    help="The Batch API offered: OpenAI's (/v1/files and /v1/batches), xAI's (/v1/batches added to "
    "in parts); none answers them 404.",
)
@friendly_errors
def simulate(
    host: str,
    port: int,
    latency_ms: float,
    latency_sigma: float,
    error_rate: float,
    rpm: int | None,
    tpm: int | None,
    window: Literal["sliding", "fixed"],
    headers: Literal["window", "per-minute"],
    seed: int,
    batch_s: float,
    batch_api: Literal["openai", "xai", "none"],
) -> None:
    """Serve a simulated OpenAI-compatible endpoint until Ctrl-C.

    Deterministic answers (the lead sentences of the last user message, cut to max_tokens),
    token usage, latency, injected 5xx, rate limits (429s with Retry-After, x-ratelimit-* headers),
    and a Batch API (files and batches in OpenAI's shape, or xAI's) whose batches take --batch-s.
    GET /simulator/stats counts answers by status; POST /simulator/reset starts the counts afresh.
    Point a job at it with `endpoint: {base_url: http://127.0.0.1:8787/v1}`.
    """
    from batchrun.loop import run_async
    from batchrun.simulator import SimulatorConfig, serve_forever

    settle()
    config = SimulatorConfig(
        latency_ms=latency_ms,
        latency_sigma=latency_sigma,
        error_rate=error_rate,
        rpm=rpm,
        tpm=tpm,
        window=window,
        headers=headers,
        seed=seed,
        batch_api=batch_api,
        batch_s=batch_s,
    )
    ready = functools.partial(click.echo, err=True)
    try:
        run_async(serve_forever(config, host, port, lambda url: ready(f"simulator listening on {url}")))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise BatchrunError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
