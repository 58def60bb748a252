"""Prompt templates: `{column}` placeholders over a row, checked before anything is sent."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchrun.errors import JobError


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


@dataclass(frozen=True)
class PromptTemplates:
    """The job's system and user templates, rendered to chat messages per row."""

    system: Template | None
    user: Template

    @property
    def columns(self) -> tuple[str, ...]:
        cols = (self.system.columns if self.system else ()) + self.user.columns
        return tuple(dict.fromkeys(cols))

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        user = {"role": "user", "content": self.user.render(row)}
        if self.system is None:
            return [user]
        return [{"role": "system", "content": self.system.render(row)}, user]


def compile_prompts(system: str | None, user: str) -> PromptTemplates:
    return PromptTemplates(
        compile_template(system, "prompt.system") if system is not None else None,
        compile_template(user, "prompt.user"),
    )
