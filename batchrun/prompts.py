"""Prompt templates: `{column}` placeholders over a row, checked before anything is sent; a row's
images (prompt.images, images.py) follow the text of the last user message as content parts."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchrun.errors import JobError

if TYPE_CHECKING:
    from batchrun.images import ImageSettings


@dataclass(frozen=True)
class Template:
    """A template split once into literal text and column names, so rendering is a join."""

    source: str
    parts: tuple[tuple[str, str | None], ...]  # (literal, column or None)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(col for _, col in self.parts if col is not None))

    def render(self, row: Mapping[str, Any]) -> str:
        out: list[str] = []
        for literal, column in self.parts:
            out.append(literal)
            if column is not None:
                value = row[column]
                out.append(value if isinstance(value, str) else _text(value))
        return "".join(out)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def compile_template(source: str, key: str) -> Template:
    """Parse `source`; `key` names it in errors (e.g. 'prompt.user')."""
    try:
        parsed = list(string.Formatter().parse(source))
    except ValueError as exc:
        raise JobError(f"{key}: {exc}; write literal braces as '{{{{' and '}}}}'") from None
    parts: list[tuple[str, str | None]] = []
    for literal, field, spec, conversion in parsed:
        if field is None:
            parts.append((literal, None))
            continue
        if not field.strip():
            raise JobError(
                f"{key}: empty placeholder '{{}}'; name a column, e.g. '{{text}}', "
                "or write literal braces as '{{}}'"
            )
        if spec or conversion:
            raise JobError(
                f"{key}: placeholder '{{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}' has a format spec; only plain '{{column}}' is supported"
            )
        parts.append((literal, field))
    return Template(source, tuple(parts))


ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PromptTemplates:
    """The job's message templates, rendered to chat messages per row; a row's own conversation
    (input.messages_column) follows them."""

    templates: tuple[tuple[str, str, Template], ...]  # (job key, role, template), in order
    messages_column: str | None = None
    images: ImageSettings | None = None  # prompt.images, in the last user message

    @property
    def columns(self) -> tuple[str, ...]:
        cols = [c for _, _, t in self.templates for c in t.columns]
        if self.messages_column:
            cols.append(self.messages_column)
        if self.images:
            cols += self.images.columns
        return tuple(dict.fromkeys(cols))

    def needed(self) -> dict[str, tuple[str, ...]]:
        """The columns each job key uses, for errors that name the key."""
        keys = {key: t.columns for key, _, t in self.templates}
        if self.messages_column:
            keys["input.messages_column"] = (self.messages_column,)
        if self.images:
            keys["prompt.images"] = self.images.columns
        return keys

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        rendered: list[dict[str, Any]] = [
            {"role": role, "content": t.render(row)} for _, role, t in self.templates
        ]
        if self.messages_column:
            rendered += conversation(row[self.messages_column])
        if self.images:
            last = max(i for i, (_, role, _) in enumerate(self.templates) if role == "user")
            text = {"type": "text", "text": rendered[last]["content"]}
            rendered[last]["content"] = [text, *self.images.parts(row)]
        return rendered


def text_length(messages: list[dict[str, Any]]) -> int:
    """Characters of the messages' text (string content, or the text parts of a list): what
    prompt tokens are estimated from, for pacing and for cost estimates alike."""
    length = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            length += len(content)
        elif isinstance(content, list):
            length += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return length


def image_count(messages: list[dict[str, Any]]) -> int:
    """The image parts of the messages: what the budget and cost estimates count images by."""
    return sum(
        1
        for message in messages
        if isinstance(content := message.get("content"), list)
        for part in content
        if isinstance(part, dict) and part.get("type") == "image_url"
    )


def conversation(value: Any) -> list[dict[str, Any]]:
    """A row's messages: a JSON text or a list of {role, content, ...}; ValueError says what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"message {i + 1} is not an object with role and content")
        message = {k: v for k, v in message.items() if v is not None}  # struct columns pad with nulls
        if message.get("role") not in ROLES:
            role = message.get("role")
            raise ValueError(f"message {i + 1} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message.get("content", ""), str):
            raise ValueError(f"message {i + 1}'s content is not text")
        messages.append(message)
    return messages


def compile_prompts(
    system: str | None,
    user: str | None,
    messages: Sequence[tuple[str, str]] = (),
    messages_column: str | None = None,
    images: ImageSettings | None = None,
) -> PromptTemplates:
    """Templates from the job's prompt: system and user, or a list of (role, content) messages."""
    templates = []
    if system is not None:
        templates.append(("prompt.system", "system", compile_template(system, "prompt.system")))
    if user is not None:
        templates.append(("prompt.user", "user", compile_template(user, "prompt.user")))
    for i, (role, content) in enumerate(messages):
        key = f"prompt.messages[{i}].content"
        templates.append((key, role, compile_template(content, key)))
    return PromptTemplates(tuple(templates), messages_column, images)
