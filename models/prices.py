"""Managed pay-as-you-go prices: the dated, sourced data file shipped with deploykit, plus the user's own."""

from __future__ import annotations

import datetime as dt
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from deploykit.errors import DeploykitError, NotFoundError

STALE_AFTER_DAYS = 90


class ServicePrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    provider: str
    input_per_mtok: float  # USD per million prompt tokens
    output_per_mtok: float  # USD per million completion tokens
    as_of: dt.date
    source: str
    confidence: Literal["official", "third_party", "derived"]

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6

    def age_days(self, today: dt.date) -> int:
        return (today - self.as_of).days


class _PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: list[ServicePrice] = []


class Prices:
    def __init__(self, services: list[ServicePrice]) -> None:
        self.by_name = {s.name: s for s in services}

    def find(self, name: str) -> ServicePrice:
        price = self.by_name.get(name)
        if price is None:
            known = ", ".join(sorted(self.by_name))
            raise NotFoundError(
                f"No price for '{name}'.",
                f"Known: {known}. Add your own to $DEPLOYKIT_HOME/prices.toml ([[service]] entries, as in the "
                "shipped models/prices.toml).",
            )
        return price

    def stale(self, names: list[str], today: dt.date) -> list[ServicePrice]:
        """The named entries older than STALE_AFTER_DAYS."""
        return [p for n in names if (p := self.find(n)).age_days(today) > STALE_AFTER_DAYS]


def load_prices(user_file: Path | None = None) -> Prices:
    """The shipped prices, with the user's file (if it exists) adding entries or replacing them by name."""
    shipped = resources.files("deploykit.models").joinpath("prices.toml").read_text()
    services = _parse(shipped, "the shipped price data")
    if user_file is not None and user_file.exists():
        services += _parse(user_file.read_text(), str(user_file))
    return Prices(services)


def _parse(text: str, where: str) -> list[ServicePrice]:
    try:
        return _PriceFile.model_validate(tomllib.loads(text)).service
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise DeploykitError(f"The prices in {where} are invalid: {e}", "Fix the file, or move it away.") from e
