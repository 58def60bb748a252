"""How many chat requests per second the simulator serves on its own: a minimal HTTP/1.1 load generator.

    python tests/benchmarks/loadgen.py BASE_URL [--requests 40000] [--connections 64]

`wrk` is not installed here, and any full HTTP client in Python costs more CPU per request than
the server it would measure; this one sends prebuilt request bytes on keep-alive connections and
only finds where each answer ends (Content-Length), ~10 µs of CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.parse

import orjson

BODY = {
    "model": "grok-4.3",
    "max_tokens": 60,
    "messages": [
        {"role": "system", "content": "You are a news editor."},
        {"role": "user", "content": "Summarize: A title\n\nA lead sentence. A second one. A third one."},
    ],
}


class _Connection(asyncio.Protocol):
    """Sends the request again each time a whole answer has arrived, until the shared count runs out."""

    def __init__(
        self, request: bytes, budget: list[int], done: asyncio.Future[None], statuses: dict[int, int]
    ):
        self._request = request
        self._budget = budget
        self._done = done
        self._statuses = statuses
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._send()

    def _send(self) -> None:
        if self._budget[0] <= 0:
            self._transport.close()
            return
        self._budget[0] -= 1
        self._transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (head_end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = self._buffer[: head_end + 2].lower()  # every header line with its \r\n, the last too
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
            end = head_end + 4 + length
            if len(self._buffer) < end:
                return
            status = int(head[9:12])
            self._statuses[status] = self._statuses.get(status, 0) + 1
            self._buffer = self._buffer[end:]
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def measure(
    base_url: str, requests: int, connections: int, body: bytes = orjson.dumps(BODY)
) -> tuple[float, dict[int, int]]:
    """Requests per second served, and the count of each status."""
    url = urllib.parse.urlsplit(base_url)
    request = (
        f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    budget, statuses = [requests], {}
    finished = [loop.create_future() for _ in range(connections)]
    started = time.perf_counter()
    for done in finished:
        await loop.create_connection(
            lambda done=done: _Connection(request, budget, done, statuses), url.hostname, url.port
        )
    await asyncio.gather(*finished)
    return requests / (time.perf_counter() - started), statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    rate, statuses = asyncio.run(measure(args.base_url, args.requests, args.connections))
    print(f"{rate:.0f} requests/s, statuses {statuses}")


if __name__ == "__main__":
    main()
