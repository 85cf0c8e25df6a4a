"""Prices and costs: what a result cost at batch price, and what it would have cost in real time.

Prices are USD per million tokens at the real-time (synchronous API) price; each provider profile
has a batch discount (0.5 by default), so batch cost = real-time cost × discount. A model without
a price is "unpriced": its cost is None, never zero.

Token vocabulary (see formats.usage_of): `input_tokens` counts every input token, including
cached reads and cache writes; `cached_input_tokens` and `cache_creation_input_tokens` say how
many of them were cache reads and writes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelPrice(BaseModel):
    """`[prices."MODEL"]`: USD per million tokens at real-time price."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(default=0.0, ge=0)
    cached_input: float | None = Field(default=None, ge=0)  # default: the input price
    cache_write: float | None = Field(default=None, ge=0)  # default: the input price


def _price(input_: float, cached: float, output: float, cache_write: float | None = None) -> ModelPrice:
    return ModelPrice(input=input_, cached_input=cached, output=output, cache_write=cache_write)


# Shipped defaults: public list prices for real-time calls, USD per million tokens. The config's
# [prices] table adds to and overrides these; check them against your own contract.
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-5": _price(1.25, 0.125, 10.0),
    "gpt-5-mini": _price(0.25, 0.025, 2.0),
    "gpt-5-nano": _price(0.05, 0.005, 0.40),
    "gpt-4.1": _price(2.0, 0.50, 8.0),
    "gpt-4.1-mini": _price(0.40, 0.10, 1.60),
    "gpt-4.1-nano": _price(0.10, 0.025, 0.40),
    "gpt-4o": _price(2.50, 1.25, 10.0),
    "gpt-4o-mini": _price(0.15, 0.075, 0.60),
    "o3": _price(2.0, 0.50, 8.0),
    "o4-mini": _price(1.10, 0.275, 4.40),
    "text-embedding-3-small": _price(0.02, 0.02, 0.0),
    "text-embedding-3-large": _price(0.13, 0.13, 0.0),
    "text-embedding-ada-002": _price(0.10, 0.10, 0.0),
    "omni-moderation-latest": _price(0.0, 0.0, 0.0),
    "claude-opus-4-5": _price(5.0, 0.50, 25.0, 6.25),
    "claude-opus-4-1": _price(15.0, 1.50, 75.0, 18.75),
    "claude-opus-4": _price(15.0, 1.50, 75.0, 18.75),
    "claude-sonnet-4-5": _price(3.0, 0.30, 15.0, 3.75),
    "claude-sonnet-4": _price(3.0, 0.30, 15.0, 3.75),
    "claude-3-7-sonnet": _price(3.0, 0.30, 15.0, 3.75),
    "claude-haiku-4-5": _price(1.0, 0.10, 5.0, 1.25),
    "claude-3-5-haiku": _price(0.80, 0.08, 4.0, 1.0),
}


# Not frozen: one is made per result line, and a frozen dataclass takes about 5x as long to make.
@dataclass(slots=True)
class Cost:
    """USD for one result."""

    batch: float
    realtime: float
    # What was actually paid: the batch price for a batch answer (None), the real-time (or flex)
    # price for the deadline fallback's answer.
    paid_price: float | None = None

    @property
    def paid(self) -> float:
        return self.batch if self.paid_price is None else self.paid_price

    def as_json(self) -> dict[str, Any]:
        return {"currency": "USD", "batch": self.batch, "realtime": self.realtime, "paid": self.paid}


FLEX = "flex"


def served_cost(cost: Cost, tier: str) -> Cost:
    """A real-time answer priced at what was paid for it: the real-time price on the standard tier;
    the batch price when OpenAI's flex tier answered (OpenAI bills flex processing at its Batch API
    rates, so the profile's batch_discount applies). `batch` and `realtime` keep their meaning
    (what a batch would have cost, what real time costs), whatever the tier."""
    paid = cost.batch if tier == FLEX else cost.realtime
    return Cost(batch=cost.batch, realtime=cost.realtime, paid_price=paid)


UNPRICED: dict[str, Any] = {"currency": "USD", "batch": None, "realtime": None, "paid": None, "unpriced": True}


class PriceTable:
    """Looks up a model's price: exact name, then glob patterns, then a dated variant's base name."""

    def __init__(self, prices: dict[str, ModelPrice], use_defaults: bool = True) -> None:
        self.prices = {**(DEFAULT_PRICES if use_defaults else {}), **prices}

    def lookup(self, model: str) -> ModelPrice | None:
        if model in self.prices:
            return self.prices[model]
        for pattern, price in self.prices.items():
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(model, pattern):
                return price
        # "gpt-4o-mini-2024-07-18" and "claude-sonnet-4-5-20250929" are priced as their base model.
        candidates = [name for name in self.prices if model.startswith(name + "-")]
        return self.prices[max(candidates, key=len)] if candidates else None

    def cost_of(self, model: str, discount: float) -> Callable[[dict[str, int] | None], Cost | None]:
        """`cost` for one model, its price looked up once (a batch's results all share their model)."""
        price = self.lookup(model)
        if price is None:
            return _unpriced
        return partial(_priced, price, discount)

    def cost(self, model: str, usage: dict[str, int] | None, discount: float) -> Cost | None:
        """The cost of one result, or None when the model has no price (or there is no usage)."""
        price = self.lookup(model)
        if price is None or usage is None:
            return None
        return realtime_and_batch(price, usage, discount)


def _unpriced(usage: dict[str, int] | None) -> Cost | None:
    return None


def _priced(price: ModelPrice, discount: float, usage: dict[str, int] | None) -> Cost | None:
    return None if usage is None else realtime_and_batch(price, usage, discount)


def realtime_and_batch(price: ModelPrice, usage: dict[str, int], discount: float) -> Cost:
    cached = usage.get("cached_input_tokens", 0)
    writes = usage.get("cache_creation_input_tokens", 0)
    plain = max(usage.get("input_tokens", 0) - cached - writes, 0)
    realtime = (
        plain * price.input
        + cached * (price.input if price.cached_input is None else price.cached_input)
        + writes * (price.input if price.cache_write is None else price.cache_write)
        + usage.get("output_tokens", 0) * price.output
    ) / 1_000_000
    return Cost(batch=round(realtime * discount, 12), realtime=round(realtime, 12))
