"""OpenAI's Batch API over HTTP: upload a JSONL file (`POST /files`, purpose batch), make a batch
of it (`POST /batches`), look at it (`GET /batches/{id}`), cancel it, download its output and error
files (`GET /files/{id}/content`) and delete the files. Every answer is read through answers.py;
transport failures and retryable statuses are tried again by the job's retry policy.

A download goes to a temporary file before its lines are read, so that a retry never yields a
line twice and memory holds one line at a time (a line is at most endpoint.max_response_mb).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson

from batchrun.answers import (
    BatchState,
    Redactor,
    classify_status,
    read_batch,
    read_batch_list,
    read_file_id,
)
from batchrun.client import TransportFailure, transport_error
from batchrun.errors import BatchrunError, EndpointDown, RequestFailed
from batchrun.job import RetrySpec
from batchrun.retry import Sleep, row_policy

CHUNK = 1 << 20  # bytes read or sent at a time
COMPLETION_WINDOW = "24h"
LINE_URL = "/v1/chat/completions"  # each line's url: OpenAI's path, whatever the base URL


class NoBatchApi(BatchrunError):
    """The endpoint has no Batch API (`GET /batches` answered 404)."""


class OpenAIBatchApi:
    """One endpoint's files and batches; use it as `async with`."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float,
        max_line_bytes: int,
        retry: RetrySpec,
        *,
        http_client: httpx2.AsyncClient | None = None,
        sleep: Sleep = asyncio.sleep,
    ):
        self._base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._max_line_bytes = max_line_bytes
        self._redact = Redactor(api_key)
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._retry = retry
        self._sleep = sleep
        self._given = http_client
        self._client: httpx2.AsyncClient | None = None

    async def __aenter__(self) -> OpenAIBatchApi:
        if self._given is None:
            self._client = httpx2.AsyncClient(timeout=self._timeout_s, trust_env=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def _http(self) -> httpx2.AsyncClient:
        client = self._given or self._client
        assert client is not None, "use the batch API as `async with`"
        return client

    async def check(self) -> None:
        """Raise NoBatchApi if the endpoint has no Batch API; send nothing else."""
        response = await self._call("GET", "/batches?limit=1", passing=(404,))
        if response.status_code == 404:
            raise NoBatchApi(
                f"{self._base_url} has no Batch API (GET /batches answered 404); nothing was sent: run "
                "the job without batch mode"
            )

    async def upload(self, path: Path, filename: str) -> str:
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
        response = await self._call("POST", "/files", content=body, headers=headers)
        return read_file_id(response.content, self._redact)

    async def create(self, file_id: str, metadata: dict[str, str]) -> BatchState:
        request = {
            "input_file_id": file_id,
            "endpoint": LINE_URL,
            "completion_window": COMPLETION_WINDOW,
            "metadata": metadata,
        }
        response = await self._call("POST", "/batches", json=request)
        return read_batch(response.content, self._redact)

    async def find(self, file_id: str) -> BatchState | None:
        """The batch made of `file_id`, among the newest 100, if there is one."""
        response = await self._call("GET", "/batches?limit=100")
        found = [b for b in read_batch_list(response.content, self._redact) if b.input_file_id == file_id]
        return found[0] if found else None

    async def get(self, batch_id: str) -> BatchState | None:
        """The batch as it is now; None if the provider no longer knows it."""
        response = await self._call("GET", f"/batches/{batch_id}", passing=(404,))
        return None if response.status_code == 404 else read_batch(response.content, self._redact)

    async def cancel(self, batch_id: str) -> BatchState | None:
        """Ask to cancel; a batch that already ended (or is cancelling) is left as it is. None if
        the provider no longer knows it."""
        try:
            response = await self._call("POST", f"/batches/{batch_id}/cancel", passing=(404,))
        except RequestFailed as exc:
            if exc.status not in (400, 409):
                raise
            return await self.get(batch_id)
        return None if response.status_code == 404 else read_batch(response.content, self._redact)

    @contextlib.asynccontextmanager
    async def lines(self, file_id: str) -> AsyncIterator[Iterator[bytes | None]]:
        """A results file's lines, read from a local copy; None for a line too long to read."""
        with tempfile.TemporaryFile() as copy:
            async for attempt in row_policy(self._retry, sleep=self._sleep):
                with attempt:
                    copy.seek(0)
                    copy.truncate()
                    await self._download(f"/files/{file_id}/content", copy)
            copy.seek(0)
            yield _lines(copy, self._max_line_bytes)

    async def _download(self, path: str, into: Any) -> None:
        with self._errors():
            request = self._http.build_request("GET", self._base_url + path, headers=self._headers)
            response = await self._http.send(request, stream=True)
            try:
                if response.status_code != 200:
                    await response.aread()
                    raise classify_status(
                        response.status_code, response.headers, response.content, self._redact
                    )
                async for chunk in response.aiter_raw(CHUNK):
                    await asyncio.to_thread(into.write, chunk)
            finally:
                await response.aclose()

    async def delete(self, file_id: str) -> None:
        """Delete a file, if it can be: a file left behind costs storage, not answers."""
        with contextlib.suppress(BatchrunError):
            await self._once("DELETE", f"/files/{file_id}")

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        """One call, tried again on transport failures and retryable statuses."""
        async for attempt in row_policy(self._retry, sleep=self._sleep):
            with attempt:
                return await self._once(method, path, **kwargs)
        raise AssertionError("unreachable: the retry policy re-raises the last failure")

    async def _once(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        content: Any = None,
        headers: dict[str, str] | None = None,
        passing: tuple[int, ...] = (),
    ) -> httpx2.Response:
        """One request; an answer not 2xx (nor in `passing`) raises as answers.classify_status says."""
        headers = {**self._headers, **(headers or {})}
        if json is not None:
            content, headers["Content-Type"] = orjson.dumps(json), "application/json"
        with self._errors():
            sent = content() if callable(content) else content
            request = self._http.build_request(method, self._base_url + path, content=sent, headers=headers)
            response = await self._http.send(request)
        if not 200 <= response.status_code < 300 and response.status_code not in passing:
            raise classify_status(response.status_code, response.headers, response.content, self._redact)
        return response

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (TimeoutError, httpx2.HTTPError) as exc:
            failure: TransportFailure = exc
            down = transport_error(failure, self._timeout_s, self._timeout_s)
            raise EndpointDown(down.kind, self._redact(down.message), down.status) from None


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
