"""The endpoint's model list (`GET /models`): listed by `batchrun models`, and fetched before a job
sends anything. It is the start check: a misspelt model, a refused key or an endpoint that cannot
be reached fails in seconds instead of on every row."""

from __future__ import annotations

import asyncio
import difflib

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from batchrun.client import ChatClient
from batchrun.errors import (
    BatchrunError,
    EndpointDown,
    EndpointUnavailable,
    JobAborted,
    JobError,
    PermanentError,
    Remedy,
    RequestFailed,
    RetryableError,
)
from batchrun.job import EndpointSpec, JobSpec, RetrySpec, key_line
from batchrun.retry import WaitRetryAfter

LIST_TIMEOUT_S = 30.0
LIST_ATTEMPTS = 3  # a few: the whole job waits on this one request
SKIP = Remedy(
    "check_model",
    False,
    "to skip this check (endpoint.check_model: false in the job), as for a gateway that serves "
    "models it does not list",
)


def list_models(base_url: str, api_key: str, endpoint: EndpointSpec, retry: RetrySpec) -> list[str] | None:
    """The model ids the key may use; None when the endpoint offers no list (404).

    Raises EndpointUnavailable (exit 4) when nothing answers, BatchrunError (exit 2) when the host
    name or its certificate is wrong, JobAborted when the list is refused with 400-403 (a chat
    request would be refused alike); 408, 409, 429 and 5xx are tried again, then raised.
    """

    async def fetch() -> list[str] | None:
        timeout_s = min(endpoint.timeout_s, LIST_TIMEOUT_S)
        async with ChatClient(
            base_url, api_key, timeout_s, 1, max_response_mb=endpoint.max_response_mb
        ) as client:
            retrying = AsyncRetrying(
                retry=retry_if_exception(_worth_another_attempt),
                stop=stop_after_attempt(LIST_ATTEMPTS),
                wait=WaitRetryAfter.of(retry),
                reraise=True,
            )
            return await retrying(client.models)

    try:
        return asyncio.run(fetch())
    except EndpointDown as exc:
        if exc.config_problem:
            raise BatchrunError(f"cannot reach {base_url}: {exc.what_happened}") from None
        raise EndpointUnavailable(f"cannot reach {base_url}: {exc.what_happened}", base_url) from None
    except PermanentError as exc:
        if exc.status == 400:  # LiteLLM without its database refuses a bad key so: "No connected db."
            raise JobAborted(
                f"{base_url} refused to list its models ({exc.message}); check the key and endpoint.base_url"
            ) from None
        raise


def _worth_another_attempt(exc: BaseException) -> bool:
    """408, 409, 429 and 5xx (gateways' 502-504 too); not a connection that failed, which is
    reported at once so that an unreachable endpoint is known within seconds."""
    if isinstance(exc, EndpointDown):
        return exc.status is not None
    return isinstance(exc, RetryableError)


def check_model(spec: JobSpec, base_url: str, api_key: str) -> str | None:
    """Raise if the endpoint cannot be reached, refuses the key, or lists models without the job's.

    Returns a note when the name could not be checked (no list, or one that kept failing).
    """
    if not spec.endpoint.check_model:
        return None
    try:
        offered = list_models(base_url, api_key, spec.endpoint, spec.retry)
    except RequestFailed as exc:
        return f"note: could not list the endpoint's models ({exc}); model name not checked"
    if not offered:
        return "note: the endpoint lists no models; model name not checked"
    if spec.model in offered:
        return None
    close = difflib.get_close_matches(spec.model, offered, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"it offers: {', '.join(sorted(offered)[:20])}"
    line = key_line(spec.job_path, ("model",))
    error = JobError(f"model '{spec.model}' not offered by {base_url} ({hint})", spec.job_path, line)
    error.remedy = SKIP
    raise error
