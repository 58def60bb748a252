"""A stub HTTP server on loopback that answers exactly as a test tells it to.

For behaviours of servers we did not write (a LiteLLM gateway, llama.cpp's server) that CI cannot
run: each test replays the status, headers and body those servers were seen to send, byte for
byte where it matters (`Reply.raw` writes bytes as they are and closes the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # sent verbatim instead of the above, then the connection is closed

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        body = self.body
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        headers = {"content-type": "application/json", **self.headers, "content-length": str(len(body))}
        head = f"HTTP/1.1 {self.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return head.encode() + b"\r\n" + body


Handler = Callable[[Request], Reply]


@dataclass
class StubServer:
    handler: Handler
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    # connections being served: those a client keeps alive (a pool) are closed when the stub stops
    connections: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    name.strip().lower(): value.strip()
                    for name, value in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Request(method, path, headers, body)
                self.requests.append(request)
                reply = self.handler(request)
                writer.write(reply.encode())
                await writer.drain()
                if reply.raw is not None:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.connections.discard(task)


@contextlib.contextmanager
def serve_stub(handler: Handler, port: int = 0) -> Iterator[StubServer]:
    """Run a StubServer on 127.0.0.1 in a thread until the block ends."""
    stub = StubServer(handler, port)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def main() -> None:
        nonlocal stop
        server = await asyncio.start_server(stub._serve_connection, "127.0.0.1", port)
        stub.port = server.sockets[0].getsockname()[1]
        stop = loop.create_future()
        ready.set()
        async with server:
            await stop
            still_open = list(stub.connections)
            for connection in still_open:
                connection.cancel()
            await asyncio.gather(*still_open, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield stub
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
        loop.close()


def completion(content: str = "An answer.", finish_reason: str = "stop", **usage: int) -> dict[str, Any]:
    """A minimal OpenAI chat.completion body."""
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": "stub-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }
