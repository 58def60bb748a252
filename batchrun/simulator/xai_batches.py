"""The simulator's Batch API in xAI's shape (`SimulatorConfig.batch_api: xai`), in memory on the
simulator's loop.

`POST /v1/batches` (`name`), `GET /v1/batches` (newest first; `limit`, `pagination_token`),
`GET /v1/batches/{id}`, `POST /v1/batches/{id}/requests` (`batch_requests`: each a
`batch_request_id` unique in the batch and a `batch_request.chat_get_completion` body; at most
25 MiB a call, taken whole or refused whole), `GET /v1/batches/{id}/results` (`limit`,
`pagination_token`), `POST /v1/batches/{id}:cancel`. A batch is
`{batch_id, name, create_time, expire_time, cancel_time, cancel_by_xai_message, state: {num_requests,
num_pending, num_success, num_error, num_cancelled}}`; a result is
`{batch_request_id, batch_result: {response: {chat_get_completion}}}` or, failed,
`{batch_request_id, batch_result: {error: {code, message}}}` with a gRPC status code.

The requests of one add are answered evenly over the `SimulatorConfig.batch_s` seconds after it,
lazily, when the batch is asked about, each as the chat endpoint answers its body (so the chat
endpoint's fault markers fail a request). Cancelling keeps what was answered and cancels the rest.
The markers of simulator/batches.py, in a request:

* ``[[batch:invalid]]`` - xAI cancels the batch (`cancel_by_xai_message`), its pending requests with it;
* ``[[batch:expire]]`` / ``[[batch:expirexN]]`` - the request is never answered (always / the first N
  times this exact request is added), and the batch expires `batch_s` after the add: its
  `expire_time` passes with requests pending, and none is answered after it.
"""

from __future__ import annotations

import datetime
import itertools
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchrun.simulator.batches import BatchStats, ExpireMarkers
from batchrun.simulator.httpserver import Outcome, Request, Response

MAX_ADD_BYTES = 25 * 1024 * 1024
DAY_S = 86_400.0
# The gRPC status a failed request's result carries, by the HTTP status the chat endpoint gave.
GRPC_CODE = {
    400: 3,
    401: 16,
    403: 7,
    404: 5,
    408: 4,
    409: 10,
    422: 3,
    429: 8,
    500: 13,
    502: 14,
    503: 14,
    504: 4,
}
UNKNOWN, UNAVAILABLE = 2, 14


@dataclass
class _Request:
    id: str
    body: bytes
    due: float  # time.monotonic() it is answered at
    expire: bool  # never answered: it waits for the batch's expiry
    result: dict[str, Any] | None = None
    cancelled: bool = False


@dataclass
class _Batch:
    id: str
    name: str
    created: float  # time.time()
    requests: list[_Request] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    results: list[dict[str, Any]] = field(default_factory=list)  # in the order answered
    expires: float = 0.0  # time.time() of its expiry
    cancelled: float | None = None  # time.time() of its cancellation
    rejected: str | None = None  # why xAI cancelled it

    def json(self) -> dict[str, Any]:
        pending = sum(1 for r in self.requests if r.result is None and not r.cancelled)
        failed = sum(1 for r in self.results if "error" in r["batch_result"])
        return {
            "batch_id": self.id,
            "name": self.name,
            "create_time": _rfc3339(self.created),
            "expire_time": _rfc3339(self.expires),
            "cancel_time": None if self.cancelled is None else _rfc3339(self.cancelled),
            "cancel_by_xai_message": self.rejected,
            "state": {
                "num_requests": len(self.requests),
                "num_pending": pending,
                "num_success": len(self.results) - failed,
                "num_error": failed,
                "num_cancelled": sum(1 for r in self.requests if r.cancelled),
            },
        }


def _rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat().replace("+00:00", "Z")


class XaiBatches:
    """The batches routes; `reply` answers one request's body as the chat endpoint would."""

    def __init__(self, batch_s: float, reply: Callable[[bytes], Outcome], stats: BatchStats) -> None:
        self._batch_s = batch_s
        self._reply = reply
        self._stats = stats
        self._batches: dict[str, _Batch] = {}
        self._expires = ExpireMarkers()
        self._ids = (f"batch_xsim{n:08x}" for n in itertools.count(1))

    def handle(self, request: Request) -> Response:
        self._stats.batch_requests += 1
        parts = request.path.strip("/").split("/")[1:]  # batches, {id}[:cancel], requests|results
        batch_id, _, action = parts[1].partition(":") if len(parts) > 1 else ("", "", "")
        key = (request.method, len(parts), action or (parts[2] if len(parts) == 3 else ""))
        routes: dict[tuple[str, int, str], Callable[..., Response]] = {
            ("POST", 1, ""): self._create,
            ("GET", 1, ""): self._list,
            ("GET", 2, ""): self._batch,
            ("POST", 2, "cancel"): self._cancel,
            ("POST", 3, "requests"): self._add,
            ("GET", 3, "results"): self._results,
        }
        route = routes.get(key) if parts[0] == "batches" else None
        if route is None:
            return _error(404, f"Unknown request URL: {request.method} {request.path}.")
        query = dict(urllib.parse.parse_qsl(request.query))
        return route(request, query, *([batch_id] if batch_id else []))

    def _create(self, request: Request, query: dict[str, str]) -> Response:
        data = _json_object(request.body)
        if data is None or not isinstance(data.get("name"), str):
            return _error(400, "The body must be a JSON object with a string `name`.")
        now = time.time()
        batch = _Batch(next(self._ids), data["name"], now, expires=now + DAY_S)
        self._batches[batch.id] = batch
        return _json(batch.json())

    def _list(self, request: Request, query: dict[str, str]) -> Response:
        batches = list(reversed(self._batches.values()))
        page, token = _page(batches, query)
        for batch in page:
            self._advance(batch)
        return _json({"batches": [b.json() for b in page], "pagination_token": token})

    def _found(self, batch_id: str) -> _Batch | Response:
        batch = self._batches.get(batch_id)
        if batch is None:
            return _error(404, f"No batch with id {batch_id}.")
        self._advance(batch)
        return batch

    def _batch(self, request: Request, query: dict[str, str], batch_id: str) -> Response:
        batch = self._found(batch_id)
        return batch if isinstance(batch, Response) else _json(batch.json())

    def _cancel(self, request: Request, query: dict[str, str], batch_id: str) -> Response:
        batch = self._found(batch_id)
        if isinstance(batch, Response):
            return batch
        if batch.cancelled is None:
            batch.cancelled = time.time()
            for pending in (r for r in batch.requests if r.result is None):
                pending.cancelled = True
        return _json(batch.json())

    def _add(self, request: Request, query: dict[str, str], batch_id: str) -> Response:
        batch = self._found(batch_id)
        if isinstance(batch, Response):
            return batch
        if len(request.body) > MAX_ADD_BYTES:
            return _error(413, f"A call adds at most {MAX_ADD_BYTES} bytes of requests.")
        if batch.cancelled is not None:
            return _error(400, f"Batch {batch.id} is cancelled: no request can be added.")
        data = _json_object(request.body)
        items = data.get("batch_requests") if data is not None else None
        if not isinstance(items, list) or not items:
            return _error(400, "The body must hold a non-empty `batch_requests` list.")
        found: list[tuple[str, Any]] = []
        for item in items:
            request_id = item.get("batch_request_id") if isinstance(item, dict) else None
            wrapped = item.get("batch_request") if isinstance(item, dict) else None
            body = wrapped.get("chat_get_completion") if isinstance(wrapped, dict) else None
            if not isinstance(request_id, str) or request_id in batch.ids or request_id in dict(found):
                return _error(400, f"batch_request_id {request_id!r} must be a string unique in the batch.")
            if not isinstance(body, dict):
                return _error(
                    400, f"Request {request_id}: batch_request.chat_get_completion must be an object."
                )
            found.append((request_id, body))
        self._take(batch, found)
        self._stats.batch_adds += 1
        return _json({})

    def _take(self, batch: _Batch, found: list[tuple[str, Any]]) -> None:
        """The requests of one add into the batch, due over the next batch_s seconds."""
        now, wall = time.monotonic(), time.time()
        for n, (request_id, body) in enumerate(found, 1):
            raw = orjson.dumps(body)
            expire = self._expires(raw)
            batch.ids.add(request_id)
            batch.requests.append(_Request(request_id, raw, now + self._batch_s * n / len(found), expire))
            if expire:
                batch.expires = min(batch.expires, wall + self._batch_s)
            if b"[[batch:invalid]]" in raw and batch.rejected is None:
                batch.rejected = f"Simulated validation failure ([[batch:invalid]]) in request {request_id}."
                batch.cancelled = wall
        if batch.rejected is not None:
            for pending in (r for r in batch.requests if r.result is None):
                pending.cancelled = True

    def _results(self, request: Request, query: dict[str, str], batch_id: str) -> Response:
        batch = self._found(batch_id)
        if isinstance(batch, Response):
            return batch
        page, token = _page(batch.results, query)
        return _json({"results": page, "pagination_token": token})

    def _advance(self, batch: _Batch) -> None:
        """Answer the requests that are due, up to the batch's expiry."""
        until = time.monotonic() - max(0.0, time.time() - batch.expires)
        for pending in batch.requests:
            if (
                pending.result is None
                and not pending.cancelled
                and not pending.expire
                and pending.due <= until + 1e-3
            ):
                pending.result = self._answer(pending)
                batch.results.append(pending.result)

    def _answer(self, pending: _Request) -> dict[str, Any]:
        self._stats.batch_lines += 1
        outcome = self._reply(pending.body)
        if outcome is None:  # [[fail:reset]]: the request got no answer
            error = {"code": UNAVAILABLE, "message": "The request was dropped before it was answered."}
            return {"batch_request_id": pending.id, "batch_result": {"error": error}}
        try:
            body: Any = orjson.loads(outcome.body)
        except orjson.JSONDecodeError:  # [[fail:badjson]]: kept as the text it is
            body = outcome.body.decode("utf-8", "replace")
        if outcome.status == 200:
            return {
                "batch_request_id": pending.id,
                "batch_result": {"response": {"chat_get_completion": body}},
            }
        said = body.get("error") if isinstance(body, dict) else None
        message = said.get("message") if isinstance(said, dict) else None
        error = {
            "code": GRPC_CODE.get(outcome.status, UNKNOWN),
            "message": message or f"HTTP {outcome.status}",
        }
        return {"batch_request_id": pending.id, "batch_result": {"error": error}}


def _page(items: list[Any], query: dict[str, str]) -> tuple[list[Any], str | None]:
    """A page of `items` from `pagination_token` (an offset), at most `limit` (100) long; and the
    next page's token, None at the end."""
    try:
        start = int(query.get("pagination_token") or 0)
        limit = min(max(int(query.get("limit") or 100), 1), 1000)
    except ValueError:
        start, limit = 0, 100
    end = start + limit
    return items[start:end], str(end) if end < len(items) else None


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _json(value: dict[str, Any]) -> Response:
    return Response(200, orjson.dumps(value))


def _error(status: int, message: str) -> Response:
    """xAI's error body: a sentence for the code, and the message."""
    code = {400: "Client specified an invalid argument", 404: "Some requested entity was not found"}
    return Response(status, orjson.dumps({"code": code.get(status, "Internal error"), "error": message}))
