"""The HTTP under both Batch API protocols: one client for the endpoint, each call tried again on
transport failures and retryable statuses by the job's retry policy, and the probe that tells which
protocol the endpoint speaks. Every answer is read through answers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import httpx2
import orjson

from batchrun.answers import Redactor, classify_status, read_batch_api
from batchrun.client import TransportFailure, transport_error
from batchrun.errors import BatchrunError, EndpointDown, RetryableError
from batchrun.job import RetrySpec
from batchrun.retry import Sleep, row_policy

CHUNK = 1 << 20  # bytes read or sent at a time
SHAPES = {"openai": "OpenAI's", "xai": "xAI's"}


class NoBatchApi(BatchrunError):
    """The endpoint has no Batch API (`GET /batches` answered 404), or none batchrun speaks."""


class BatchHttp:
    """One endpoint's Batch API calls; use it as `async with`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float,
        retry: RetrySpec,
        *,
        http_client: httpx2.AsyncClient | None = None,
        sleep: Sleep = asyncio.sleep,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.redact = Redactor(api_key)
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.retry = retry
        self.sleep = sleep
        self._given = http_client
        self._client: httpx2.AsyncClient | None = None

    async def __aenter__(self) -> BatchHttp:
        if self._given is None:
            self._client = httpx2.AsyncClient(timeout=self.timeout_s, trust_env=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx2.AsyncClient:
        client = self._given or self._client
        assert client is not None, "use the batch API as `async with`"
        return client

    async def probe(self, expected: str) -> str:
        """The protocol to speak: `expected` (openai, xai), or with `auto` the one whose shape
        `GET /batches` answers in. Sends nothing else; raises NoBatchApi if there is none, or if
        the endpoint answers in the other protocol's shape."""
        response = await self.call("GET", "/batches?limit=1", passing=(404,))
        found = None if response.status_code == 404 else read_batch_api(response.content)
        if response.status_code == 404 or (expected == "auto" and found is None):
            said = (
                "answered 404" if response.status_code == 404 else "answered neither OpenAI's nor xAI's list"
            )
            raise NoBatchApi(
                f"{self.base_url} has no Batch API (GET /batches {said}); nothing was sent: run "
                "the job without batch mode"
            )
        if found is not None and expected not in ("auto", found):
            raise NoBatchApi(
                f"endpoint.batch_api is {expected}, but {self.base_url} answers GET /batches in "
                f"{SHAPES[found]} shape; nothing was sent: set endpoint.batch_api to {found} or auto"
            )
        return found if expected == "auto" and found is not None else expected

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        """One call, tried again on transport failures and retryable statuses."""
        async for attempt in row_policy(self.retry, sleep=self.sleep):
            with attempt:
                return await self.once(method, path, **kwargs)
        raise AssertionError("unreachable: the retry policy re-raises the last failure")

    async def call_once_sent(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        """A call that must not reach the provider twice: tried again only on an answer that says it
        was not taken (a retryable status); a transport failure raises, for the caller to find out."""
        async for attempt in row_policy(self.retry, sleep=self.sleep):
            with attempt:
                try:
                    return await self.once(method, path, **kwargs)
                except RetryableError as exc:
                    if exc.status is None:
                        raise Unsure(str(exc)) from None
                    raise
        raise AssertionError("unreachable: the retry policy re-raises the last failure")

    async def once(
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
        headers = {**self.headers, **(headers or {})}
        if json is not None:
            content, headers["Content-Type"] = orjson.dumps(json), "application/json"
        with self.errors():
            sent = content() if callable(content) else content
            request = self.client.build_request(method, self.base_url + path, content=sent, headers=headers)
            response = await self.client.send(request)
        if not 200 <= response.status_code < 300 and response.status_code not in passing:
            raise classify_status(response.status_code, response.headers, response.content, self.redact)
        return response

    async def forget(self, method: str, path: str) -> None:
        """A call whose failure costs storage, not answers (deleting a file): failures passed over."""
        with contextlib.suppress(BatchrunError):
            await self.once(method, path)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except (TimeoutError, httpx2.HTTPError) as exc:
            failure: TransportFailure = exc
            down = transport_error(failure, self.timeout_s, self.timeout_s)
            raise EndpointDown(down.kind, self.redact(down.message), down.status) from None


class Unsure(BatchrunError):
    """A call that may or may not have reached the provider (no answer came back)."""
