"""Any answer a server may send, generated: JSON values of any type at any field of a completion,
a stream chunk, usage or an error body; any SSE framing; any status and header; a model list.

Whatever comes, served by a stub on loopback to the real CLI, the job ends in a known way: no
traceback, exit 0-4 with a one-line reason, an output of one row per input row that builds again
on a rerun, `status`, `cost` and `report` that read its checkpoint, spend that never goes down
nor past the budget by more than the requests in flight reserved, the key nowhere, and no
control character on the terminal.

CI runs a fixed set of examples (derandomized); BATCHRUN_PROPERTY_EXAMPLES=500 runs more.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

import polars as pl
import pytest
from click.testing import Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TEST_KEY, article_rows, invoke, write_job
from tests.stub_server import Reply, Request, completion, serve_stub
from tests.test_hostile_answers import CONTROL, everything_written

ROWS = 6
CONCURRENCY = 3
MAX_TOKENS = 40
BUDGET_USD = 0.002
EXAMPLES = int(os.environ.get("BATCHRUN_PROPERTY_EXAMPLES", "25"))

KEYS = [TEST_KEY, TEST_KEY.lower(), TEST_KEY.upper(), TEST_KEY[:10], f"Bearer {TEST_KEY}"]
ESCAPES = ["\x1b]0;title\x07", "\x1b[2J", "\x00", "\x9b31m", "\r", "line\nbreak"]
texts = st.text(max_size=12) | st.sampled_from([*KEYS, *ESCAPES, "stop", "text", "grok-4.3"])
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.sampled_from([10**23, -1, 2**31, 2**63, 10**30])
    | st.floats()
    | texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)

COMPLETION_PATHS = [
    ("id",),
    ("model",),
    ("choices",),
    ("choices", 0),
    ("choices", 0, "message"),
    ("choices", 0, "message", "content"),
    ("choices", 0, "message", "tool_calls"),
    ("choices", 0, "finish_reason"),
    ("usage",),
    ("usage", "prompt_tokens"),
    ("usage", "completion_tokens"),
    ("usage", "total_tokens"),
    ("usage", "prompt_tokens_details"),
    ("usage", "prompt_tokens_details", "cached_tokens"),
    ("usage", "completion_tokens_details", "reasoning_tokens"),
    ("error",),
]
CHUNK_PATHS = [
    ("id",),
    ("model",),
    ("choices",),
    ("choices", 0, "delta"),
    ("choices", 0, "delta", "content"),
    ("choices", 0, "delta", "tool_calls"),
    ("choices", 0, "finish_reason"),
    ("usage",),
    ("usage", "prompt_tokens"),
    ("usage", "prompt_tokens_details"),
    ("error",),
]
HEADERS = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-echo",
]
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12) | st.sampled_from(
    [*KEYS, "1e400", "-1", "0.001", "nan", "Wed, 21 Oct 2015 07:28:00 GMT", "99999", "1h2m"]
)
headers = st.dictionaries(st.sampled_from(HEADERS), header_values, max_size=3)


def mutated(doc: Any, changes: list[tuple[tuple[Any, ...], Any]]) -> Any:
    """`doc` with each (path, value) set where the path still leads somewhere."""
    for path, value in changes:
        node = doc
        for key in path[:-1]:
            if (isinstance(node, dict) and key in node) or (isinstance(node, list) and _index(key, node)):
                node = node[key]
            else:
                break
        else:
            last = path[-1]
            if isinstance(node, dict) or (isinstance(node, list) and _index(last, node)):
                node[last] = value
    return doc


def _index(key: Any, node: list[Any]) -> bool:
    return isinstance(key, int) and key < len(node)


def full_completion() -> dict[str, Any]:
    body = completion(prompt_tokens=20, completion_tokens=5, total_tokens=25)
    body["usage"]["prompt_tokens_details"] = {"cached_tokens": 0}
    body["usage"]["completion_tokens_details"] = {"reasoning_tokens": 0}
    return body


@st.composite
def json_replies(draw: st.DrawFn) -> Reply:
    changes = draw(st.lists(st.tuples(st.sampled_from(COMPLETION_PATHS), json_values), max_size=3))
    body = json.dumps(mutated(full_completion(), changes))
    return Reply(200, body, draw(headers))


@st.composite
def sse_replies(draw: st.DrawFn) -> Reply:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    chunks: list[Any] = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "An "}),
        chunk({}, "stop"),
    ]
    chunks.append({"id": "c", "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 5}})
    for path, value in draw(st.lists(st.tuples(st.sampled_from(CHUNK_PATHS), json_values), max_size=3)):
        mutated(chunks[draw(st.integers(0, len(chunks) - 1))], [(path, value)])
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    events = [f"data: {json.dumps(c)}" for c in chunks]
    if draw(st.booleans()):
        events.insert(
            draw(st.integers(0, len(events))),
            draw(st.sampled_from([": ping", "event: x", "data: {", "id: 7"])),
        )
    if draw(st.booleans()):
        events.append("data: [DONE]")
    body = "".join(event + newline * 2 for event in events)
    return Reply(200, body, {"content-type": "text/event-stream", **draw(headers)})


@st.composite
def error_replies(draw: st.DrawFn) -> Reply:
    status = draw(st.sampled_from([400, 401, 402, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504]))
    fields = st.fixed_dictionaries({}, optional={k: json_values for k in ("message", "code", "type")})
    body = draw(
        st.builds(lambda e: {"error": e}, fields)
        | st.builds(lambda e: {"error": e}, json_values)
        | st.builds(lambda d: {"detail": d}, json_values)
        | st.text(max_size=30)
    )
    return Reply(status, body if isinstance(body, str) else json.dumps(body), draw(headers))


@st.composite
def cut_replies(draw: st.DrawFn) -> Reply:
    """A valid answer cut at any byte, then the connection closed."""
    whole = Reply(200, full_completion()).encode()
    return Reply(raw=whole[: draw(st.integers(0, len(whole) - 1))])


replies = json_replies() | sse_replies() | error_replies() | cut_replies()


@st.composite
def model_lists(draw: st.DrawFn) -> Reply:
    kind = draw(st.sampled_from(["none", "none", "list", "error"]))
    if kind == "none":
        return Reply(404, {"detail": "Not Found"})
    if kind == "error":
        return draw(error_replies())
    return Reply(200, {"data": [{"id": "grok-4.3"}, {"id": draw(json_values)}]}, draw(headers))


@pytest.mark.timeout(max(600, EXAMPLES * 20))  # a hang guard: 25 s idle, several times that loaded
@settings(
    max_examples=EXAMPLES,
    derandomize=EXAMPLES <= 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    chat=st.lists(replies, min_size=1, max_size=4),
    models=model_lists(),
    stream=st.booleans(),
    budget=st.booleans(),
)
def test_any_answer_ends_the_job_in_a_known_way(
    tmp_path_factory: Any, chat: list[Reply], models: Reply, stream: bool, budget: bool
) -> None:
    served = [0]
    lock = threading.Lock()

    def handle(request: Request) -> Reply:
        if request.path.endswith("/models"):
            return models
        with lock:
            served[0] += 1
            return chat[served[0] % len(chat)]

    folder = tmp_path_factory.mktemp("any")
    with serve_stub(handle) as stub:
        job = write_job(
            folder,
            article_rows(ROWS),
            stub.base_url,
            params={"max_tokens": MAX_TOKENS, "stream": stream},
            concurrency=CONCURRENCY,
            retry={"max_attempts": 2, "initial_backoff_s": 0.001, "max_backoff_s": 0.01, "max_outage_s": 0.3},
        )
        more = ["--max-cost", str(BUDGET_USD)] if budget else []
        runs = [invoke("run", str(job), *more), invoke("run", str(job), *more)]
    readers = [invoke(command, str(job)) for command in ("status", "cost", "report")]

    for result in [*runs, *readers]:
        said = result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), said
        assert "Traceback" not in said
        assert not CONTROL.search(said), said
        assert TEST_KEY[:8].lower() not in said.lower()
    for run in runs:
        assert run.exit_code in (0, 1, 2, 3, 4), run.output
        if run.exit_code in (2, 4):
            assert _last_line(run).startswith("Error: ")
    output = folder / "out" / "result.parquet"
    if not output.exists():  # stopped by the model check: refused, down, or no such model
        assert {run.exit_code for run in runs} <= {2, 4}
        assert served[0] == 0  # before sending anything
        return
    out = pl.read_parquet(output)
    assert out["id"].to_list() == [r["id"] for r in article_rows(ROWS)]
    costs = out["cost_usd"].drop_nulls()
    assert ((costs >= 0) & costs.is_finite()).all(), costs  # spending never goes down
    assert [r.exit_code for r in readers] == [0, 0, 0], [r.output for r in readers]
    assert TEST_KEY[:8].lower() not in everything_written(job)


def _last_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    return re.sub(r"^\s+", "", lines[-1]) if lines else ""
