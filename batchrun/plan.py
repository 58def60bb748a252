"""What to send: a job whose spec, templates and input were all checked, its request bodies, and
the fingerprint that decides whether a checkpoint may be resumed. Nothing here touches the network."""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchrun.errors import InputError, JobError
from batchrun.job import PYTHON_JOB, JobSpec, table_format
from batchrun.output import probe_destination
from batchrun.prompts import PromptTemplates, conversation
from batchrun.results import OUTPUT_RESULT_COLUMNS
from batchrun.sources import ROW, Source, open_source
from batchrun.storage import Location, Url, location
from batchrun.structured import format_fallbacks

DONE = ("ok", "failed", "skipped")  # statuses a resume does not send again
SIMULATED_ENDPOINT = "simulator"  # what the fingerprint records for --simulate's changing port


@dataclass(frozen=True)
class PreparedJob:
    """A job whose spec, templates and input were all checked; nothing sent yet."""

    spec: JobSpec
    prompts: PromptTemplates
    source: Source
    output_path: Location
    checkpoint_at: Path | None = None  # where the checkpoint lives, when not beside the output

    @property
    def local_output(self) -> Path:
        """The local stem of the checkpoint, report and estimate files: the output itself, or for
        a URL `.batchrun/NAME-HASH` beside the job file (the current folder for a job defined
        in Python), HASH from the whole URL so that two outputs of one name do not share it."""
        output = self.output_path
        if isinstance(output, Path):
            return output
        folder = Path.cwd() if self.spec.job_path == PYTHON_JOB else self.spec.job_path.parent
        return output.local_stem(folder)

    @property
    def checkpoint_path(self) -> Path:
        if self.checkpoint_at is not None:
            return self.checkpoint_at
        return self.local_output.with_name(self.local_output.name + ".checkpoint.sqlite")

    @property
    def report_path(self) -> Path:
        return self.local_output.with_name(self.local_output.name + ".report.json")

    @property
    def estimate_path(self) -> Path:
        return self.local_output.with_name(self.local_output.name + ".estimate.json")

    def first_request(self) -> dict[str, Any]:
        row = next(self.source.batches(self.prompts.columns, limit=1))[0]
        return self.request_body(row)

    @functools.cached_property
    def params(self) -> dict[str, Any]:
        params = self.spec.params.body()
        if self.format_fallbacks:
            params["response_format"] = self.format_fallbacks[0]
        return params

    @functools.cached_property
    def format_fallbacks(self) -> tuple[dict[str, Any] | None, ...]:
        """The response_formats batchrun sends, in turn while the endpoint refuses them; none
        when the job uses tools or sets its own (which is never touched)."""
        fields = self.spec.output.fields
        if not fields or self.spec.params.tools or "response_format" in self.spec.params.body():
            return ()
        return format_fallbacks(fields)

    @functools.cached_property
    def output_cap(self) -> tuple[str, int] | None:
        """The params key that caps an answer's tokens, and its value, if the job sets one."""
        for key in ("max_completion_tokens", "max_tokens"):
            if isinstance(value := self.params.get(key), int):
                return key, value
        return None

    def request_body(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.spec.model, "messages": self.prompts.messages(row), **self.params}

    def fingerprint(self, simulate: bool) -> dict[str, Any]:
        """What decides a row's answer; a checkpoint is reused only while all of it holds."""
        spec = self.spec
        return {
            "prompt": spec.prompt.model_dump(mode="json", exclude_none=True),
            "model": spec.model,
            "params": self.params,
            "endpoint.base_url": SIMULATED_ENDPOINT if simulate else spec.endpoint.base_url,
            "input": {
                "sha256": self.source.fingerprint(),
                "id_column": self.source.id_column,
                "messages_column": spec.input.messages_column,
            },
            "output.fields": spec.output.model_dump(mode="json")["fields"],
        }


def prepare(
    spec: JobSpec,
    output: str | Location | None = None,
    write: bool = True,
    *,
    checkpoint: Path | None = None,
) -> PreparedJob:
    """Check everything that can fail before a request is sent; `write=False` for commands that
    only read the checkpoint, so they work in a folder they cannot write. `output` overrides
    output.path (a local path or a URL, as --output gives it); `checkpoint` the job's checkpoint."""
    prompts = spec.prompt_templates()
    try:
        given = location(output) if output is not None else spec.output.path
    except ValueError as exc:
        raise JobError(f"--output: {exc}") from None
    output_path = given.resolve() if isinstance(given, Path) else given
    input_path = spec.input.path.resolve() if isinstance(spec.input.path, Path) else spec.input.path
    if output_path == input_path:
        raise JobError("output.path is the input file; choose another path", spec.job_path)
    if isinstance(output_path, Path):
        _check_output_folder(output_path, "--output" if output else "output.path", spec, write)
    if output is not None:  # the job's own output.path was checked with the job
        try:
            table_format(output_path, spec.output.format, "--output", "output.format")
        except ValueError as exc:
            raise JobError(str(exc)) from None
    clash = [c for c in spec.output.include_columns if c in OUTPUT_RESULT_COLUMNS]
    if clash:
        raise JobError(
            f"output.include_columns: '{clash[0]}' is also a result column; rename it in the input",
            spec.job_path,
        )
    taken = {"id", *OUTPUT_RESULT_COLUMNS, *spec.output.include_columns}
    if clash := [name for name in spec.output.fields if name in taken]:
        raise JobError(
            f"output.fields: '{clash[0]}' is also an output column (result or included); rename the field",
            spec.job_path,
        )
    needed = {"output.include_columns": spec.output.include_columns, **prompts.needed()}
    no_nulls = prompts.columns if spec.input.on_null == "error" else ()
    source = open_source(spec.input.path, spec.input.id_column, needed, no_nulls, spec.input.format)
    if prompts.messages_column:
        _check_conversations(source, prompts.messages_column, skip_nulls=spec.input.on_null == "skip")
    checkpoint = checkpoint or spec.checkpoint
    if checkpoint is not None:
        checkpoint = checkpoint.resolve()
    job = PreparedJob(spec, prompts, source, output_path, checkpoint)
    if checkpoint is not None or isinstance(output_path, Url):
        _check_output_folder(job.checkpoint_path, "checkpoint", spec, write)
    job.first_request()
    if isinstance(output_path, Url) and write:
        probe_destination(output_path)  # last: a check that writes comes after all that only read
    return job


def _check_output_folder(path: Path, key: str, spec: JobSpec, write: bool) -> None:
    """The output must go in a folder (made if missing, as the run does) we may write to. Writing
    is tested by creating a file: the only test true for root and for immutable folders."""
    job_path = spec.job_path if key == "output.path" else None
    if path.is_dir():
        raise JobError(f"{key} {path} is a folder; name a file in it", job_path)
    folder = path.parent
    while not folder.exists():  # the nearest existing ancestor: where a missing folder is made
        folder = folder.parent
    if not folder.is_dir():
        raise JobError(f"{key} {path}: {folder} is a file, not a directory", job_path)
    if write:
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".batchrun-write-test-"):
                pass
        except OSError as exc:
            raise JobError(
                f"{key} {path}: the folder {folder} is not writable ({exc.strerror or exc})", job_path
            ) from None


def _check_conversations(source: Source, column: str, skip_nulls: bool) -> None:
    """Every row's messages must parse before the first is sent: one bad row stops the job here."""
    for batch in source.batches((column,), limit=None):
        for row in batch:
            if row[column] is None and skip_nulls:
                continue
            try:
                conversation(row[column])
            except ValueError as exc:
                raise InputError(
                    f"input.messages_column '{column}', row {row[ROW] + 1} of {source.path.name}: {exc}"
                ) from None
