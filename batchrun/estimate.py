"""What the rows still to do will cost, before they are sent.

Prompt tokens are estimated from the rendered prompts' characters: at a ratio learned from the
finished rows' reported usage when there are some, else at a stated default (Grok's tokenizer is
not public, so a calibrated ratio beats a wrong exact count). A row's images are measured the same
way, as tokens per image fitted beside the ratio; before any row is answered they are priced at
the job's pricing.per_image, or left out and said to be. Output tokens come from the finished
rows' answers, else from max_tokens. Low and high are a 90% range of the projection: the spread
of the finished rows, scaled to the rows to do, and the uncertainty of their average.
"""

from __future__ import annotations

import math
import random
import statistics
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from batchrun.checkpoint import Checkpoint, Fingerprint, without_input_hash
from batchrun.cost import (
    ASSUMED_MAX_OUTPUT_TOKENS,
    Price,
    batch_price,
    billed_output_tokens,
    image_price,
    job_price,
    output_tokens_cap,
)
from batchrun.display import Shown
from batchrun.plan import SIMULATED_ENDPOINT, PreparedJob, read_checkpoint
from batchrun.prompts import image_count, text_length
from batchrun.report import fingerprint_digest, write_json
from batchrun.sources import ROW

DEFAULT_CHARS_PER_TOKEN = 4.0  # English prose in GPT-style tokenizers; used until rows are measured
UNMEASURED_OUTPUT_SHARE = 0.5  # expected answer length, as a share of max_tokens, until measured
Z_90 = 1.645  # a two-sided 90% normal range
PILOT_SEED = 5  # a pilot is random but reproducible


@dataclass
class Rows:
    """Rendered prompts, a row each: their characters of text and their images."""

    chars: array[int] = field(default_factory=lambda: array("q"))
    images: array[int] = field(default_factory=lambda: array("q"))

    def add(self, chars: int, images: int) -> None:
        self.chars.append(chars)
        self.images.append(images)

    def __len__(self) -> int:
        return len(self.chars)


@dataclass
class Observed:
    """The finished rows' usage: what a projection rests on."""

    prompts: Rows  # per finished row with a usage report: its rendered prompt
    prompt_tokens: array[int]  # ... and the prompt tokens it was billed for
    output_tokens: array[int]
    cached_tokens: int


@dataclass(frozen=True)
class PromptModel:
    """A row's prompt tokens: its characters at `chars_per_token` and each image at
    `image_tokens`; images not measured (None) cost `image_usd` each, when it is known."""

    chars_per_token: float
    image_tokens: float | None = None
    image_usd: float | None = None

    def tokens(self, chars: int, images: int) -> float:
        return chars / self.chars_per_token + images * (self.image_tokens or 0.0)

    def image_cost(self, images: int) -> float:
        """What the images cost beside the tokens: only those priced per image."""
        return images * (self.image_usd or 0.0) if self.image_tokens is None else 0.0


@dataclass(frozen=True)
class Scenario:
    prompt_tokens: int
    output_tokens: int
    cost_usd: float | None


@dataclass(frozen=True, repr=False)
class Estimate(Shown):
    """What the rows still to do should cost: low, expected, high and worst case, and what the
    projection rests on. Shown as lines (repr) and as a table in a notebook."""

    total_rows: int
    to_do: int
    done: int
    spent_usd: float | None
    done_prompt_tokens: int
    done_output_tokens: int
    prompt_chars: int
    chars_per_token: float
    observed: int  # rows the projection rests on; 0: uncalibrated
    output_cap: int
    cap_assumed: bool  # params.max_tokens unset
    low: Scenario
    expected: Scenario
    high: Scenario
    worst: Scenario
    price: Price | None
    images: int = 0  # in the rows to do
    image_tokens: float | None = None  # per image, measured on the finished rows
    image_usd: float | None = None  # per image (pricing.per_image), while images are not measured
    ratio_measured: bool = True  # False: chars_per_token is the default (rows to measure it lacked)
    again_rows: int = 0  # of the rows to do, those the last run finished (the job changed since)
    again: Scenario | None = None  # what sending them again is expected to cost
    again_worst: Scenario | None = None
    batch_price: Price | None = None  # a row's in batch mode (batch-mode.md)
    batch: tuple[Scenario, ...] = ()  # low, expected, high and worst case at the batch price

    def resend(self) -> str:
        """What the job's change would send again, for the question and the error that ask."""
        rows = f"{self.again_rows:,} finished {'row' if self.again_rows == 1 else 'rows'}"
        if self.again is None or self.again.cost_usd is None or self.again_worst is None:
            return f"{rows} would be sent again (cost unknown: the model has no price)"
        return (
            f"{rows} would be sent again, expected to cost ${self.again.cost_usd:.4f} "
            f"(at most ${self.again_worst.cost_usd:.4f})"
        )

    def title(self) -> str:
        return "Estimate"

    def figures(self) -> list[str]:
        """The estimate, for people (as `batchrun estimate` prints it)."""
        done = ""
        if self.done:
            spent = f", ${self.spent_usd:.4f} spent" if self.spent_usd is not None else ""
            done = f" ({self.done} done{spent})"
        cap = f"max_tokens {self.output_cap:,}" + (
            " assumed: params.max_tokens is unset" if self.cap_assumed else ""
        )
        if self.observed:
            basis = f"calibrated on {self.observed} finished rows"
            per_row = self.expected.output_tokens / max(self.to_do, 1)
            output_basis = f"{per_row:.1f} per row, observed over {self.observed} finished rows"
        else:
            basis = "uncalibrated default; a pilot of sample rows measures it"
            output_basis = "assumed: half of max_tokens, until rows are measured"
        images, default = "", ""
        if self.observed and not self.ratio_measured:  # text and images in one proportion
            default = "the default "
        if self.images and self.image_tokens is not None:
            images = f" and {self.images:,} images at {self.image_tokens:,.0f} tokens each"
        lines = [
            f"rows: {self.to_do:,} to do of {self.total_rows:,}{done}",
            f"prompt tokens: {self.expected.prompt_tokens:,} estimated ({self.prompt_chars:,} characters "
            f"at {default}{self.chars_per_token:.2f} per token{images}, {basis})",
            f"output tokens: {self.expected.output_tokens:,} expected ({output_basis}); "
            f"{self.worst.output_tokens:,} worst case ({cap})",
        ]
        if self.images and self.image_tokens is None:
            lines.append(self.images_line())
        if self.price is None:
            lines.append("cost: unknown: the model has no list price; set pricing: in the job")
            if self.again_rows:
                lines.append(f"the job changed since its last run: {self.resend()}")
            return lines
        lines.append(f"price: {self.price.describe()}")
        rng = " (90% range)" if self.observed else ""
        unpriced = "; images not included" if self.images_unpriced else ""
        lines.append(
            f"cost of the rows to do: low ${self.low.cost_usd:.4f}, expected ${self.expected.cost_usd:.4f}, "
            f"high ${self.high.cost_usd:.4f}{rng}; worst case ${self.worst.cost_usd:.4f}{unpriced}"
        )
        lines += self._batch_figures()
        if self.done and self.spent_usd is not None and self.expected.cost_usd is not None:
            lines.append(
                f"whole job: ${self.spent_usd + self.expected.cost_usd:.4f} expected "
                f"(${self.spent_usd:.4f} spent + ${self.expected.cost_usd:.4f} to do)"
            )
        if self.observed:
            lines.append(f"projection rests on {self.observed} finished rows")
        if self.again_rows:
            lines.append(f"the job changed since its last run: {self.resend()}")
        return lines

    def _batch_figures(self) -> list[str]:
        """The price and cost of the rows to do if sent in batch mode."""
        if self.batch_price is None or len(self.batch) != 4:
            return []
        low, expected, high, worst = (s.cost_usd or 0.0 for s in self.batch)
        rng = " (90% range)" if self.observed else ""
        unpriced = "; images not included" if self.images_unpriced else ""
        return [
            f"batch price: {self.batch_price.describe()}",
            f"cost in batch mode: low ${low:.4f}, expected ${expected:.4f}, high ${high:.4f}{rng}; "
            f"worst case ${worst:.4f}{unpriced}",
        ]

    @property
    def images_unpriced(self) -> bool:
        """Images to send that the figures leave out: neither measured nor priced per image."""
        return bool(self.images) and self.image_tokens is None and self.image_usd is None

    def images_line(self) -> str:
        """The images not measured yet: priced per image, or left out until rows are measured."""
        n = f"images: {self.images:,} in the rows to do"
        if self.image_usd is not None:
            return f"{n} at ${self.image_usd:g} each (pricing.per_image): ${self.images * self.image_usd:.4f}"
        return (
            f"{n}, not estimated until rows are measured: a pilot of sample rows (--sample N) "
            "measures their tokens, or pricing.per_image prices them"
        )

    def save(self, job: PreparedJob, fingerprint: dict[str, Any]) -> None:
        """Leave the whole-job figures beside the output, for the run report to compare with."""
        spent = self.spent_usd or 0.0

        def job_cost(s: Scenario) -> float | None:
            return None if s.cost_usd is None else round(spent + s.cost_usd, 6)

        write_json(
            job.estimate_path,
            {
                "made_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "fingerprint": fingerprint_digest(fingerprint),
                "rows_to_do": self.to_do,
                "rows_done": self.done,
                "calibrated_on": self.observed,
                "images": self.images,
                "images_estimated": not self.images_unpriced,
                "job": {
                    "low": job_cost(self.low),
                    "expected": job_cost(self.expected),
                    "high": job_cost(self.high),
                    "worst": job_cost(self.worst),
                    "prompt_tokens": self.done_prompt_tokens + self.expected.prompt_tokens,
                    "output_tokens": self.done_output_tokens + self.expected.output_tokens,
                },
            },
        )


@dataclass(frozen=True)
class Pilot:
    """A random sample of the rows still to do, sent before projecting from their usage, and its
    share of the projection's expected and worst-case cost (None without a price)."""

    rows: frozenset[int]
    expected_usd: float | None
    worst_usd: float | None
    images_unpriced: bool = False  # the pilot's images are in neither figure (Estimate.images_unpriced)


def plan_pilot(
    job: PreparedJob, made_for: tuple[Fingerprint, ...], projection: Estimate, n: int
) -> Pilot | None:
    """A pilot of N rows still to do, priced as their share of `projection`; None with none to do."""
    if not projection.to_do:
        return None
    rows = pilot_rows(job, made_for, n)
    share = len(rows) / projection.to_do

    def part(scenario: Scenario) -> float | None:
        return None if scenario.cost_usd is None else scenario.cost_usd * share

    return Pilot(
        frozenset(rows), part(projection.expected), part(projection.worst), projection.images_unpriced
    )


def pilot_rows(job: PreparedJob, made_for: tuple[Fingerprint, ...], n: int) -> list[int]:
    """N of the rows still to do, chosen at random but the same on every call (seeded)."""
    checkpoint = read_checkpoint(job, made_for)
    try:
        to_do = array("q", (r for (r,) in checkpoint.rows_without_result()))
    finally:
        checkpoint.close()
    return sorted(random.Random(PILOT_SEED).sample(to_do, min(n, len(to_do))))


_USAGE = "status, prompt_tokens, completion_tokens, total_tokens, cached_tokens"


def estimate_job(
    job: PreparedJob,
    made_for: tuple[Fingerprint, ...],
    *,
    simulate: bool | None = None,
    limit: int | None = None,
) -> Estimate:
    """Project the cost of the rows not yet finished (all rows if the job never ran, the first
    `limit` if given); the checkpoint is asked a batch at a time which rows are finished, and
    with what usage. When the job changed since the last run (its fingerprint is none of
    `made_for`), the rows to do that the last run finished are projected apart (`again`).
    `simulate`: key the requests as for --simulate (default: as the last run did)."""
    price = job_price(job.spec)
    to_do, again_rows = Rows(), Rows()
    observed = Observed(Rows(), array("q"), array("q"), 0)
    checkpoint = read_checkpoint(job, made_for, index=False)  # indexed below, batch by batch
    try:
        recorded = checkpoint.fingerprint()
        changed = recorded is not None and without_input_hash(recorded) not in made_for
        index = checkpoint.key_index(dedupe=job.spec.dedupe)
        keys = job.keys(_simulated(checkpoint) if simulate is None else simulate)
        for batch in job.keyed_batches(index, keys, limit):
            finished = index.finished(*batch.row_range, columns=_USAGE)
            again = checkpoint.last_run_finished(*batch.row_range) if changed else set()
            for row, body, first in zip(batch.rows, batch.bodies, batch.first, strict=True):
                done = finished.get(row[ROW])
                if done is None and (body is None or (job.spec.dedupe and not first)):
                    continue  # recorded `skipped`, or given its first row's answer: never sent
                if done is not None and (done[0] != "ok" or done[1] is None):
                    continue
                assert body is not None
                chars, images = text_length(body["messages"]), image_count(body["messages"])
                if done is None:
                    to_do.add(chars, images)
                    if row[ROW] in again:
                        again_rows.add(chars, images)
                    continue
                _, prompt, completion, total, cached = done
                observed.prompts.add(chars, images)
                observed.prompt_tokens.append(max(prompt, 1))
                observed.output_tokens.append(billed_output_tokens(prompt, completion, total) or 0)
                observed.cached_tokens += cached or 0
        totals = checkpoint.totals()
        spent = checkpoint.spent_usd()
        done_prompt, done_output = checkpoint.ok_usage()
    finally:
        checkpoint.close()
    return _project(
        total_rows=min(job.source.row_count, limit or job.source.row_count),
        done=totals.ok + totals.failed + totals.skipped,
        done_prompt_tokens=done_prompt,
        done_output_tokens=done_output,
        to_do=to_do,
        again=again_rows,
        observed=observed,
        cap=output_tokens_cap(job.params),
        price=price,
        image_usd=image_price(job.spec),
        spent=None if price is None else spent,
        batch=None if price is None else batch_price(job.spec),
    )


def _simulated(checkpoint: Checkpoint) -> bool:
    recorded = checkpoint.fingerprint()
    return recorded is not None and recorded.get("endpoint.base_url") == SIMULATED_ENDPOINT


def _project(
    total_rows: int,
    done: int,
    done_prompt_tokens: int,
    done_output_tokens: int,
    to_do: Rows,
    again: Rows,
    observed: Observed,
    cap: int | None,
    price: Price | None,
    spent: float | None,
    batch: Price | None = None,
    image_usd: float | None = None,
) -> Estimate:
    out_cap = cap or ASSUMED_MAX_OUTPUT_TOKENS
    n = len(observed.prompt_tokens)
    cached_share = 0.0
    if n:
        chars_per_token, image_tokens, relative_sd, ratio_measured = _fit(observed)
        model = PromptModel(chars_per_token, image_tokens, image_usd)
        cached_share = observed.cached_tokens / sum(observed.prompt_tokens)
        out_mean = statistics.fmean(observed.output_tokens)
        out_sd = statistics.stdev(observed.output_tokens) if n > 1 else 0.0
        # 90% range of a sum over `to_do` rows, per row: the average's own uncertainty
        # (it rests on n rows) plus the rows' spread around it.
        spread = Z_90 * math.sqrt(1 / n + 1 / max(len(to_do), 1))
        # Prompt tokens at these multiples of the fit's, low first; high at most 10 per character
        # (never below the fit, where the rows measured more).
        scales = (
            1 / (1 + relative_sd * spread),
            1.0,
            1 / max(1 - relative_sd * spread, min(1.0, 0.1 / chars_per_token)),
        )
        outputs = (max(out_mean - out_sd * spread, 0.0), out_mean, min(out_mean + out_sd * spread, out_cap))
    else:
        model = PromptModel(DEFAULT_CHARS_PER_TOKEN, None, image_usd)
        ratio_measured = False
        scales = (1.0, 1.0, 1.0)
        outputs = (0.0, out_cap * UNMEASURED_OUTPUT_SHARE, float(out_cap))
    low, expected, high = (
        _scenario(to_do, model, scale, o, cached_share, price)
        for scale, o in zip(scales, outputs, strict=True)
    )
    # The worst case: the high prompts, no cache, and every answer max_tokens long.
    worst = _scenario(to_do, model, scales[2], float(out_cap), 0.0, price)
    again_scenario = _scenario(again, model, 1.0, outputs[1], cached_share, price) if len(again) else None
    again_worst = _scenario(again, model, scales[2], float(out_cap), 0.0, price) if len(again) else None
    at_batch: tuple[Scenario, ...] = ()
    if batch is not None:
        at_batch = (
            *(
                _scenario(to_do, model, s, o, cached_share, batch)
                for s, o in zip(scales, outputs, strict=True)
            ),
            _scenario(to_do, model, scales[2], float(out_cap), 0.0, batch),
        )
    return Estimate(
        total_rows=total_rows,
        to_do=len(to_do),
        done=done,
        spent_usd=spent,
        done_prompt_tokens=done_prompt_tokens,
        done_output_tokens=done_output_tokens,
        prompt_chars=sum(to_do.chars),
        chars_per_token=model.chars_per_token,
        observed=n,
        output_cap=out_cap,
        cap_assumed=cap is None,
        low=low,
        expected=expected,
        high=high,
        worst=worst,
        price=price,
        images=sum(to_do.images),
        image_tokens=model.image_tokens,
        image_usd=model.image_usd,
        ratio_measured=ratio_measured,
        again_rows=len(again),
        again=again_scenario,
        again_worst=again_worst,
        batch_price=batch,
        batch=at_batch,
    )


def _fit(observed: Observed) -> tuple[float, float | None, float, bool]:
    """Characters per token and tokens per image (None: no finished row had an image) fitted to
    the finished rows' prompt tokens, the spread of the rows around the fit, relative to it, and
    whether the characters per token were measured (or are the default).

    Least squares weighted by 1 / characters, which without images is the ratio of the sums.
    Rows whose characters and images stand in one proportion cannot tell the two apart: their
    characters are then taken at the default ratio and the rest of their tokens given to images.
    """
    chars, images, tokens = observed.prompts.chars, observed.prompts.images, observed.prompt_tokens
    sum_c, sum_k, sum_t = sum(chars), sum(images), sum(tokens)
    per_char, per_image, measured = sum_t / max(sum_c, 1), None, True
    if sum_k:
        kk = sum(k * k / max(c, 1) for c, k in zip(chars, images, strict=True))
        kt = sum(k * t / max(c, 1) for c, k, t in zip(chars, images, tokens, strict=True))
        det = sum_c * kk - sum_k**2
        if det > 1e-9 * sum_c * kk:
            per_char, per_image = (sum_t * kk - sum_k * kt) / det, (sum_c * kt - sum_k * sum_t) / det
        if per_image is None or per_char <= 0:
            per_char, measured = 1 / DEFAULT_CHARS_PER_TOKEN, False
            per_image = max(0.0, (sum_t - per_char * sum_c) / sum_k)
        elif per_image < 0:
            per_char, per_image = sum_t / max(sum_c, 1), 0.0
    fitted = (c * per_char + k * (per_image or 0.0) for c, k in zip(chars, images, strict=True))
    relative = [f / t for f, t in zip(fitted, tokens, strict=True)]
    return 1 / per_char, per_image, statistics.stdev(relative) if len(relative) > 1 else 0.0, measured


def _scenario(
    rows: Rows, model: PromptModel, scale: float, output: float, cached_share: float, price: Price | None
) -> Scenario:
    """Every row at this multiple of the model's prompt tokens and this answer length; priced row
    by row, as tiers depend on each request's prompt size."""
    prompt_total = cost = 0.0
    for chars, images in zip(rows.chars, rows.images, strict=True):
        prompt = model.tokens(chars, images) * scale
        prompt_total += prompt
        if price is not None:
            cost += price.cost(prompt, prompt * cached_share, output) + model.image_cost(images)
    return Scenario(
        prompt_tokens=round(prompt_total),
        output_tokens=round(output * len(rows)),
        cost_usd=None if price is None else cost,
    )
