"""OpenAI's Batch API: upload a JSONL file (`POST /files`, purpose batch), make a batch of it
(`POST /batches`), look at it (`GET /batches/{id}`), cancel it, download its output and error
files (`GET /files/{id}/content`) and delete the files.

A download goes to a temporary file before its lines are read, so that a retry never yields a
line twice and memory holds one line at a time (a line is at most endpoint.max_response_mb).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from batchrun.answers import (
    BatchLine,
    BatchState,
    Bounds,
    classify_status,
    read_batch,
    read_batch_line,
    read_batch_list,
    read_file_id,
    read_file_list,
)
from batchrun.batch.http import CHUNK, BatchHttp
from batchrun.errors import RequestFailed
from batchrun.ledger import Ledger, Submission
from batchrun.retry import row_policy

COMPLETION_WINDOW = "24h"
LINE_URL = "/v1/chat/completions"  # each line's url: OpenAI's path, whatever the base URL


class OpenAIBatchApi:
    """Batches of uploaded files (batch/protocol.py's BatchProtocol)."""

    name = "openai"
    first_state = "uploading"
    part_bytes: int | None = None

    def __init__(self, http: BatchHttp, bounds: Bounds, max_line_bytes: int):
        self._http = http
        self._bounds = bounds
        self._max_line_bytes = max_line_bytes

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": LINE_URL, "body": body}) + b"\n"

    async def submit(
        self, ledger: Ledger, submission: int, name: str, path: Path, parts: Sequence[int]
    ) -> BatchState:
        """Upload the file and make a batch of it, each step recorded before and after; a refusal
        (RequestFailed) abandons the submission, and deletes its file."""
        file_id = None
        try:
            file_id = await self._upload(path, f"{name}.jsonl")
            ledger.uploaded(submission, file_id)
            return await self._create(ledger, submission, file_id)
        except RequestFailed as exc:
            ledger.abandon(submission, "batch_rejected", f"the provider refused the batch: {exc}")
            if file_id is not None:
                await self._http.forget("DELETE", f"/files/{file_id}")
            raise

    async def resume(self, ledger: Ledger, sub: Submission, cancelling: bool) -> None:
        """Take up a submission a run left before it was submitted: a file whose upload was not
        heard back is deleted (if it got there) and its rows go back; a file uploaded gets the
        batch the provider made of it, or one made now (unless cancelling)."""
        if sub.state == "uploading" or sub.file_id is None:
            ledger.abandon(
                sub.submission,
                "batch_not_run",
                "the run stopped while its file was uploaded; no batch was made",
            )
            if sub.name is not None and (orphan := await self._file_named(f"{sub.name}.jsonl")):
                await self._http.forget("DELETE", f"/files/{orphan}")
            return
        if sub.batch_id is not None:
            return
        state = await self._find(sub.file_id)
        if state is not None:
            ledger.submitted(sub.submission, state.id, state.status)
        elif cancelling:
            ledger.abandon(sub.submission, "batch_not_run", "cancelled before its batch was made")
            await self._http.forget("DELETE", f"/files/{sub.file_id}")
        else:
            try:
                await self._create(ledger, sub.submission, sub.file_id)
            except RequestFailed as exc:  # the file is gone, or refused
                ledger.abandon(sub.submission, "batch_rejected", f"the provider refused the batch: {exc}")
                await self._http.forget("DELETE", f"/files/{sub.file_id}")

    async def _upload(self, path: Path, filename: str) -> str:
        """Upload a JSONL file of request lines; its file id."""
        boundary = f"batchrun-{secrets.token_hex(12)}"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        async def body() -> AsyncIterator[bytes]:
            yield head
            with path.open("rb") as file:
                while chunk := await asyncio.to_thread(file.read, CHUNK):
                    yield chunk
            yield tail

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + path.stat().st_size + len(tail)),
        }
        response = await self._http.call("POST", "/files", content=body, headers=headers)
        return read_file_id(response.content, self._http.redact)

    async def _create(self, ledger: Ledger, submission: int, file_id: str) -> BatchState:
        request = {
            "input_file_id": file_id,
            "endpoint": LINE_URL,
            "completion_window": COMPLETION_WINDOW,
            "metadata": {"batchrun_submission": str(submission)},
        }
        response = await self._http.call("POST", "/batches", json=request)
        state = read_batch(response.content, self._http.redact)
        ledger.submitted(submission, state.id, state.status)
        return state

    async def _find(self, file_id: str) -> BatchState | None:
        """The batch made of `file_id`, among the newest 100, if there is one."""
        response = await self._http.call("GET", "/batches?limit=100")
        found = [
            b for b in read_batch_list(response.content, self._http.redact) if b.input_file_id == file_id
        ]
        return found[0] if found else None

    async def _file_named(self, filename: str) -> str | None:
        """The id of the batch input file of this name, among the newest 10,000, if there is one."""
        response = await self._http.call("GET", "/files?purpose=batch&limit=10000", passing=(404,))
        if response.status_code == 404:
            return None
        return read_file_list(response.content, self._http.redact).get(filename)

    async def get(self, batch_id: str) -> BatchState | None:
        """The batch as it is now; None if the provider no longer knows it."""
        response = await self._http.call("GET", f"/batches/{batch_id}", passing=(404,))
        return None if response.status_code == 404 else read_batch(response.content, self._http.redact)

    async def cancel(self, batch_id: str) -> BatchState | None:
        """Ask to cancel; a batch that already ended (or is cancelling) is left as it is. None if
        the provider no longer knows it."""
        try:
            response = await self._http.call("POST", f"/batches/{batch_id}/cancel", passing=(404,))
        except RequestFailed as exc:
            if exc.status not in (400, 409):
                raise
            return await self.get(batch_id)
        return None if response.status_code == 404 else read_batch(response.content, self._http.redact)

    async def results(self, state: BatchState) -> AsyncIterator[BatchLine | None]:
        """The lines of an ended batch's output and error files; None for one that cannot be read
        or names no request."""
        for file_id in filter(None, (state.output_file_id, state.error_file_id)):
            async with self._lines(file_id) as lines:
                for raw in lines:
                    try:
                        yield None if raw is None else read_batch_line(raw, self._bounds)
                    except RequestFailed:
                        yield None

    async def finish(self, state: BatchState) -> None:
        """Delete the collected batch's files: a file left behind costs storage, not answers."""
        for file_id in filter(None, (state.input_file_id, state.output_file_id, state.error_file_id)):
            await self._http.forget("DELETE", f"/files/{file_id}")

    @contextlib.asynccontextmanager
    async def _lines(self, file_id: str) -> AsyncIterator[Iterator[bytes | None]]:
        """A results file's lines, read from a local copy; None for a line too long to read."""
        with tempfile.TemporaryFile() as copy:
            async for attempt in row_policy(self._http.retry, sleep=self._http.sleep):
                with attempt:
                    copy.seek(0)
                    copy.truncate()
                    await self._download(f"/files/{file_id}/content", copy)
            copy.seek(0)
            yield _lines(copy, self._max_line_bytes)

    async def _download(self, path: str, into: Any) -> None:
        http = self._http
        with http.errors():
            request = http.client.build_request("GET", http.base_url + path, headers=http.headers)
            response = await http.client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    await response.aread()
                    raise classify_status(
                        response.status_code, response.headers, response.content, http.redact
                    )
                async for chunk in response.aiter_raw(CHUNK):
                    await asyncio.to_thread(into.write, chunk)
            finally:
                await response.aclose()


def _lines(file: Any, max_bytes: int) -> Iterator[bytes | None]:
    """The non-empty lines of a binary file, each at most `max_bytes` (None in place of a longer one)."""
    while True:
        line = file.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while (rest := file.readline(CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        if line.strip():
            yield line
