"""What to send: a job whose spec, templates and input were all checked, its request bodies and
request keys, the rows still to do, and the fingerprint of the job. Nothing here touches the network.

A row's request key is the sha256 of the canonical JSON of its request as the job declares it
(endpoint, model, params, messages), made before anything batchrun changes per attempt (a
response_format it drops, a re-ask's correction); with the row's occurrence number among
identical requests it names the row's result in the checkpoint. Keys are computed a batch at a
time as the input streams to the workers (KeyedPlan), never for the whole input up front.

That key pass renders and hashes every row (~20 us a row: 20 s for 1M). A resume of an input
whose files are as the last complete pass found them (paths, sizes, mtimes; the same request-key
parts) skips it: IndexedPlan reads the rows still to do from the checkpoint's index, renders
only those, and checks each one's key against the index (a mismatch: the input was changed
behind its size and mtime; the run stops and the next one makes the pass).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from batchrun.checkpoint import (
    Checkpoint,
    Fingerprint,
    KeyIndex,
    Rekey,
    ToDo,
    open_checkpoint,
    without_input_hash,
)
from batchrun.errors import CheckpointError, InputError, JobError, Remedy, RowInputError
from batchrun.images import pillow_missing, shown
from batchrun.job import PYTHON_JOB, ImagesSpec, JobSpec, table_format
from batchrun.output import probe_destination
from batchrun.prompts import PromptTemplates, conversation
from batchrun.results import OUTPUT_RESULT_COLUMNS, RowStatus
from batchrun.sources import BATCH_ROWS, ROW, Source, open_source
from batchrun.storage import Location, Url, location
from batchrun.structured import format_fallbacks

SIMULATED_ENDPOINT = "simulator"  # what the fingerprint and the keys name --simulate's endpoint by
# The key sent to the simulator: no text a user writes, since answers are masked for the key.
SIMULATED_KEY = "sim-4c1f9e07b2d8"
# Input rows read, rendered and keyed at a time: their request bodies are held until sent (8,192
# rows of 2 KB prompts held ~20 MB). A resume's to-do pages are still taken BATCH_ROWS at a time.
RENDER_BATCH_ROWS = 2048
# A key-pass batch of a job with images: every image of a batch is read (streamed) before its
# first row is sent, and a binary column's images are held with their batch.
IMAGE_BATCH_ROWS = 256
IMAGE_CHECK_ROWS = 10  # the first rows whose images `validate` reads, as their run would


@dataclass(slots=True)
class Planned:
    """One row to send (or to record as skipped): what the core's producer takes."""

    row: int
    id: str
    request_key: bytes
    occurrence: int
    body: dict[str, Any] | None  # None: not sent, a prompt column is empty (input.on_null: skip)
    empty: tuple[str, ...] = ()  # the empty prompt columns of a skipped row


# What a run leaves beside its (local) output table: OUTPUT.checkpoint.sqlite, OUTPUT.report.json.
CHECKPOINT_SUFFIX = ".checkpoint.sqlite"
REPORT_SUFFIX = ".report.json"


def beside(output: Path, suffix: str) -> Path:
    return output.with_name(output.name + suffix)


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
        return beside(self.local_output, CHECKPOINT_SUFFIX)

    @property
    def report_path(self) -> Path:
        return beside(self.local_output, REPORT_SUFFIX)

    @property
    def estimate_path(self) -> Path:
        return self.local_output.with_name(self.local_output.name + ".estimate.json")

    def first_request(self) -> dict[str, Any]:
        """The first row's request, its images unread."""
        row = next(self.source.batches(self.prompts.columns, limit=1))[0]
        return self.request_body(row)

    def shown_request(self) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The first request as `validate` shows it (its images read, checked and inlined as a
        run would send them, each data URL cut short), and the images of the first rows that
        would fail their row, by row."""
        images = self.prompts.images
        if images is None:
            return self.first_request(), ()
        problems = []
        first = None
        for row in next(self.source.batches(self.prompts.columns, limit=IMAGE_CHECK_ROWS)):
            body = self.rendered(row)
            if body is None:  # not sent (input.on_null: skip)
                continue
            try:
                body = images.inline(body)
            except RowInputError as exc:
                problems.append(f"row {row[ROW] + 1}: {exc}")
            first = first or body
        return shown(first or self.first_request()), tuple(problems)

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
        """The job-level parts of every row's request: when they change, every finished row's
        request changes. The input is not in it: its rows are matched by request key."""
        spec = self.spec
        return {
            "prompt": spec.prompt.model_dump(mode="json", exclude_none=True),
            "model": spec.model,
            "params": self.params,
            "endpoint.base_url": _endpoint(spec.endpoint.base_url, simulate),
            "input": {"id_column": self.source.id_column, "messages_column": spec.input.messages_column},
            "output.fields": spec.output.model_dump(mode="json")["fields"],
        } | ({"images": (spec.images or ImagesSpec()).model_dump(mode="json")} if spec.prompt.images else {})

    def keys(self, simulate: bool) -> RequestKeys:
        return RequestKeys(_endpoint(self.spec.endpoint.base_url, simulate), self.spec.model, self.params)

    def keyed_body(self, row: dict[str, Any], keys: RequestKeys) -> tuple[dict[str, Any] | None, bytes]:
        """A row's request body and key; a row with a null prompt value under `on_null: skip`
        is never rendered (no body) and is keyed by the values it has. Its images are read for
        their sha256, which the key hashes (images.py)."""
        body = self.rendered(row)
        if body is not None and self.prompts.images:
            self.prompts.images.digest_all([body])
        return body, self.key_of(row, body, keys)

    def rendered(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """A row's request body, its images unread; None under `on_null: skip` with a null value."""
        columns = self.prompts.columns
        if self.spec.input.on_null == "skip" and any(row[c] is None for c in columns):
            return None
        return self.request_body(row)

    def key_of(self, row: dict[str, Any], body: dict[str, Any] | None, keys: RequestKeys) -> bytes:
        """The key of a rendered row (its images read): of its messages, or of a skipped row's values."""
        if body is not None:
            return keys.key(body["messages"])
        return keys.key({c: _keyable(row[c]) for c in self.prompts.columns})

    def input_identity(self, keys: RequestKeys, dedupe: bool) -> str | None:
        """What a complete key pass indexed: the input's files as they are now and every part
        of a row's key that is not in the row; None for a URL (never trusted without a pass)."""
        files = self.source.identity()
        if files is None or self.prompts.images:  # images may change while the table does not
            return None
        identity = {
            "files": files,
            "rows": self.source.row_count,
            "format": self.source.format,
            "columns": [*self.row_columns],
            "requests": keys.job,
            "prompt": self.spec.prompt.model_dump(mode="json", exclude_none=True),
            "messages_column": self.spec.input.messages_column,
            "on_null": self.spec.input.on_null,
            "dedupe": dedupe,
        }
        return orjson.dumps(identity, option=orjson.OPT_SORT_KEYS).decode()

    @property
    def row_columns(self) -> tuple[str, ...]:
        """The columns a row is rendered and named from: the prompt's and the id."""
        columns = self.prompts.columns
        if self.source.id_column and self.source.id_column not in columns:
            columns += (self.source.id_column,)
        return columns

    def planned(
        self, row: dict[str, Any], key: bytes, occurrence: int, body: dict[str, Any] | None
    ) -> Planned:
        """A rendered row as the core's producer takes it: its id, and the prompt columns that
        are empty where it was not rendered (on_null: skip)."""
        empty = () if body is not None else tuple(c for c in self.prompts.columns if row[c] is None)
        row_id = str(row[self.source.id_column]) if self.source.id_column else str(row[ROW])
        return Planned(row[ROW], row_id, key, occurrence, body, empty)

    def keyed_batches(
        self, index: KeyIndex, keys: RequestKeys, limit: int | None = None, dedupe: bool = False
    ) -> Iterator[KeyedBatch]:
        """The input's rows (the prompt and id columns) a batch at a time, each row rendered,
        keyed and indexed; `index` answers which of them are finished. A pass over the whole
        input records the input's identity, taken before the first row is read, with its end."""
        whole = limit is None or limit >= self.source.row_count
        identity = self.input_identity(keys, dedupe) if whole else None
        images = self.prompts.images
        for batch in self.source.batches(
            self.row_columns, limit, IMAGE_BATCH_ROWS if images else RENDER_BATCH_ROWS
        ):
            bodies = [self.rendered(row) for row in batch]
            if images:
                images.digest_all(bodies)
            row_keys = [self.key_of(row, body, keys) for row, body in zip(batch, bodies, strict=True)]
            positions = [row[ROW] for row in batch]
            occurrences, first = index.add(positions, row_keys)
            yield KeyedBatch(batch, bodies, row_keys, occurrences, first)
        index.end(identity)


def _keyable(value: Any) -> Any:
    """A skipped row's value as its key hashes it: image bytes by their sha256."""
    if isinstance(value, bytes):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    if isinstance(value, list):
        return [_keyable(v) for v in value]
    return value


def _endpoint(base_url: str, simulate: bool) -> str:
    return SIMULATED_ENDPOINT if simulate else base_url


class RequestKeys:
    """Request keys for one job version: sha256 over the canonical JSON (sorted keys) of the
    job-level parts, then of the row's messages; 16 bytes. Not polars' hash(), which changes
    between versions."""

    def __init__(self, base_url: str, model: str, params: dict[str, Any]):
        job = {"base_url": base_url, "model": model, "params": params}
        self.job = job
        self._job = hashlib.sha256(orjson.dumps(job, option=orjson.OPT_SORT_KEYS))

    def key(self, messages: Any) -> bytes:
        digest = self._job.copy()
        digest.update(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS))
        return digest.digest()[:16]


@dataclass(frozen=True, slots=True)
class KeyedBatch:
    rows: list[dict[str, Any]]  # the input's rows (prompt and id columns, ROW)
    bodies: list[dict[str, Any] | None]  # the request of each; None: skipped (an empty column)
    keys: list[bytes]
    occurrences: list[int]
    first: list[bool]  # the first row of its request in the input

    @property
    def row_range(self) -> tuple[int, int]:
        return self.rows[0][ROW], self.rows[-1][ROW]


class KeyedPlan:
    """The rows a run sends, keyed and indexed a batch at a time as the producer asks: a row is
    sent when its (request_key, occurrence) has no result yet (with `retry_failed`, when its
    result failed; with `only`, when it is among those rows too); with dedupe, only the first
    row of each request. What the producer did not reach is indexed by `finish()` (not sent), so
    the output and reports see every row."""

    def __init__(
        self,
        job: PreparedJob,
        index: KeyIndex,
        keys: RequestKeys,
        *,
        limit: int | None = None,
        retry_failed: bool = False,
        only: frozenset[int] | None = None,
        dedupe: bool = False,
    ):
        self._job = job
        self._index = index
        self._batches = job.keyed_batches(index, keys, limit, dedupe)
        self._lock = threading.Lock()  # next() may still run in a thread the producer left
        self._retry_failed = retry_failed
        self._only = only
        self._dedupe = dedupe
        self.reused = 0  # rows not sent so far because an earlier row sends their request (dedupe)

    def next_batch(self) -> list[Planned] | None:
        """The next batch's rows to send; None when the input is done."""
        with self._lock:
            batch = next(self._batches, None)
            if batch is None:
                return None
            statuses = self._index.finished(*batch.row_range, "status" if self._retry_failed else "")
        planned = []
        for i, row in enumerate(batch.rows):
            position = row[ROW]
            status = statuses.get(position)
            if self._retry_failed:
                wanted = status is not None and status[0] == RowStatus.FAILED
            else:
                wanted = status is None and (self._only is None or position in self._only)
            if not wanted:
                continue
            if self._dedupe and not batch.first[i]:
                self.reused += 1
                continue
            planned.append(self._job.planned(row, batch.keys[i], batch.occurrences[i], batch.bodies[i]))
        return planned

    def requests(self) -> AsyncIterator[Planned]:
        """The rows to send, for the core's producer; each batch is keyed in a thread."""
        return _in_threads(self.next_batch)

    def close(self) -> None:
        """Wait for a batch still being keyed in a thread the producer left (a stopped run), and
        key no more: the checkpoint's connections are closed next, and SQLite must not be in use."""
        with self._lock:
            self._batches = iter(())

    def finish(self) -> None:
        """Index the rows the producer did not reach, sending none of them."""
        with self._lock:
            for _ in self._batches:
                pass


class IndexedPlan:
    """The rows a resume of an unchanged input sends, read from the checkpoint's index (`rows`,
    as the last complete pass wrote it) instead of keying the whole input: the rows with no
    result (`retry_failed`: a failed one), with `only` those among them, with dedupe the first
    of each request (the others reuse its answer, as in KeyedPlan). Only they are read from
    the input and rendered, and each one's key must be the index's: one that is not means the
    input changed behind its size and mtime, and the run stops (InputError) with the index's
    identity dropped, so that the next run makes the whole pass. Stopping, not switching to a
    pass mid-run, keeps any row in flight from being sent twice."""

    def __init__(
        self,
        job: PreparedJob,
        to_do: ToDo,
        keys: RequestKeys,
        *,
        retry_failed: bool = False,
        only: frozenset[int] | None = None,
        dedupe: bool = False,
    ):
        self._job = job
        self._to_do = to_do
        self._keys = keys
        self._retry_failed = retry_failed
        self._only = only
        self._dedupe = dedupe
        self._sent: set[bytes] = set()  # dedupe: the requests sent (the rows to do, no more)
        self._indexed: dict[int, tuple[bytes, int]] = {}
        self._rows = job.source.rows_at(job.row_columns, self._pages())
        self._lock = threading.Lock()
        self.reused = 0

    def _pages(self) -> Iterator[list[int]]:
        after = -1
        while page := self._to_do.page(after, BATCH_ROWS, self._retry_failed):
            after = page[-1][0]
            only = None if self._retry_failed else self._only  # as KeyedPlan: failed rows, all
            wanted = [p for p in page if only is None or p[0] in only]
            if self._dedupe:
                fresh = []
                for position, key, occurrence in wanted:
                    if key in self._sent:
                        self.reused += 1
                    else:
                        self._sent.add(key)
                        fresh.append((position, key, occurrence))
                wanted = fresh
            if wanted:  # rows_at asks for the next page only when this one's rows were taken
                self._indexed = {position: (key, occurrence) for position, key, occurrence in wanted}
                yield [position for position, _, _ in wanted]

    def next_batch(self) -> list[Planned] | None:
        """The next rows to send; None when none is left."""
        with self._lock:  # whole: a changed row forgets the index, in SQLite
            rows = next(self._rows, None)
            if rows is None:
                return None
            return self._planned(rows, self._indexed)

    def _planned(self, rows: list[dict[str, Any]], indexed: dict[int, tuple[bytes, int]]) -> list[Planned]:
        planned = []
        for row in rows:
            position = row[ROW]
            body, key = self._job.keyed_body(row, self._keys)
            if (key, indexed[position][1]) != indexed[position]:
                self._to_do.forget()
                raise InputError(
                    f"input {self._job.source.path}: row {position + 1} changed while its file's size and "
                    "modification time did not; stopped; run again to key the whole input"
                )
            planned.append(self._job.planned(row, key, indexed[position][1], body))
        return planned

    def requests(self) -> AsyncIterator[Planned]:
        """The rows to send, for the core's producer; each batch read and keyed in a thread."""
        return _in_threads(self.next_batch)

    def close(self) -> None:
        """As KeyedPlan.close: wait for a batch still being read in a thread, and read no more."""
        with self._lock:
            self._rows = iter(())

    def finish(self) -> None:
        """Nothing to index: `rows` already holds every row of the input."""


async def _in_threads(next_batch: Callable[[], list[Planned] | None]) -> AsyncIterator[Planned]:
    """A plan's batches one row at a time, each batch made in a thread (SQLite and rendering
    stay off the event loop)."""
    while (batch := await asyncio.to_thread(next_batch)) is not None:
        for planned in batch:
            yield planned


def run_plan(
    job: PreparedJob,
    checkpoint: Checkpoint,
    simulate: bool,
    *,
    limit: int | None = None,
    retry_failed: bool = False,
    only: frozenset[int] | None = None,
) -> KeyedPlan | IndexedPlan:
    """The plan of a run: from the index when the input is as its last complete pass found it
    (and --limit, if given, takes every row), else the key pass over the input."""
    dedupe = job.spec.dedupe
    keys = job.keys(simulate)
    whole = limit is None or limit >= job.source.row_count
    identity = job.input_identity(keys, dedupe) if whole else None
    if identity is not None and checkpoint.indexed_input() == identity:
        return IndexedPlan(job, checkpoint.to_do(), keys, retry_failed=retry_failed, only=only, dedupe=dedupe)
    index = checkpoint.key_index(dedupe)
    return KeyedPlan(job, index, keys, limit=limit, retry_failed=retry_failed, only=only, dedupe=dedupe)


def index_input(job: PreparedJob, checkpoint: Checkpoint, simulate: bool, limit: int | None = None) -> None:
    """Index every row of the input (up to `limit`) in `checkpoint`, sending nothing: what the
    commands that only read (status, cost, estimate) do before asking it about the current rows."""
    dedupe = job.spec.dedupe
    KeyedPlan(job, checkpoint.key_index(dedupe), job.keys(simulate), limit=limit, dedupe=dedupe).finish()


def read_checkpoint(job: PreparedJob, made_for: tuple[Fingerprint, ...], index: bool = True) -> Checkpoint:
    """The job's checkpoint opened to read (refused if made for another job version, as `run`
    refuses it) and brought to the current schema (an older one in a private copy), with the
    current input indexed (unless not `index`): by the last run's key pass when the input is as
    that pass found it, else in temp tables. Its queries answer for the current rows. No
    checkpoint yet: an empty one in memory."""
    exists = job.checkpoint_path.exists()
    path = job.checkpoint_path if exists else Path(":memory:")
    checkpoint = open_checkpoint(path, "read", *made_for, rekey=rekey_by_row(job, made_for))
    try:
        if index:
            recorded = checkpoint.fingerprint()
            simulate = recorded is not None and recorded.get("endpoint.base_url") == SIMULATED_ENDPOINT
            if not checkpoint.read_as_indexed(job.input_identity(job.keys(simulate), job.spec.dedupe)):
                index_input(job, checkpoint, simulate)
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint


def rekey_by_row(job: PreparedJob, made_for: tuple[Fingerprint, ...]) -> Rekey:
    """The `rekey` of open_checkpoint: a schema 0/1 checkpoint (keyed by row position) made for
    this very input and job is keyed by the requests its rows were made from."""

    def rekey(old: Fingerprint, index: KeyIndex) -> None:
        recorded = old.get("input", {}).get("sha256")
        if recorded != job.source.fingerprint() or without_input_hash(old) not in made_for:
            raise CheckpointError(
                f"checkpoint {job.checkpoint_path.name} was made by batchrun 0.1 for another input or "
                "job, and keys its rows by position (finish it with batchrun 0.1 and the input as it "
                "was)",
                remedy=Remedy("fresh", True, "to start over (its results will be discarded)"),
            )
        simulate = old.get("endpoint.base_url") == SIMULATED_ENDPOINT
        for _ in job.keyed_batches(index, job.keys(simulate)):
            pass

    return rekey


def prepare(
    spec: JobSpec,
    output: str | Location | None = None,
    write: bool = True,
    *,
    checkpoint: Path | None = None,
    input_name: str | None = None,
) -> PreparedJob:
    """Check everything that can fail before a request is sent; `write=False` for commands that
    only read the checkpoint, so they work in a folder they cannot write. `output` overrides
    output.path (a local path or a URL, as --output gives it); `checkpoint` the job's checkpoint;
    `input_name` how errors call the input ("the DataFrame"), by default its file's name."""
    prompts = spec.prompt_templates()
    if prompts.images and (missing := pillow_missing(prompts.images)):
        raise JobError(missing, spec.job_path)
    try:
        given = location(output) if output is not None else spec.output.path
    except ValueError as exc:
        raise JobError(f"output: {exc}") from None
    output_path = given.resolve() if isinstance(given, Path) else given
    input_path = spec.input.path.resolve() if isinstance(spec.input.path, Path) else spec.input.path
    if output_path == input_path:
        raise JobError("output.path is the input file; choose another path", spec.job_path)
    if isinstance(output_path, Path):
        _check_output_folder(output_path, "output" if output else "output.path", spec, write)
    if output is not None:  # the job's own output.path was checked with the job
        try:
            table_format(output_path, spec.output.format, "output", "output.format")
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
    source = open_source(
        spec.input.path, spec.input.id_column, needed, no_nulls, spec.input.format, input_name
    )
    if prompts.messages_column:
        _check_conversations(source, prompts.messages_column, skip_nulls=spec.input.on_null == "skip")
    if prompts.images:
        _check_image_columns(source, prompts.images.columns)
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


def _check_image_columns(source: Source, columns: tuple[str, ...]) -> None:
    """An image column holds text (paths, URLs), bytes, or lists of either."""
    schema = source.lazy().collect_schema()
    for column in columns:
        dtype = schema[column]
        inner = dtype.inner if isinstance(dtype, pl.List) else dtype
        if not isinstance(inner, pl.String | pl.Binary | pl.Null):
            raise InputError(
                f"prompt.images names column '{column}', which holds {dtype}, not paths, URLs or image "
                "bytes (or lists of them)"
            )


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
                    f"input.messages_column '{column}', row {row[ROW] + 1} of {source.name}: {exc}"
                ) from None
