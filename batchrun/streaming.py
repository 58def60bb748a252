"""Server-Sent Events of a streamed chat completion, assembled into one answer.

Kept apart from the HTTP code so the parser can be tested on any sequence of lines.
"""

from __future__ import annotations

from typing import Any

import orjson

from batchrun.errors import RetryableError


class StreamAssembler:
    """Feed it the lines of an SSE body; `finish()` gives the answer or says it is incomplete."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.done = False
        self.saw_content = False

    def feed(self, line: str) -> bool:
        """Take one line; True when it carried the first piece of content (for time to first token)."""
        if not line.startswith("data:"):
            return False  # blank separators, comments (": keep-alive"), event: and id: fields
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return False
        try:
            chunk = orjson.loads(data)
            self.response_id = self.response_id or chunk.get("id")
            self.model = self.model or chunk.get("model")
            if chunk.get("usage"):
                self.usage = chunk["usage"]
            first = False
            for choice in chunk.get("choices") or ():
                if content := (choice.get("delta") or {}).get("content"):
                    first = not self.saw_content
                    self.saw_content = True
                    self.pieces.append(content)
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
            return first
        except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
            raise RetryableError("invalid_response", f"unreadable stream chunk ({exc})") from None

    def finish(self) -> str:
        """The assembled content; a stream cut off before `[DONE]` is worth another attempt."""
        if not self.done:
            raise RetryableError("truncated_stream", "the stream ended before data: [DONE]")
        return "".join(self.pieces)
