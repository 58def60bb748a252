"""The simulator's Batch API in OpenAI's shape, in memory on the simulator's loop.

`POST /v1/files` (multipart: `file`, `purpose=batch`), `GET /v1/files` (`purpose`), `GET /v1/files/{id}`,
`GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`; `POST /v1/batches` (`input_file_id`,
`endpoint`, `completion_window: 24h`), `GET /v1/batches` (newest first), `GET /v1/batches/{id}`,
`POST /v1/batches/{id}/cancel`.

A batch takes `SimulatorConfig.batch_s` seconds from its creation, its lines answered evenly over
that time, and is looked at lazily, when asked about: `validating` as created, `in_progress` while
its lines are answered, `finalizing` the first time it is seen done, then `completed`, with an
output file (the lines answered 200) and an error file (the others). Each line is answered as the
chat endpoint answers its body (simulator/endpoint.py), without latency or rate limit, so the chat
endpoint's fault markers fail a line (`[[fail:500x1]]`: status 500 in the error file the first
time). Cancelling keeps the lines answered so far (`cancelling`, then `cancelled`); the lines it
never reached are in neither file. Markers for a whole batch, in any line:

* ``[[batch:invalid]]`` - the batch fails validation (`failed`, its `errors` naming the line);
* ``[[batch:expire]]`` / ``[[batch:expirexN]]`` - the batch expires at its end instead of completing
  (always / the first N times this exact line is in a batch): the marked lines are not answered
  (`batch_expired` in the error file), the others are.

Validation, as OpenAI's: each line a JSON object with a unique string `custom_id`, `method: POST`,
the batch's `url` and a `body`; one model per file; at most 50,000 lines and 200 MB.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from batchrun.simulator.httpserver import Outcome, Request, Response

MAX_LINES = 50_000
MAX_BYTES = 200 * 1024 * 1024
ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "expired", "cancelled", "failed"})
PATHS = ("/v1/files", "/v1/batches")  # what the simulator routes here
_BATCH_MARKER_RE = re.compile(rb"\[\[batch:(invalid|expire)(?:x(\d+))?\]\]")


class ErrorResponse(Protocol):
    def __call__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> Response: ...


class BatchStats(Protocol):
    batch_requests: int
    uploads: int
    batch_lines: int
    batch_adds: int


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class _Line:
    custom_id: str
    body: bytes
    expire: bool  # left unanswered when the batch expires


@dataclass
class _Batch:
    id: str
    input_file_id: str
    window: str
    metadata: Any
    created_at: int
    started: float  # time.monotonic() at creation
    lines: list[_Line]
    invalid: list[dict[str, Any]]  # validation errors: the batch fails at its first look
    status: str = "validating"
    reached: int = 0  # lines looked at so far, from the first (answered, or skipped to expire)
    output: list[bytes] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at ...
    output_file_id: str | None = None
    error_file_id: str | None = None

    def json(self) -> dict[str, Any]:
        stamps = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "errors": {"object": "list", "data": self.invalid} if self.status == "failed" else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 86_400,
            **{f"{name}_at": self.times.get(name) for name in stamps},
            "request_counts": {"total": len(self.lines), "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


class ExpireMarkers:
    """Whether a line carries an expire marker still in force, counted per exact line."""

    def __init__(self) -> None:
        self._seen: dict[bytes, int] = {}

    def __call__(self, raw: bytes) -> bool:
        for marker in _BATCH_MARKER_RE.finditer(raw):
            if marker[1] == b"expire":
                seen = self._seen[raw] = self._seen.get(raw, 0) + 1
                return marker[2] is None or seen <= int(marker[2])
        return False


def _ids(prefix: str) -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter):08x}"


class OpenAIBatches:
    """The files and batches routes; `reply` answers one line's body as the chat endpoint would."""

    def __init__(
        self, batch_s: float, reply: Callable[[bytes], Outcome], error: ErrorResponse, stats: BatchStats
    ) -> None:
        self._batch_s = batch_s
        self._reply = reply
        self._error = error
        self._stats = stats
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._expires = ExpireMarkers()
        self._file_id, self._batch_id, self._line_id = _ids("file-sim"), _ids("batch_sim"), _ids("")

    def handle(self, request: Request) -> Response:
        self._stats.batch_requests += 1
        parts = request.path.strip("/").split("/")  # v1, files|batches, id?, content|cancel?
        kind, rest = parts[1], parts[2:]
        key = (request.method, kind, len(rest), rest[1] if len(rest) == 2 else None)
        routes: dict[tuple[str, str, int, str | None], Callable[..., Response]] = {
            ("POST", "files", 0, None): self._upload,
            ("GET", "files", 0, None): self._file_list,
            ("GET", "files", 1, None): self._file,
            ("GET", "files", 2, "content"): self._content,
            ("DELETE", "files", 1, None): self._delete,
            ("POST", "batches", 0, None): self._create,
            ("GET", "batches", 0, None): self._list,
            ("GET", "batches", 1, None): self._batch,
            ("POST", "batches", 2, "cancel"): self._cancel,
        }
        route = routes.get(key)
        if route is None:
            return self._error(404, f"Unknown request URL: {request.method} {request.path}.")
        return route(request, *rest[:1])

    def _json(self, value: dict[str, Any]) -> Response:
        return Response(200, orjson.dumps(value))

    def _upload(self, request: Request) -> Response:
        fields = _multipart(request)
        if fields is None or "file" not in fields:
            return self._error(400, "Expected a multipart/form-data body with a `file` part.", param="file")
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose != "batch":
            return self._error(
                400, f"'{purpose}' is not a purpose this simulator takes; use batch.", param="purpose"
            )
        filename, content = fields["file"]
        file = _File(self._file_id(), filename or "upload.jsonl", purpose, content, int(time.time()))
        self._files[file.id] = file
        self._stats.uploads += 1
        return self._json(file.json())

    def _file_list(self, request: Request) -> Response:
        purpose = dict(urllib.parse.parse_qsl(request.query)).get("purpose")
        data = [f.json() for f in reversed(self._files.values()) if purpose in (None, f.purpose)]
        return self._json({"object": "list", "data": data, "has_more": False})

    def _no_file(self, file_id: str) -> Response:
        return self._error(404, f"No such File object: {file_id}", param="id")

    def _file(self, request: Request, file_id: str) -> Response:
        file = self._files.get(file_id)
        return self._json(file.json()) if file else self._no_file(file_id)

    def _content(self, request: Request, file_id: str) -> Response:
        file = self._files.get(file_id)
        if file is None:
            return self._no_file(file_id)
        return Response(200, file.content, content_type="application/jsonl")

    def _delete(self, request: Request, file_id: str) -> Response:
        if self._files.pop(file_id, None) is None:
            return self._no_file(file_id)
        return self._json({"id": file_id, "object": "file", "deleted": True})

    def _create(self, request: Request) -> Response:
        try:
            data = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return self._error(400, "We could not parse the JSON body of your request.")
        if not isinstance(data, dict):
            return self._error(400, "The request body must be a JSON object.")
        file = self._files.get(str(data.get("input_file_id")))
        if file is None or file.purpose != "batch":
            return self._error(
                400, f"No batch input file {data.get('input_file_id')!r}.", param="input_file_id"
            )
        if data.get("endpoint") != ENDPOINT:
            return self._error(400, f"endpoint must be {ENDPOINT}.", param="endpoint")
        if data.get("completion_window") != "24h":
            return self._error(400, "completion_window must be 24h.", param="completion_window")
        lines, invalid = self._read_lines(file.content)
        now = int(time.time())
        batch = _Batch(
            self._batch_id(), file.id, "24h", data.get("metadata"), now, time.monotonic(), lines, invalid
        )
        self._batches[batch.id] = batch
        return self._json(batch.json())

    def _read_lines(self, content: bytes) -> tuple[list[_Line], list[dict[str, Any]]]:
        """The file's lines, and what makes it invalid (each problem with its line number)."""
        invalid: list[dict[str, Any]] = []

        def problem(code: str, message: str, line: int | None = None) -> None:
            invalid.append({"code": code, "message": message, "param": None, "line": line})

        if len(content) > MAX_BYTES:
            problem("file_too_large", f"The file is larger than {MAX_BYTES} bytes.")
        lines: list[_Line] = []
        seen: set[str] = set()
        models: set[str] = set()
        for number, raw in enumerate(content.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:
                problem("invalid_json", "This line is not parseable as valid JSON.", number)
                continue
            body = item.get("body") if isinstance(item, dict) else None
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or custom_id in seen:
                problem("invalid_custom_id", "custom_id must be a string, unique in the file.", number)
            elif item.get("method") != "POST" or item.get("url") != ENDPOINT:
                problem("invalid_url", f"Each line must be a POST to {ENDPOINT}.", number)
            elif not isinstance(body, dict):
                problem("invalid_body", "body must be a JSON object.", number)
            else:
                seen.add(custom_id)
                models.add(str(body.get("model")))
                lines.append(_Line(custom_id, orjson.dumps(body), self._expires(raw)))
                if b"[[batch:invalid]]" in raw:
                    problem("invalid_request", "Simulated validation failure ([[batch:invalid]]).", number)
        if len(models) > 1:
            problem("mismatched_model", f"A batch takes one model per file, not {len(models)}.")
        if len(lines) > MAX_LINES:
            problem("too_many_lines", f"A batch takes at most {MAX_LINES} lines, not {len(lines)}.")
        if not lines and not invalid:
            problem("empty_file", "The file holds no lines.")
        return lines, invalid

    def _list(self, request: Request) -> Response:
        for batch in self._batches.values():
            self._advance(batch)
        data = [b.json() for b in reversed(self._batches.values())]
        return self._json({"object": "list", "data": data, "has_more": False})

    def _found(self, batch_id: str) -> _Batch | Response:
        batch = self._batches.get(batch_id)
        if batch is None:
            return self._error(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        self._advance(batch)
        return batch

    def _batch(self, request: Request, batch_id: str) -> Response:
        batch = self._found(batch_id)
        return batch if isinstance(batch, Response) else self._json(batch.json())

    def _cancel(self, request: Request, batch_id: str) -> Response:
        batch = self._found(batch_id)
        if isinstance(batch, Response):
            return batch
        if batch.status in TERMINAL or batch.status == "cancelling":
            return self._error(
                409, f"Cannot cancel a batch with status {batch.status}.", code="invalid_state"
            )
        batch.status = "cancelling"
        batch.times["cancelling"] = int(time.time())
        return self._json(batch.json())

    def _advance(self, batch: _Batch) -> None:
        """Bring a batch to where its time says, answering the lines that are due."""
        if batch.status in TERMINAL:
            return
        if batch.invalid:
            batch.status = "failed"
            batch.times["failed"] = int(time.time())
            return
        if batch.status == "cancelling":
            self._end(batch, "cancelled")
            return
        elapsed = time.monotonic() - batch.started
        total = len(batch.lines)
        due = total if elapsed >= self._batch_s else int(total * elapsed / self._batch_s)
        for line in batch.lines[batch.reached : due]:
            if not line.expire:
                self._answer(batch, line)
        batch.reached = max(batch.reached, due)
        if batch.status == "validating":
            batch.status = "in_progress"
            batch.times["in_progress"] = int(time.time())
        if due < total:
            return
        if batch.status != "finalizing":
            batch.status = "finalizing"
            batch.times["finalizing"] = int(time.time())
            return
        expired = [line for line in batch.lines if line.expire]
        for line in expired:
            message = "This request could not be executed before the completion window expired."
            error = {"code": "batch_expired", "message": message}
            batch.errors.append(self._result_line(line, None, error))
            batch.failed += 1
        self._end(batch, "expired" if expired else "completed")

    def _answer(self, batch: _Batch, line: _Line) -> None:
        self._stats.batch_lines += 1
        outcome = self._reply(line.body)
        if outcome is None:  # [[fail:reset]]: the line got no answer
            error = {"code": "server_error", "message": "The request was dropped before it was answered."}
            batch.errors.append(self._result_line(line, None, error))
            batch.failed += 1
            return
        try:
            body: Any = orjson.loads(outcome.body)
        except orjson.JSONDecodeError:  # [[fail:badjson]]: kept as the text it is
            body = outcome.body.decode("utf-8", "replace")
        response = {"status_code": outcome.status, "request_id": f"req_{self._line_id()}", "body": body}
        if outcome.status == 200:
            batch.output.append(self._result_line(line, response, None))
            batch.completed += 1
        else:
            batch.errors.append(self._result_line(line, response, None))
            batch.failed += 1

    def _result_line(
        self, line: _Line, response: dict[str, Any] | None, error: dict[str, Any] | None
    ) -> bytes:
        entry = {
            "id": f"batch_req_{self._line_id()}",
            "custom_id": line.custom_id,
            "response": response,
            "error": error,
        }
        return orjson.dumps(entry)

    def _end(self, batch: _Batch, status: str) -> None:
        """The batch's end: its output and error files (each only if it holds a line)."""
        for lines, attribute, name in (
            (batch.output, "output_file_id", "output"),
            (batch.errors, "error_file_id", "error"),
        ):
            if lines:
                file = _File(
                    self._file_id(),
                    f"{batch.id}_{name}.jsonl",
                    "batch_output",
                    b"\n".join(lines) + b"\n",
                    int(time.time()),
                )
                self._files[file.id] = file
                setattr(batch, attribute, file.id)
        batch.status = status
        batch.times[status] = int(time.time())


def _multipart(request: Request) -> dict[str, tuple[str | None, bytes]] | None:
    """A multipart/form-data body's parts by name: (filename, content); None if it is not one."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return None
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.body)
    if not message.is_multipart():
        return None
    parts: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            parts[name] = (part.get_filename(), payload)
    return parts
