"""xAI's Batch API: make a named batch (`POST /batches {name}`), add its requests in parts of at
most batches.add_mb (`POST /batches/{id}/requests {batch_requests}`), look at it
(`GET /batches/{id}`: counts of requests, pending, succeeded, failed, cancelled), read its
results page by page (`GET /batches/{id}/results`, `limit`, `pagination_token`) and cancel it
(`POST /batches/{id}:cancel`).

Each add is recorded before and after it is made. An add whose answer never came (a kill, a
dropped connection) is settled by the batch's count of requests: if the batch holds it, its rows
stay; if not, they go back to the rows to do. Parts never added go back too, to be sent in another
batch: so each row is in one batch, once.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from batchrun.answers import (
    BatchLine,
    BatchState,
    Bounds,
    read_xai_batch,
    read_xai_batch_list,
    read_xai_results,
)
from batchrun.batch.http import BatchHttp, Unsure
from batchrun.errors import RequestFailed
from batchrun.ledger import Ledger, Submission

PAGE = 100  # results (and batches) asked for a page
LIST_PAGES = 10  # pages of the batch list looked through for a batch a killed run made
_JSON = {"Content-Type": "application/json"}


class XaiBatchApi:
    """Batches made, then added to in parts (batch/protocol.py's BatchProtocol)."""

    name = "xai"
    first_state = "creating"

    def __init__(
        self, http: BatchHttp, bounds: Bounds, part_bytes: int, *, clock: Callable[[], float] = time.time
    ):
        self._http = http
        self._bounds = bounds
        self.part_bytes: int | None = part_bytes
        self._clock = clock

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        request = {"batch_request_id": custom_id, "batch_request": {"chat_get_completion": body}}
        return orjson.dumps(request) + b"\n"

    async def submit(
        self, ledger: Ledger, submission: int, name: str, path: Path, parts: Sequence[int]
    ) -> BatchState | None:
        """Make the batch and add each part, every step recorded before and after. An add not heard
        back ends the adding: the batch keeps what it holds (None if nothing). A refusal
        (RequestFailed) is raised after the batch is settled the same way."""
        try:
            response = await self._http.call("POST", "/batches", json={"name": name})
        except RequestFailed as exc:
            ledger.abandon(submission, "batch_rejected", f"the provider refused the batch: {exc}")
            raise
        state = self._state(response.content)
        ledger.created(submission, state.id)
        with path.open("rb") as file:
            for added, count in enumerate(parts):
                lines = b",".join(file.readline().rstrip(b"\n") for _ in range(count))
                ledger.adding(submission)
                try:
                    await self._http.call_once_sent(
                        "POST",
                        f"/batches/{state.id}/requests",
                        content=b'{"batch_requests":[' + lines + b"]}",
                        headers=_JSON,
                    )
                except Unsure:
                    return await self._settle(ledger, submission, state.id, added, unsure=True)
                except RequestFailed:
                    await self._settle(ledger, submission, state.id, added, unsure=False)
                    raise
                ledger.added(submission, added + 1)
        ledger.submitted(submission, state.id, state.status)
        return state

    async def resume(self, ledger: Ledger, sub: Submission, cancelling: bool) -> None:
        """Take up a submission a run left before it was submitted: a batch whose making was not
        heard back is cancelled if it was made (it holds nothing) and its rows go back; a batch
        whose adds stopped keeps the parts it holds, and the others go back."""
        if sub.state == "creating":
            ledger.abandon(
                sub.submission, "batch_not_run", "the run stopped while its batch was made; nothing was added"
            )
            if sub.name is not None and (found := await self._named(sub.name)) is not None:
                await self.cancel(found)
        elif sub.state in ("created", "adding") and sub.batch_id is not None:
            await self._settle(
                ledger, sub.submission, sub.batch_id, sub.added or 0, unsure=sub.state == "adding"
            )

    async def _settle(
        self, ledger: Ledger, submission: int, batch_id: str, added: int, *, unsure: bool
    ) -> BatchState | None:
        """A batch whose adds stopped after `added` parts (and one more that may have been added):
        the parts it holds stay, the rest go back to the rows to do; with none, it is cancelled
        and the submission abandoned. The batch as it is; None if nothing is in it."""
        state = await self.get(batch_id)
        if state is not None and unsure:
            parts = ledger.parts(submission)
            added += (state.total or 0) >= sum(parts[: added + 1])
        ledger.drop_parts(submission, added)
        if state is None or not added:
            ledger.abandon(submission, "batch_not_run", "no request was added to the batch")
            if state is not None:
                await self.cancel(batch_id)
            return None
        ledger.submitted(submission, batch_id, state.status)
        return state

    async def _named(self, name: str) -> str | None:
        """The id of the batch of this name, in the first pages of the batch list, if there is one."""
        token: str | None = None
        for _ in range(LIST_PAGES):
            query = f"/batches?limit={PAGE}" + (
                f"&pagination_token={urllib.parse.quote(token)}" if token else ""
            )
            response = await self._http.call("GET", query)
            batches, token = read_xai_batch_list(response.content, self._http.redact, self._clock())
            found = [b.id for b in batches if b.name == name]
            if found or token is None:
                return found[0] if found else None
        return None

    def _state(self, raw: bytes) -> BatchState:
        return read_xai_batch(raw, self._http.redact, self._clock())

    async def get(self, batch_id: str) -> BatchState | None:
        """The batch as it is now; None if the provider no longer knows it."""
        response = await self._http.call("GET", f"/batches/{batch_id}", passing=(404,))
        return None if response.status_code == 404 else self._state(response.content)

    async def cancel(self, batch_id: str) -> BatchState | None:
        """Ask to cancel; a batch that already ended is left as it is. None if the provider no
        longer knows it."""
        try:
            response = await self._http.call("POST", f"/batches/{batch_id}:cancel", passing=(404,))
        except RequestFailed as exc:
            if exc.status not in (400, 409):
                raise
            return await self.get(batch_id)
        return None if response.status_code == 404 else self._state(response.content)

    async def results(self, state: BatchState) -> AsyncIterator[BatchLine | None]:
        """An ended batch's results, page by page; None for one that names no request."""
        token: str | None = None
        seen: set[str] = set()
        while True:
            query = f"/batches/{state.id}/results?limit={PAGE}"
            if token:
                query += f"&pagination_token={urllib.parse.quote(token)}"
            response = await self._http.call("GET", query)
            lines, token = read_xai_results(response.content, self._bounds)
            for line in lines:
                yield line
            if token is None or token in seen:  # a token seen before would go round for ever
                return
            seen.add(token)

    async def finish(self, state: BatchState) -> None:
        """Nothing is left at the provider but the batch, which xAI keeps."""
