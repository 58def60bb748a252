"""A streamed chat completion's events, assembled into one answer.

httpx2's `EventSource` splits the body into events (lines, comments, `event:` and `id:` fields);
this takes each event's data. Kept apart from the HTTP code so it can be tested on any sequence.
"""

from __future__ import annotations

from typing import Any

import orjson

from batchrun.errors import RetryableError


class StreamAssembler:
    """Feed it the data of each event; `finish()` gives the answer or says it is incomplete."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.done = False
        self.saw_content = False
        self._calls: dict[int, dict[str, str]] = {}  # tool calls by index, arguments growing

    def feed(self, data: str) -> bool:
        """Take one event's data; True when it carried the first piece of content (time to first token)."""
        if not data:
            return False  # an event of only `event:` or `id:` fields
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
                delta = choice.get("delta") or {}
                if content := delta.get("content"):
                    self.pieces.append(content)
                for call in delta.get("tool_calls") or ():
                    self._add_tool_call_delta(call)
                if (content or delta.get("tool_calls")) and not self.saw_content:
                    first = self.saw_content = True
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
            return first
        except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
            raise RetryableError("invalid_response", f"unreadable stream chunk ({exc})") from None

    def _add_tool_call_delta(self, call: dict[str, Any]) -> None:
        """Tool calls stream as pieces keyed by index: id and name once, arguments in parts."""
        entry = self._calls.setdefault(call.get("index", 0), {"id": "", "name": "", "arguments": ""})
        function = call.get("function") or {}
        entry["id"] = entry["id"] or call.get("id") or ""
        entry["name"] = entry["name"] or function.get("name") or ""
        entry["arguments"] += function.get("arguments") or ""

    @property
    def tool_calls(self) -> list[dict[str, str]] | None:
        return [self._calls[i] for i in sorted(self._calls)] if self._calls else None

    def finish(self) -> str | None:
        """The assembled content; a stream cut off is worth another attempt.

        `[DONE]` alone does not prove the answer whole: llama.cpp's server sends it mid-answer
        when another request waits, so a stream whose choice never got a `finish_reason` is cut.
        """
        if not self.done:
            raise RetryableError("truncated_stream", "the stream ended before data: [DONE]")
        if self.finish_reason is None:
            raise RetryableError("truncated_stream", "data: [DONE] came before any finish_reason")
        return "".join(self.pieces) if self.pieces or not self._calls else None
