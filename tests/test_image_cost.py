"""What images cost (#23 item 4): their tokens are prompt tokens priced as usual; `estimate`
before any row prices them per image (pricing.per_image) or says they are left out, and a pilot
measures them; the budget counts each image at a documented worst case, so image rows cannot
take it past its limit.

The simulator counts an image by OpenAI's tile rule (simulator/vision.py): a 1024 x 1024 image
at high detail is 765 tokens, a 256 x 256 one 255.
"""

from __future__ import annotations

import io
import json
import math
from array import array
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batchrun.cost import image_tokens_ceiling, job_price, list_price, prompt_tokens_ceiling
from batchrun.estimate import Observed, Rows, _project
from batchrun.job import load_job
from batchrun.simulator import RunningSimulator
from batchrun.simulator.vision import image_tokens
from tests.conftest import article_rows, invoke, read_output, write_job


def picture(size: tuple[int, int], color: tuple[int, int, int] = (30, 90, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def image_job(
    tmp_path: Path, base_url: str, sizes: list[tuple[int, int]], images: bool = True, **overrides: Any
) -> Path:
    """A row per size, each with its picture (photos/N.png beside the input); without `images`,
    the same job with no image parts."""
    (tmp_path / "photos").mkdir(parents=True)
    rows = article_rows(len(sizes))
    for i, (row, size) in enumerate(zip(rows, sizes, strict=True)):
        (tmp_path / "photos" / f"{i}.png").write_bytes(picture(size, (i % 256, 90, 200)))
        row["photo"] = f"photos/{i}.png"
    prompt = {
        "system": "Summarize.",
        "user": "{title}\n\n{text}",
        **({"images": ["photo"]} if images else {}),
    }
    return write_job(tmp_path, rows, base_url, prompt=prompt, **overrides)


def test_image_tokens_are_prompt_tokens_priced_as_usual(tmp_path: Path, simulator: RunningSimulator) -> None:
    sizes = [(1024, 1024), (256, 256), (600, 300), (3000, 1000)]
    without = image_job(tmp_path / "text", simulator.base_url, sizes, images=False)
    with_images = image_job(tmp_path / "images", simulator.base_url, sizes)

    assert invoke("run", str(without), "-q").exit_code == 0
    assert invoke("run", str(with_images), "-q").exit_code == 0

    text, out = read_output(without), read_output(with_images)
    added = [image_tokens(*size, None) for size in sizes]
    assert added == [765, 255, 425, 1445]  # 3000 x 1000: 2048 x 683, 8 tiles
    assert (out["prompt_tokens"] - text["prompt_tokens"]).to_list() == added
    price = job_price(load_job(with_images))
    assert price is not None
    for row in out.iter_rows(named=True):
        assert row["cost_usd"] == pytest.approx(price.cost(row["prompt_tokens"], 0, row["completion_tokens"]))


def estimate_lines(job: Path, *args: str) -> list[str]:
    result = invoke("estimate", str(job), *args)
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_an_estimate_before_any_row_says_images_are_left_out(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = image_job(tmp_path, simulator.base_url, [(512, 512)] * 6)
    text_only = image_job(tmp_path / "text", simulator.base_url, [(512, 512)] * 6, images=False)

    lines = estimate_lines(job)

    assert lines[3] == (
        "images: 6 in the rows to do, not estimated until rows are measured: a pilot of sample rows "
        "(--sample N) measures their tokens, or pricing.per_image prices them"
    )
    assert lines[-1].endswith("; images not included")
    assert lines[-1].removesuffix("; images not included") == estimate_lines(text_only)[-1]
    assert simulator.stats.requests == 0


def test_pricing_per_image_prices_each_image_in_every_figure(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = image_job(tmp_path, simulator.base_url, [(512, 512)] * 6, pricing={"per_image": 0.002})
    text_only = image_job(tmp_path / "text", simulator.base_url, [(512, 512)] * 6, images=False)

    lines = estimate_lines(job)
    estimate_lines(text_only)
    saved = json.loads((tmp_path / "out" / "result.parquet.estimate.json").read_text())
    plain = json.loads((tmp_path / "text" / "out" / "result.parquet.estimate.json").read_text())

    assert lines[3] == "images: 6 in the rows to do at $0.002 each (pricing.per_image): $0.0120"
    assert "list price, genai-prices" in lines[4]  # per_image alone keeps the list price of tokens
    for figure in ("low", "expected", "high", "worst"):
        assert saved["job"][figure] == pytest.approx(plain["job"][figure] + 0.012)
    assert saved["images"] == 6 and saved["images_estimated"] is True


def test_a_pilot_measures_the_images_tokens(tmp_path: Path, simulator: RunningSimulator) -> None:
    """Rows of 0, 1 and 2 images of 765 tokens each, with texts of several lengths: the pilot
    tells the images' tokens from the text's, and the run costs what it projected."""
    rows = article_rows(60)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(picture((1024, 1024)))
    for i, row in enumerate(rows):
        row["text"] = row["text"] + " More words." * (i % 7)
        row["photos"] = ["photos/a.png"] * (i % 3)  # a list of paths: JSON lines, not CSV
    pl.DataFrame(rows).write_ndjson(tmp_path / "input.jsonl")
    prompt = {"user": "{title}\n\n{text}", "images": ["photos"]}
    job = write_job(
        tmp_path, [], simulator.base_url, input={"path": "input.jsonl", "id_column": "id"}, prompt=prompt
    )

    lines = estimate_lines(job, "--sample", "20", "--yes")
    run = invoke("run", str(job))

    assert run.exit_code == 0, run.output
    shown = next(line for line in lines if line.startswith("prompt tokens:"))
    per_image = float(shown.split(" images at ")[1].split(" tokens each")[0].replace(",", ""))
    assert per_image == pytest.approx(765, rel=0.05)
    report = json.loads((tmp_path / "out" / "result.parquet.report.json").read_text())
    assert abs(report["cost_usd"]["actual_vs_expected_pct"]) < 5


# --- the budget


@pytest.mark.parametrize(
    ("max_side", "tokens"),
    [(None, 85 + 170 * 16), (4096, 2805), (2048, 2805), (1000, 765), (512, 255), (16, 255)],
)
def test_the_budget_counts_an_image_at_the_tile_rule_over_its_largest_square(
    max_side: int | None, tokens: int
) -> None:
    assert image_tokens_ceiling(max_side) == tokens


def test_the_ceiling_counts_every_image_part_beside_the_bodys_bytes() -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "sha256:00"}}]
    body = {"model": "m", "messages": [{"role": "user", "content": [*parts, parts[1]]}]}

    assert prompt_tokens_ceiling(body, 2805) == prompt_tokens_ceiling(body) + 2 * 2805
    assert prompt_tokens_ceiling(body) == len(json.dumps(body, separators=(",", ":")))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 20_000),
    st.integers(1, 20_000),
    st.sampled_from([None, "low", "high", "auto"]),
    st.one_of(st.none(), st.integers(1, 5000)),
)
def test_no_image_the_simulator_bills_passes_the_budgets_worst_case(
    width: int, height: int, detail: str | None, max_side: int | None
) -> None:
    if max_side is not None:  # images.max_side resized it: its longer side is at most max_side
        scale = min(1.0, max_side / max(width, height))
        width, height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    assert image_tokens(width, height, detail) <= image_tokens_ceiling(max_side)


def test_a_budget_is_not_passed_by_image_rows(tmp_path: Path, simulator: RunningSimulator) -> None:
    """Each row is a short text and a 1024 x 1024 image: ~790 prompt tokens, of which its body's
    bytes say ~200. Counted by its bytes alone, 8 rows in flight near the limit would pass it."""
    pricing = {"input_per_million": 1000, "output_per_million": 1000}
    budget = {"max_cost_usd": 20.0}
    job = image_job(tmp_path, simulator.base_url, [(1024, 1024)] * 60, pricing=pricing, budget=budget)

    stopped = invoke("run", str(job))

    assert stopped.exit_code == 3, stopped.output
    out = read_output(job)
    assert out["prompt_tokens"].min() > 765
    assert 0 < out["cost_usd"].sum() <= 20.0
    assert (out["status"] == "pending").any()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 5000), st.integers(0, 3), st.integers(1, 10_000)), min_size=1, max_size=30
    ),
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 3)), min_size=1, max_size=30),
    st.one_of(st.none(), st.floats(0, 0.1)),
)
def test_an_estimate_is_ordered_low_expected_high_worst(
    observed: list[tuple[int, int, int]], to_do: list[tuple[int, int]], per_image: float | None
) -> None:
    """Whatever the finished rows measured, with or without images."""
    price = list_price("grok-4.3")
    seen = Observed(Rows(), array("q"), array("q", [40] * len(observed)), 0)
    for chars, images, tokens in observed:
        seen.prompts.add(chars, images)
        seen.prompt_tokens.append(tokens)
    rows = Rows()
    for chars, images in to_do:
        rows.add(chars, images)

    estimate = _project(len(to_do), 0, 0, 0, rows, Rows(), seen, 60, price, 0.0, image_usd=per_image)

    costs = [s.cost_usd for s in (estimate.low, estimate.expected, estimate.high, estimate.worst)]
    assert all(c is not None for c in costs)
    assert costs == sorted(costs)  # type: ignore[type-var]
    tokens = [s.prompt_tokens for s in (estimate.low, estimate.expected, estimate.high)]
    assert tokens == sorted(tokens) and estimate.expected.prompt_tokens >= 0
