"""The one exception tree of batchrun.

    BatchrunError                 anything the CLI turns into one line and an exit code
    ├── JobError                  the job file is wrong (path, key, line)
    ├── InputError                the input table is missing, unreadable or does not fit the job
    ├── CheckpointError           the checkpoint cannot be used or written
    ├── JobChanged                a job-level change would send finished rows again (needs yes=True)
    ├── JobAborted                an answer that dooms every row (bad key, no credit, unknown model)
    ├── EndpointUnavailable       the endpoint cannot be reached, or stayed down too long (exit 4)
    └── RequestFailed             one request failed; the runner records it on the row
        ├── RetryableError        worth another attempt (429, 408, 409, 5xx, timeouts, resets, bad bodies)
        │   └── EndpointDown      no answer at all, or a gateway's 502/503/504: the circuit breaker's evidence
        ├── PermanentError        the same request would fail again (400, 422, ...)
        ├── InvalidOutput         answered, but without the job's output.fields (asked again, billed)
        └── RowInputError         the row's own input cannot be sent (an image missing, too large...)

Retry decisions look at these types, never at message text. Messages name no command-line flag:
an error that a setting of the run would get past carries it as a `Remedy`, which the CLI names
as a flag (`--yes`) and Python as a keyword (`yes=True`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchrun.limits import RateLimitHeaders


class ExitCode(enum.IntEnum):
    """How a command ended, as its exit status: the one list the CLI exits with and documents."""

    OK = 0  # every row ok
    ROWS_FAILED = 1  # finished, some rows failed (or are still pending)
    USAGE = 2  # bad job, input or usage, or a job-wide error such as a rejected key
    BUDGET = 3  # stopped by the budget
    UNAVAILABLE = 4  # the endpoint is unavailable; nothing was lost
    INTERRUPTED = 130  # interrupted; the checkpoint is kept


@dataclass(frozen=True)
class Remedy:
    """A setting of the run that gets past an error: `option`, as a keyword of `Job` (and, spelt
    as a flag, of the CLI), set to `value`, `effect` saying what that does ("to start over")."""

    option: str
    value: object
    effect: str

    def keyword(self) -> str:
        """As Python passes it: `yes=True`."""
        return f"{self.option}={self.value!r}"


class BatchrunError(Exception):
    """Root of every error batchrun raises on purpose; `remedy`, when a setting gets past it."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, *, remedy: Remedy | None = None):
        super().__init__(message)
        self.remedy = remedy

    def __str__(self) -> str:
        return self.describe(Remedy.keyword)

    def describe(self, name: Callable[[Remedy], str]) -> str:
        """The error in one line, its remedy named by `name` (Python's keyword, the CLI's flag)."""
        text = self.what()
        if self.remedy is None:
            return text
        return f"{text}; pass {name(self.remedy)} {self.remedy.effect}"

    def what(self) -> str:
        """What went wrong, without the remedy."""
        return str(self.args[0]) if self.args else ""


class JobError(BatchrunError):
    """The job (a file, or keys given in Python) is malformed or asks for something impossible.

    Where it is wrong is kept apart from what is wrong: `key` (dotted, e.g. "params.temprature"),
    `path` (the job file) and `line`; str() puts them together as `path:line: message`.
    """

    def __init__(
        self,
        message: str,
        path: Path | str | None = None,
        line: int | None = None,
        *,
        key: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.key = key

    def what(self) -> str:
        if self.path is None:
            return self.message
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


class InputError(BatchrunError):
    """The input table is missing, unreadable or does not fit the job."""


class CheckpointError(BatchrunError):
    """The checkpoint belongs to another job version or cannot be written."""


class JobChanged(BatchrunError):
    """The prompt, model, params or endpoint changed since the last run, so rows it finished would
    be sent again: `rows` of them, expected to cost `cost_usd` (None without a price); `what()`
    says so in words, without the ways on."""

    def __init__(self, what: str, rows: int, cost_usd: float | None):
        super().__init__(
            what, remedy=Remedy("yes", True, "to send them, or restore the job as it was to send none")
        )
        self.rows = rows
        self.cost_usd = cost_usd


class JobAborted(BatchrunError):
    """The endpoint answered in a way that would fail every remaining row."""


class EndpointUnavailable(BatchrunError):
    """The endpoint cannot be reached (or stayed down past retry.max_outage_s); nothing was lost.

    Exit code 4 tells a wrapper "rerun later", apart from 2's "fix the job".
    """

    exit_code = ExitCode.UNAVAILABLE

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url


class RequestFailed(BatchrunError):
    """One chat request failed; `kind` is a short label used to group failures."""

    def __init__(
        self,
        kind: str,
        message: str,
        status: int | None = None,
        retry_after_s: float | None = None,
        budget: RateLimitHeaders | None = None,
    ):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message  # without the kind, for lines that name the kind apart
        self.status = status
        self.retry_after_s = retry_after_s
        self.budget = budget  # the x-ratelimit-* headers of the answer, when sent


class RetryableError(RequestFailed):
    """A failure that another attempt may cure."""


class EndpointDown(RetryableError):
    """No answer (refused, reset, timed out, DNS, TLS) or a gateway's 502/503/504.

    `config_problem` marks failures that waiting will not cure (a name that does not resolve,
    a certificate that does not verify): before the first answer they are a job error (exit 2).
    """

    @property
    def config_problem(self) -> bool:
        return self.kind in ("dns", "tls")

    @property
    def what_happened(self) -> str:
        """A phrase for `cannot reach URL: ...`: `connection refused`, `no answer within 10 s`."""
        return f"connection {self.message}" if self.kind == "connection" else self.message


class PermanentError(RequestFailed):
    """A failure that the same request would meet again."""


class InvalidOutput(RequestFailed):
    """The answer does not hold the declared output.fields; a new answer may."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_output", message)


class RowInputError(RequestFailed):
    """A row's own input cannot make its request (an image missing, unreadable, not an image, too
    large): the row fails unsent, and the job goes on."""

    def __init__(self, message: str) -> None:
        super().__init__("input_error", message)
