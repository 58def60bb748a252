"""The endpoint's model list (`GET /models`): listed by `batchrun models`, and checked before a
job sends anything, so a misspelt model fails in a second instead of on every row."""

from __future__ import annotations

import asyncio
import difflib

from batchrun.client import ChatClient
from batchrun.errors import JobError, RequestFailed
from batchrun.job import JobSpec, key_line

LIST_TIMEOUT_S = 30.0


def list_models(base_url: str, api_key: str, timeout_s: float) -> list[str] | None:
    """The model ids the key may use; None when the endpoint offers no list."""

    async def fetch() -> list[str] | None:
        async with ChatClient(base_url, api_key, min(timeout_s, LIST_TIMEOUT_S), 1) as client:
            return await client.models()

    return asyncio.run(fetch())


def check_model(spec: JobSpec, base_url: str, api_key: str) -> str | None:
    """Raise JobError if the endpoint lists its models and the job's is not one of them.

    Returns a note when the check could not be made (no list, or it could not be fetched);
    a rejected key (JobAborted) is raised as it would be by the first request.
    """
    try:
        offered = list_models(base_url, api_key, spec.endpoint.timeout_s)
    except RequestFailed as exc:
        return f"note: could not list the endpoint's models ({exc}); model name not checked"
    if not offered:
        return "note: the endpoint lists no models; model name not checked"
    if spec.model in offered:
        return None
    close = difflib.get_close_matches(spec.model, offered, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"it offers: {', '.join(sorted(offered)[:20])}"
    line = key_line(spec.job_path, ("model",))
    raise JobError(f"model '{spec.model}' not offered by {base_url}; {hint}", spec.job_path, line)
