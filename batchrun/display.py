"""A job's figures for people: the lines the CLI prints (a run's summary, `batchrun status`), and
the same lines as the repr of RunResult, Status and Estimate, with an HTML table for a notebook.

Light on purpose (nothing heavy imported): cli.py uses it before any command runs.
"""

from __future__ import annotations

import html
from pathlib import Path

ERROR_WIDTH = 200  # an error message in the summary; report.json has it whole


def errors_lines(top_errors: list[tuple[str, int]], failed: int) -> list[str]:
    """Why rows failed, not only how many: the commonest messages, each cut to a line."""
    lines = [f"  {n} {'row' if n == 1 else 'rows'}: {one_line(error)}" for error, n in top_errors]
    if rest := failed - sum(n for _, n in top_errors):
        lines.append(f"  {rest} more {'row' if rest == 1 else 'rows'} with other errors")
    return lines


def one_line(text: str, width: int = ERROR_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def tokens_line(prompt: int | None, completion: int | None, without_usage: int) -> str:
    """Tokens as far as the endpoint reported them: a missing count is unknown, never 0."""
    if prompt is None or completion is None:
        return f"tokens: unknown (the endpoint reported no usage for {without_usage:,} rows)"
    line = f"tokens: {prompt:,} prompt + {completion:,} completion"
    if without_usage:
        line += f", and {without_usage:,} rows without usage (the endpoint reported none)"
    return line


def cost_line(cost_usd: float, usage_unknown: bool, without_usage: int) -> str:
    """Cost as far as usage was reported: rows without usage have no cost to add."""
    if usage_unknown:
        return "cost: unknown (no usage reported)"
    return f"cost: ${cost_usd:.4f}" + (
        f" (not counting {without_usage:,} rows without usage)" if without_usage else ""
    )


class Shown:
    """Figures shown as lines of `label: value`: their repr is a title and the lines (a terminal,
    a log, a notebook without HTML), `_repr_html_` the same as a table (a notebook). A dataclass
    using it says `repr=False`, or its generated repr would hide this one."""

    checkpoint_path: Path | None = None  # the job's checkpoint, where the figures know it

    def title(self) -> str:
        raise NotImplementedError

    def figures(self) -> list[str]:
        """The lines the CLI prints."""
        raise NotImplementedError

    def next_step(self) -> str | None:
        """What to do next, said to a Python user."""
        return None

    def shown_lines(self) -> list[str]:
        lines = self.figures()
        if self.checkpoint_path is not None:
            lines.append(f"checkpoint: {self.checkpoint_path}")
        step = self.next_step()
        return [*lines, step] if step else lines

    def __repr__(self) -> str:
        return "\n".join([self.title(), *self.shown_lines()])

    def _repr_html_(self) -> str:
        rows: list[list[str]] = []
        for line in self.shown_lines():
            if line.startswith("  ") and rows:  # a detail of the line above (a failure's message)
                rows[-1][1] += "<br>" + html.escape(line.strip())
                continue
            label, found, value = line.partition(": ")
            rows.append([html.escape(label), html.escape(value)] if found else ["", html.escape(line)])
        cells = "".join(
            f'<tr><th style="text-align:left">{label}</th><td style="text-align:left">{value}</td></tr>'
            for label, value in rows
        )
        return f"<div><strong>{html.escape(self.title())}</strong><table>{cells}</table></div>"
