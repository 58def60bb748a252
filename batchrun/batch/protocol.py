"""The one interface the executor sees of a Batch API, and the choice of one (endpoint.batch_api:
openai, xai, or auto, which asks the endpoint once, sending no row).

Both protocols take the same JSONL lines in a file (each protocol's own line), record every
remote step of a submission in the ledger before and after it, and give an ended batch's results
as answers.BatchLine: the executor neither knows nor cares which one it drives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from batchrun.answers import BatchLine, BatchState, Bounds
from batchrun.batch.http import BatchHttp
from batchrun.batch.openai import OpenAIBatchApi
from batchrun.batch.xai import XaiBatchApi
from batchrun.ledger import Ledger, Submission


class BatchProtocol(Protocol):
    @property
    def name(self) -> str:
        """In the ledger (`batches.api`)."""
        ...

    @property
    def first_state(self) -> str:
        """The state a submission is recorded in before its first remote step."""
        ...

    @property
    def part_bytes(self) -> int | None:
        """The most one call may add to a batch (xAI's); None: the file goes in whole."""
        ...

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        """A request as a line of the batch file, with its newline."""
        ...

    async def submit(
        self, ledger: Ledger, submission: int, name: str, path: Path, parts: Sequence[int]
    ) -> BatchState | None:
        """Send a file of lines (in `parts`, of so many lines each) as a batch named `name`; the
        batch, or None if none holds any of them. Raises RequestFailed if the provider refused it."""
        ...

    async def resume(self, ledger: Ledger, sub: Submission, cancelling: bool) -> None:
        """Bring a live submission a run left before it was submitted to `submitted`, or abandon it."""
        ...

    async def get(self, batch_id: str) -> BatchState | None: ...

    async def cancel(self, batch_id: str) -> BatchState | None: ...

    def results(self, state: BatchState) -> AsyncIterator[BatchLine | None]:
        """An ended batch's answers and failures, one a request; None for one naming no request."""
        ...

    async def finish(self, state: BatchState) -> None:
        """After collection: delete what the batch left at the provider, where that can be done."""
        ...


def batch_protocol(
    name: str, http: BatchHttp, bounds: Bounds, max_line: int, add_bytes: int
) -> BatchProtocol:
    """The protocol `name` (openai, xai) over `http`."""
    if name == "xai":
        return XaiBatchApi(http, bounds, add_bytes)
    return OpenAIBatchApi(http, bounds, max_line)
