"""Text bound for a terminal or a log: control characters from a server or an input table are
shown, not obeyed (a window title, a cleared screen, a hyperlink, a NUL). Files keep the data
verbatim; the HTML page escapes it its own way."""

from __future__ import annotations

import re

# C0 but tab and newline, DEL, and C1 (0x9b is CSI on terminals that take 8-bit controls).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_BREAK = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str, *, one_line: bool = False) -> str:
    r"""`text` with each control character written as an escape (`\u001b`, valid in JSON too);
    `one_line` escapes newlines too, for a line that must stay one (an error)."""
    pattern = _LINE_BREAK if one_line else _CONTROL
    return pattern.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"
