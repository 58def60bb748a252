"""Prices, and what one request costs.

List prices come from the table bundled with the `genai-prices` package, and only from it: its
network updater is never started, so a cost is the same offline and on every machine with the
same package version. A job can replace them with its own rates or take a discount off them
(`pricing:` in the job file; RelayDance bills below list).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from batchrun.errors import BatchrunError
from batchrun.job import BATCH_DISCOUNT, JobSpec
from batchrun.prompts import image_count

if TYPE_CHECKING:  # genai-prices is imported when a price is first looked up: it takes 0.2 s
    from genai_prices.data_snapshot import DataSnapshot
    from genai_prices.types import TieredPrices

PER_MILLION = 1_000_000
# Without params.max_tokens nothing bounds an answer; the budget and the estimate's worst case
# assume this many output tokens per request, and say so.
ASSUMED_MAX_OUTPUT_TOKENS = 8192
BATCH_CONTEXT = {"processing": "batch"}  # genai-prices' price variant of a provider batch
# The budget's worst case for one image: OpenAI's tile rule (85 tokens, and 170 per 512 x 512
# tile) over a square of the longest side an image can be sent with, not scaled down as the rule
# scales it: images.max_side, or 2048, the side the rule fits every image into. 2,805 tokens,
# where the rule itself bills at most 1,445.
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
IMAGE_TILE = 512
IMAGE_SIDE = 2048


@dataclass(frozen=True)
class Rates:
    """USD per million tokens."""

    input: float
    cached_input: float
    output: float

    def scaled(self, factor: float) -> Rates:
        return Rates(self.input * factor, self.cached_input * factor, self.output * factor)


@dataclass(frozen=True)
class Price:
    """A model's rates, by prompt size.

    A tier `(start, rates)` applies to the whole request once its prompt has more than `start`
    tokens (genai-prices' rule; grok-4.3's higher tier starts at 199,999, i.e. 200k or more).
    """

    tiers: tuple[tuple[int, Rates], ...]  # ascending; the first starts at 0
    source: str  # where the rates come from, for people: "list price (genai-prices 0.2.3)"

    def rates(self, prompt_tokens: float) -> Rates:
        chosen = self.tiers[0][1]
        for start, rates in self.tiers[1:]:
            if prompt_tokens > start:
                chosen = rates
        return chosen

    def cost(self, prompt_tokens: float, cached_tokens: float, output_tokens: float) -> float:
        """USD for one request; cached prompt tokens are part of `prompt_tokens` (fractional
        token counts are for projections)."""
        rates = self.rates(prompt_tokens)
        cached = min(cached_tokens, prompt_tokens)
        return (
            (prompt_tokens - cached) * rates.input
            + cached * rates.cached_input
            + output_tokens * rates.output
        ) / PER_MILLION

    def less(self, fraction: float, why: str = "") -> Price:
        """These rates less `fraction` of them (0.3: 30% off)."""
        factor = 1 - fraction
        tiers = tuple((start, rates.scaled(factor)) for start, rates in self.tiers)
        return Price(tiers, f"{self.source} less {fraction:.0%}{why}")

    def describe(self) -> str:
        """The base rates and where they come from, in one line."""
        base = self.tiers[0][1]
        more = f"; more from {self.tiers[1][0] + 1:,} prompt tokens" if len(self.tiers) > 1 else ""
        return (
            f"{_usd(base.input)} in, {_usd(base.cached_input)} cached in, {_usd(base.output)} out per "
            f"million tokens{more} ({self.source})"
        )


def _usd(rate: float) -> str:
    return f"${rate:.2f}" if round(rate, 2) == rate else f"${rate:g}"


def billed_output_tokens(
    prompt_tokens: int | None, completion_tokens: int | None, total_tokens: int | None
) -> int | None:
    """Output tokens to bill: reasoning tokens included, however the endpoint counts them.

    OpenAI counts reasoning inside `completion_tokens`; xAI reports it beside them, in `total_tokens`
    only. `total - prompt` is right under both; without a total, `completion_tokens` is all we have.
    """
    if total_tokens is not None and prompt_tokens is not None:
        return max(total_tokens - prompt_tokens, completion_tokens or 0)
    return completion_tokens


def request_cost(
    price: Price | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    total_tokens: int | None,
    cached_tokens: int | None,
) -> float | None:
    """One answered request's cost from its own usage; None without a price or a usage report."""
    output = billed_output_tokens(prompt_tokens, completion_tokens, total_tokens)
    if price is None or prompt_tokens is None or output is None:
        return None
    return price.cost(prompt_tokens, cached_tokens or 0, output)


def prompt_tokens_ceiling(body: dict[str, Any], image_tokens: int = 0) -> int:
    """More prompt tokens than a request can be billed for: the bytes of its body as JSON, and
    `image_tokens` for each of its images (`image_tokens_ceiling`).

    A token covers at least one byte of text in byte-level BPE tokenizers, and the JSON (role
    names, quotes, braces) outweighs the few framing tokens each message adds; tools and
    response_format schemas, billed as prompt too, are in the body. An image is in the body
    unread (a reference, or a URL), so its bytes say nothing of its tokens.
    """
    images = image_count(body["messages"]) if image_tokens else 0
    return len(orjson.dumps(body)) + images * image_tokens


def image_tokens_ceiling(max_side: int | None) -> int:
    """The prompt tokens the budget counts for one image: see IMAGE_BASE_TOKENS."""
    side = min(max_side or IMAGE_SIDE, IMAGE_SIDE)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * math.ceil(side / IMAGE_TILE) ** 2


def image_price(spec: JobSpec) -> float | None:
    """USD per image for estimates made before any row is answered: the job's pricing.per_image.
    The bundled price table has no per-image price for chat models (it prices image tokens, for
    image models), so there is no list price to fall back to."""
    return spec.pricing.per_image if spec.pricing is not None else None


def output_tokens_cap(params: dict[str, Any]) -> int | None:
    """The most output tokens the request asks for, if it says."""
    cap = params.get("max_completion_tokens", params.get("max_tokens"))
    return cap if isinstance(cap, int) else None


def job_price(spec: JobSpec) -> Price | None:
    """The price of the job's model: the job's own rates, else the list price less any discount.

    None when the model is not in the price table and the job gives no rates: a cost is then
    unknown (null), never guessed.
    """
    pricing = spec.pricing
    if pricing is not None and pricing.input_per_million is not None:
        assert pricing.output_per_million is not None  # the job schema requires both
        cached = pricing.cached_input_per_million
        rates = Rates(
            pricing.input_per_million,
            pricing.input_per_million if cached is None else cached,
            pricing.output_per_million,
        )
        return Price(((0, rates),), "the job's pricing")
    listed = list_price(spec.model)
    if listed is None or pricing is None or not pricing.discount:
        return listed
    return listed.less(pricing.discount)


def batch_price(spec: JobSpec) -> Price | None:
    """What a request sent in a provider batch costs: the bundled table's batch rate for the
    model where it has one (less the job's discount), else the job's price less
    pricing.batch_discount (the job's own rates are taken as its online rates)."""
    pricing = spec.pricing
    own_rates = pricing is not None and pricing.input_per_million is not None
    listed = None if own_rates else list_price(spec.model, batch=True)
    if listed is not None:
        return listed.less(pricing.discount) if pricing is not None and pricing.discount else listed
    price = job_price(spec)
    discount = pricing.batch_discount if pricing is not None else BATCH_DISCOUNT
    return None if price is None else price.less(discount, " (batch)")


@functools.cache
def list_price(model: str, batch: bool = False) -> Price | None:
    """The list price in force today for `model`, from the bundled table; None if unlisted.
    `batch`: its rate in a provider batch, None where the table has no such rate.

    The table is a 1.6 MB Python module: loading it takes ~0.1 s of CPU and ~17 MB, most of a
    short run's price. So what it says of a model is kept in the user's cache folder for the
    day (UTC) and the package version it was read with (`_PriceCache`)."""
    cache = _PriceCache()
    key = f"{model} {'batch' if batch else 'online'}"
    if (tiers := cache.get(key)) is not None:
        return _from_tiers(tiers, batch)
    price = _table_price(model, batch)
    cache.put(key, [] if price is None else [[start, *dataclasses.astuple(r)] for start, r in price.tiers])
    return price


def _from_tiers(tiers: list[list[float]], batch: bool) -> Price | None:
    if not tiers:
        return None
    return Price(tuple((int(start), Rates(*rates)) for start, *rates in tiers), _list_source(batch))


def _list_source(batch: bool) -> str:
    return f"{'list batch price' if batch else 'list price'}, genai-prices {_table_version()}"


@functools.cache
def _table_version() -> str:
    """genai-prices' version: read from the installed packages' metadata, ~1 ms each time."""
    return version("genai-prices")


class _PriceCache:
    """`list_price`'s answers for today, in `$XDG_CACHE_HOME/batchrun/list-prices.json`
    (`~/.cache/...` without it): a file any batchrun of the same genai-prices version may read
    and replace whole (atomically), and that a reader may find missing, stale, unreadable or
    not JSON, when it is read from the table again."""

    def __init__(self) -> None:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        self._path = Path(root) / "batchrun" / "list-prices.json"
        self._stamp = [_table_version(), datetime.now(UTC).date().isoformat()]
        self._prices: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            held = orjson.loads(self._path.read_bytes())
            if (
                isinstance(held, dict)
                and held.get("stamp") == self._stamp
                and isinstance(held.get("prices"), dict)
            ):
                self._prices = held["prices"]

    def get(self, key: str) -> list[list[float]] | None:
        """The tiers kept for `key` ([] for a model the table does not price), or None."""
        tiers = self._prices.get(key)
        valid = isinstance(tiers, list) and all(
            isinstance(t, list) and len(t) == 4 and all(type(x) in (int, float) for x in t) for t in tiers
        )
        return tiers if valid else None

    def put(self, key: str, tiers: list[list[float]]) -> None:
        from batchrun.output import write_atomically

        self._prices[key] = tiers
        content = orjson.dumps({"stamp": self._stamp, "prices": self._prices})
        with contextlib.suppress(BatchrunError):  # a home that cannot be written: read again next time
            write_atomically(self._path, lambda temp: temp.write_bytes(content))


def _table_price(model: str, batch: bool) -> Price | None:
    """`list_price` read from the table itself."""
    try:
        _, info = _bundled_table().find_provider_model(model, None, None, None)
    except LookupError:
        return None
    now = datetime.now(UTC)
    if batch and not any(
        variant.when == BATCH_CONTEXT and (variant.constraint is None or variant.constraint.active(now))
        for variant in info.price_variants or ()
    ):
        return None
    prices = info.get_prices(now, BATCH_CONTEXT if batch else None)
    inputs, outputs = prices.input_mtok, prices.output_mtok
    if inputs is None or outputs is None:  # not priced per token (images, audio...)
        return None
    cached = prices.cache_read_mtok or inputs
    starts = sorted(
        {t.start for p in (inputs, cached, outputs) if not isinstance(p, Decimal) for t in p.tiers}
    )
    tiers = tuple(
        (start, Rates(_at(inputs, start), _at(cached, start), _at(outputs, start))) for start in (0, *starts)
    )
    return Price(tiers, _list_source(batch))


def _at(price: Decimal | TieredPrices, start: int) -> float:
    """The rate of `price` for a prompt of more than `start` tokens."""
    if isinstance(price, Decimal):
        return float(price)
    rate = price.base
    for tier in price.tiers:  # ascending
        if tier.start <= start:
            rate = tier.price
    return float(rate)


@functools.cache
def _bundled_table() -> DataSnapshot:
    """The price table shipped in the package; genai_prices.calc_price would use an updated one
    if anything in the process had started its updater."""
    from genai_prices import data
    from genai_prices.data_snapshot import DataSnapshot

    return DataSnapshot(providers=data.providers, from_auto_update=False)
