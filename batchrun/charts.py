"""The report page's charts as inline SVG text: step lines in panels, histograms with marked
values and horizontal bars, each with axes, ticks and titles. Written here rather than by a
charting library: these four shapes take a couple of hundred lines, drawn in milliseconds,
where Vega-Lite through vl-convert took over a second and ~125 MB a page, and pygal, fast
enough, has no step line or marked value and writes an inline script and a stylesheet into
every chart (five times the bytes). Every string shown is escaped; nothing outside the SVG is
referenced."""

from __future__ import annotations

import html
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 640  # of a plot, in pixels: the page's column less the axes
COLORS = ("#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6")
FONT = 11  # pixels, of every label
CHAR = 0.6 * FONT  # a label's width per character, about (no font is measured)
LABEL_CHARS = 40  # of a bar's label; the whole one is its tooltip
LEFT = 56  # room for a value axis' ticks and title
AXIS = 34  # room below a plot for an axis' ticks and title
RIGHT = 24  # room right of a plot for its last tick's label
TICKS = 8  # at most, on an axis across the plot; fewer on a short one


@dataclass(frozen=True)
class Series:
    """A named line: its points in the order drawn."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]


@dataclass(frozen=True)
class _Scale:
    """Values from `low` to `high` onto pixels from `start` to `end`, with round ticks."""

    low: float
    high: float
    start: float
    end: float
    step: float

    def __call__(self, value: float) -> float:
        return self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start)

    def ticks(self) -> list[float]:
        first = math.ceil(self.low / self.step - 1e-9)
        last = math.floor(self.high / self.step + 1e-9)
        return [n * self.step for n in range(first, last + 1)]

    def label(self, value: float) -> str:
        decimals = max(0, -math.floor(math.log10(self.step) + 1e-9))
        return f"{value + 0.0:,.{decimals}f}"


def _scale(low: float, high: float, start: float, end: float, count: int, nice: bool = True) -> _Scale:
    """Ticks 1, 2 or 5 times a power of ten apart, about `count` of them; a nice scale's ends
    are ticks."""
    if not high - low > 1e-9 * max(abs(low), abs(high), 1e-290):  # one value: a scale around it
        low, high = (low - 1, low + 1) if low else (0.0, 1.0)
    rough = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= rough * (1 - 1e-9))
    if nice:
        low, high = math.floor(low / step + 1e-9) * step, math.ceil(high / step - 1e-9) * step
    return _Scale(low, high, start, end, step)


def step_lines(panels: Sequence[tuple[str, Sequence[Series]]], x_title: str, y_title: str) -> str:
    """Lines that hold each value until halfway to the next, one panel of its own scales each
    under its title, the series' colours in a legend on top."""
    names = list(dict.fromkeys(s.name for _, series in panels for s in series))
    height, top = 110, 24
    parts = [_legend(names, LEFT, 12)]
    for title, series in panels:
        xs = [x for s in series for x in s.xs] or [0.0]
        ys = [y for s in series for y in s.ys] or [0.0]
        x = _scale(min(xs), max(xs), LEFT, LEFT + WIDTH, TICKS, nice=False)
        y = _scale(0.0, max(ys), top + 22 + height, top + 22, 4)
        parts.append(_text(LEFT, top + 12, title, 'font-size="12"'))
        parts.append(_axes(x, y, x_title, y_title))
        for s in series:
            parts.append(_step_path(s, x, y, COLORS[names.index(s.name) % len(COLORS)]))
        top += 22 + height + AXIS + 16
    return _svg(LEFT + WIDTH + RIGHT, top, "".join(parts))


def _step_path(series: Series, x: _Scale, y: _Scale, color: str) -> str:
    points = list(zip(series.xs, series.ys, strict=True))
    if not points:
        return ""
    path = [f"M{x(points[0][0]):.1f},{y(points[0][1]):.1f}"]
    for (x0, _), (x1, y1) in itertools.pairwise(points):
        path.append(f"H{x((x0 + x1) / 2):.1f}V{y(y1):.1f}")
    path.append(f"H{x(points[-1][0]):.1f}")
    return (
        f'<path class="line" d="{"".join(path)}" fill="none" stroke="{color}" stroke-width="1.5">'
        f"<title>{_e(series.name)}</title></path>"
    )


def histogram(
    bins: Sequence[tuple[float, float, int]], x_title: str, marks: Sequence[tuple[float, str]] = ()
) -> str:
    """Bars of rows per bin (start, end, rows), and a dashed line with its label at each mark."""
    height, top = 140, 8
    low = min([b[0] for b in bins] + [m[0] for m in marks])
    high = max([b[1] for b in bins] + [m[0] for m in marks])
    x = _scale(low, high, LEFT, LEFT + WIDTH, TICKS)
    y = _scale(0.0, max(b[2] for b in bins), top + height, top, 4)
    parts = [_axes(x, y, x_title, "rows")]
    for start, end, rows in bins:
        tip = f"{start:,.6g} to {end:,.6g}: {rows:,} rows"
        width = max(x(end) - x(start) - 1, 3.0)  # a bin of one value is seen too
        parts.append(_bar(x(start) + 0.5, y(rows), width, y(0) - y(rows), COLORS[0], tip))
    for i, (at, label) in enumerate(marks):  # each label a line lower: close marks stay readable
        px = x(at)
        parts.append(
            f'<line class="mark" x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{top + height}"'
            f' stroke="{COLORS[2]}" stroke-dasharray="4 3"/>'
            + _text(px + 3, top + FONT * (i + 1), label, f'fill="{COLORS[2]}"')
        )
    return _svg(LEFT + WIDTH + RIGHT, top + height + AXIS, "".join(parts))


def bars(
    labels: Sequence[str],
    stacks: Sequence[tuple[str, Sequence[float | None]]],
    x_title: str,
    title: str = "",
    colors: Sequence[str] = COLORS,
    legend: bool = False,
) -> str:
    """Horizontal bars, one a label, each the stack of the series' values for it (a missing
    value counts 0); with a legend of the series' colours on top."""
    band, top = 22, (18 if title else 0) + (20 if legend else 4)
    left = min(max((len(label) for label in labels), default=0), LABEL_CHARS) * CHAR + 10
    totals = [sum(values[i] or 0.0 for _, values in stacks) for i in range(len(labels))]
    x = _scale(0.0, max(totals, default=0.0), left, LEFT + WIDTH, TICKS)
    parts = [_text(0, 12, title, 'font-size="12"')] if title else []
    if legend:
        parts.append(_legend([name for name, _ in stacks], left, top - 10, colors))
    parts.append(_axes(x, None, x_title, "", top + band * len(labels)))
    for i, label in enumerate(labels):
        middle = top + band * i + band / 2
        parts.append(_text(left - 6, middle + FONT / 3, _cut(label), 'text-anchor="end"', tip=label))
        at = 0.0
        for n, (name, values) in enumerate(stacks):
            value = values[i] or 0.0
            color = colors[n % len(colors)]
            tip = f"{label}, {name}: {value:,.6g}"
            parts.append(_bar(x(at), middle - band * 0.4, x(at + value) - x(at), band * 0.8, color, tip))
            at += value
    return _svg(x.end + RIGHT, top + band * len(labels) + AXIS, "".join(parts))


def _axes(x: _Scale, y: _Scale | None, x_title: str, y_title: str, bottom: float = 0.0) -> str:
    """The x axis under the plot (at `bottom` when there is no y axis), the y axis on its left,
    grid lines at their ticks."""
    base, top = (y.start, y.end) if y is not None else (bottom, bottom)
    x_ticks, y_ticks = x.ticks(), y.ticks() if y is not None else []
    parts = ['<g class="axis" stroke="#ddd">']
    parts += (f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top:.1f}" y2="{base + 4:.1f}"/>' for t in x_ticks)
    if y is not None:
        parts += (
            f'<line x1="{x.start - 4:.1f}" x2="{x.end:.1f}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>'
            for t in y_ticks
        )
    parts.append(f'<line x1="{x.start:.1f}" x2="{x.end:.1f}" y1="{base:.1f}" y2="{base:.1f}" stroke="#888"/>')
    parts.append('</g><g class="axis" fill="#444">')
    parts += (_text(x(t), base + 15, x.label(t), 'text-anchor="middle"') for t in x_ticks)
    parts.append(_text((x.start + x.end) / 2, base + 30, x_title, 'text-anchor="middle" font-weight="bold"'))
    if y is not None:
        parts += (_text(x.start - 6, y(t) + FONT / 3, y.label(t), 'text-anchor="end"') for t in y_ticks)
        turn = (
            f'transform="rotate(-90 10 {(y.start + y.end) / 2:.1f})" text-anchor="middle" font-weight="bold"'
        )
        parts.append(_text(10, (y.start + y.end) / 2, y_title, turn))
    return "".join(parts) + "</g>"


def _legend(names: Sequence[str], left: float, top: float, colors: Sequence[str] = COLORS) -> str:
    parts, at = ['<g class="legend">'], left
    for n, name in enumerate(names):
        parts.append(
            f'<rect x="{at:.1f}" y="{top - 8:.1f}" width="10" height="10" fill="{colors[n % len(colors)]}"/>'
        )
        parts.append(_text(at + 14, top + 1, name))
        at += 14 + len(name) * CHAR + 16
    return "".join(parts) + "</g>"


def _bar(x: float, y: float, width: float, height: float, color: str, tip: str) -> str:
    return (
        f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{max(width, 0.5):.1f}" height="{height:.1f}"'
        f' fill="{color}"><title>{_e(tip)}</title></rect>'
    )


def _text(x: float, y: float, text: str, attributes: str = "", tip: str = "") -> str:
    """A label, escaped; `tip` is shown on hover."""
    title = f"<title>{_e(tip)}</title>" if tip else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" {attributes}>{title}{_e(text)}</text>'


def _svg(width: float, height: float, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}"'
        f' viewBox="0 0 {width:.0f} {height:.0f}" font-family="system-ui, sans-serif" font-size="{FONT}"'
        f' role="img"><rect width="100%" height="100%" fill="white"/>{body}</svg>'
    )


def _cut(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _e(text: str) -> str:
    """Text as SVG (XML) text: escaped, and the control characters XML cannot hold replaced."""
    return html.escape(_NOT_XML.sub("\ufffd", text))
