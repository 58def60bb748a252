"""The report page's charts (batchrun/charts.py): each is an SVG document of its own whatever
the strings it shows (column values, model names, error kinds come from outside), shows each of
them as given, and draws each value in proportion."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun import charts

NS = "{http://www.w3.org/2000/svg}"
XML_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
HOSTILE = ["</svg><script>alert(1)</script>", 'a "quoted" & <b>bold</b>', "it's", "\x01\x1f", "]]>", "x" * 90]

texts = st.text(max_size=60) | st.sampled_from(HOSTILE)
values = st.floats(0, 1e9) | st.none()


def parse(svg: str) -> ET.Element:
    """The chart as an XML document: fails if a string broke out of its text."""
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg"
    assert not root.findall(f".//{NS}script") and not root.findall(f".//{NS}foreignObject")
    assert not any(k.endswith("href") for e in root.iter() for k in e.attrib)
    return root


def label(element: ET.Element) -> str:
    """A <text>'s own text, without its tooltip."""
    return (element.text or "") + "".join(child.tail or "" for child in element)


def as_parsed(text: str) -> str:
    """What a parser reads back from a label written as given: XML's forbidden characters
    replaced, its line ends read as \\n (as every XML and HTML parser does)."""
    return XML_CONTROL.sub("\ufffd", text).replace("\r\n", "\n").replace("\r", "\n")


def cut(text: str) -> str:
    return text if len(text) <= charts.LABEL_CHARS else text[: charts.LABEL_CHARS - 1] + "…"


def assert_in_proportion(pixels: list[float], values: list[float], tolerance: float = 0.6) -> None:
    """Each length is its value times the same pixels per unit, give or take the rounding."""
    top, longest = max(values), max(pixels)
    for pixel, value in zip(pixels, values, strict=True):
        assert pixel == pytest.approx(value / top * longest if top else 0.0, abs=tolerance)


@given(
    labels=st.lists(texts, min_size=1, max_size=6),
    data=st.data(),
    title=texts,
)
def test_bars_show_every_label_as_given_and_each_value_in_proportion(
    labels: list[str], data: st.DataObject, title: str
) -> None:
    shown = data.draw(st.lists(values, min_size=len(labels), max_size=len(labels)))
    root = parse(charts.bars(labels, [("cost", shown)], "cost (USD)", title))

    names = [label(t) for t in root.iter(f"{NS}text") if t.get("text-anchor") == "end"]
    assert names == [as_parsed(cut(x)) for x in labels]
    tips = [t.text for t in root.iter(f"{NS}title")]
    assert all(as_parsed(x) in tips for x in labels if x)  # the whole label, on hover
    if title:
        assert as_parsed(title) in [label(t) for t in root.iter(f"{NS}text")]
    bars = [float(r.get("width", "")) for r in root.iter(f"{NS}rect") if r.get("class") == "bar"]
    assert_in_proportion(bars, [v or 0.0 for v in shown])


def test_stacked_bars_add_up_with_a_legend_of_their_series() -> None:
    stacks = [("ok", [3.0, 1.0]), ("failed", [1.0, None])]
    root = parse(charts.bars(["model <a>", "model b"], stacks, "cost (USD)", legend=True))

    bars = [r for r in root.iter(f"{NS}rect") if r.get("class") == "bar"]
    widths = [float(r.get("width", "")) for r in bars]  # per label, its series in order
    assert_in_proportion(widths, [3.0, 1.0, 1.0, 0.0])
    first_ok, first_failed = bars[0], bars[1]
    assert float(first_failed.get("x", "")) == pytest.approx(
        float(first_ok.get("x", "")) + widths[0], abs=0.2
    )  # stacked, not overlaid
    assert [label(t) for t in root.iter(f"{NS}text")][:2] == ["ok", "failed"]
    assert [b.findtext(f"{NS}title") for b in bars[:2]] == ["model <a>, ok: 3", "model <a>, failed: 1"]


@given(
    edges=st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=30, unique=True).map(sorted),
    data=st.data(),
    mark=texts,
)
def test_a_histogram_draws_each_bin_in_proportion_and_its_marks(
    edges: list[float], data: st.DataObject, mark: str
) -> None:
    rows = data.draw(st.lists(st.integers(0, 10**9), min_size=len(edges) - 1, max_size=len(edges) - 1))
    bins = list(zip(edges, edges[1:], rows, strict=False))
    at = data.draw(st.floats(edges[0], edges[-1]))

    root = parse(charts.histogram(bins, "latency (ms)", [(at, mark)]))

    bars = [r for r in root.iter(f"{NS}rect") if r.get("class") == "bar"]
    assert len(bars) == len(bins)
    assert_in_proportion([float(r.get("height", "")) for r in bars], [float(n) for n in rows])
    assert [b.findtext(f"{NS}title") for b in bars] == [
        f"{start:,.6g} to {end:,.6g}: {n:,} rows" for start, end, n in bins
    ]
    lines = [line for line in root.iter(f"{NS}line") if line.get("class") == "mark"]
    assert len(lines) == 1 and lines[0].get("stroke-dasharray")
    assert as_parsed(mark) in [label(t) for t in root.iter(f"{NS}text")]


def test_step_lines_draw_a_panel_a_run_and_a_series_a_line() -> None:
    panels = [
        ("run 2 <last>", [charts.Series("rows finished", [0.5, 1.5, 2.5], [10.0, 0.0, 5.0])]),
        (
            "run 1",
            [charts.Series("rows finished", [0.5, 1.5], [4.0, 8.0]), charts.Series("429s", [0.5], [1.0])],
        ),
    ]
    root = parse(charts.step_lines(panels, "seconds into the run", "per second"))

    shown = [label(t) for t in root.iter(f"{NS}text")]
    assert shown[:2] == ["rows finished", "429s"]  # the legend, each series once
    assert "run 2 <last>" in shown and "run 1" in shown
    paths = [p for p in root.iter(f"{NS}path") if p.get("class") == "line"]
    assert [p.findtext(f"{NS}title") for p in paths] == ["rows finished", "rows finished", "429s"]
    # "M x,y" the first point, then "H x V y" a point: held until halfway to the next
    commands = re.findall(r"([MHV])([^MHV]+)", paths[0].get("d", ""))
    assert [c for c, _ in commands] == ["M", "H", "V", "H", "V", "H"]
    heights = [float(commands[0][1].split(",")[1]), *(float(v) for c, v in commands if c == "V")]
    base = heights[1]  # the value 0
    assert_in_proportion([base - h for h in heights], [10.0, 0.0, 5.0])


@given(low=st.floats(-1e9, 1e9), span=st.floats(0, 1e9), count=st.integers(2, 10))
def test_ticks_are_round_distinct_and_cover_the_values(low: float, span: float, count: int) -> None:
    span = max(span, abs(low) * 1e-6)  # the page's ranges: never narrower than a millionth of their values
    scale = charts._scale(low, low + span, 0.0, 640.0, count)

    ticks = scale.ticks()
    slack = scale.step * 1e-6  # a value a millionth of a step past a tick is drawn on it
    assert scale.low <= low + slack and scale.high >= low + span - slack
    assert ticks[0] == pytest.approx(scale.low) and ticks[-1] == pytest.approx(scale.high)
    assert 2 <= len(ticks) <= 2 * count + 2
    labels = [scale.label(t) for t in ticks]
    assert len(set(labels)) == len(labels), labels
    for tick, text in zip(ticks, labels, strict=True):
        assert float(text.replace(",", "")) == pytest.approx(tick, rel=1e-9, abs=scale.step / 100)


def test_a_histogram_of_one_value_has_a_readable_axis_and_a_visible_bar() -> None:
    """Every row with 13 completion tokens: one bin a billionth wide (html_report._histogram)."""
    root = parse(charts.histogram([(13.0, 13.0 + 1e-9, 10)], "completion tokens"))

    ticks = [
        label(t)
        for t in root.iter(f"{NS}text")
        if t.get("text-anchor") == "middle" and not t.get("font-weight")
    ]
    assert "13.0" in ticks and all(len(t) <= 4 for t in ticks), ticks
    (bar,) = [r for r in root.iter(f"{NS}rect") if r.get("class") == "bar"]
    assert float(bar.get("width", "")) >= 3
