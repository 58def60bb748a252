"""Running a job's rows through the provider's Batch API (`batchrun run JOB --batch`, `mode: batch`,
`batch=True`): every row still to do goes into JSONL files submitted as batches, which are polled
and collected into the same checkpoint as rows sent online.

    protocol.py  the one interface of a Batch API the executor drives, and the choice of one
    http.py      the HTTP under both, and the probe of which one an endpoint speaks
    openai.py    OpenAI's protocol: files uploaded and made batches
    xai.py       xAI's protocol: named batches, added to in parts
    executor.py  the executor: submit, wait with progress, collect; reattach; cancel

The checkpoint's record of each submission and its rows (before and after every remote step, so
that a rerun reattaches to live batches) is batchrun/ledger.py. Nothing here but this module is
imported unless batch mode is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from batchrun.executors import Execution, Executor


@dataclass(frozen=True)
class BatchOptions:
    """How to run through the Batch API (`--batch`, `--no-wait`; `batchrun cancel`); the batch
    executor's kind (executors.ExecutorKind)."""

    wait: bool = True  # False: submit and return; a later run collects
    cancel: bool = False  # cancel the live batches and collect what they answered; submit nothing
    name: ClassVar[str] = "batch"
    needs_counts: ClassVar[bool] = False

    def check(self, http_client: object) -> None:
        """Anything goes: the batch API is called from this process."""

    def executor(self, execution: Execution) -> Executor:
        from batchrun.batch.executor import BatchExecutor

        return BatchExecutor(execution, self)
