"""`deploykit size` and `deploykit cost`: the model's numbers from the local copy or the catalog, the market
data (shipped and the user's), this machine's CPU when asked for, a load test's calibration, and the warnings
on old prices; the arithmetic is in loadtests.sizing and loadtests.cost."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deploykit.errors import DeploykitError, UnknownModelError, UsageError
from deploykit.loadtests.cost import CostReport, compare
from deploykit.loadtests.metrics import parse_slos
from deploykit.loadtests.sizing import HardwareByName, Sizing, Workload, calibrate, nearest_feasible_hint, size
from deploykit.models.catalog import Catalog
from deploykit.models.config import ModelConfig, read_model_config
from deploykit.models.prices import Prices, Provisioned, ServicePrice, Sourced, stale_summary
from deploykit.models.store import ModelStore


@dataclass(frozen=True)
class Load:
    """The traffic as the user gives it: a request rate, or tokens a day."""

    rps: float | None
    tokens_per_day: float | None
    input_tokens: int
    output_tokens: int
    slo: str = ""

    def workload(self) -> Workload:
        if (self.rps is None) == (self.tokens_per_day is None):
            raise UsageError("Give the load as exactly one of --rps or --tokens-per-day.", "For example --rps 5.")
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise UsageError("--input-tokens and --output-tokens must be at least 1.")
        slos = tuple(parse_slos(self.slo))
        if self.rps is not None:
            return Workload(self.rps, self.input_tokens, self.output_tokens, slos)
        assert self.tokens_per_day is not None
        base = Workload.from_tokens_per_day(self.tokens_per_day, self.input_tokens, self.output_tokens)
        return Workload(base.rps, base.input_tokens, base.output_tokens, slos)


def model_config(name: str, store: ModelStore, catalog: Catalog) -> ModelConfig:
    """A local copy's config.json, else the catalog's architecture numbers (no download, no hub)."""
    local = store.find(name)
    if local is not None:
        return read_model_config(local.path)
    entry = catalog.find(name)
    if entry is None:
        raise UnknownModelError(name, [*store.aliases(), *catalog.aliases()])
    return entry.config()


def size_model(
    name: str,
    config: ModelConfig,
    load: Load,
    prices: Prices,
    *,
    hardware: list[str] | None = None,
    from_loadtest: Path | None = None,
    measured_on: str | None = None,
    provider: str | None = None,
    max_utilization: float = 0.8,
    today: dt.date | None = None,
) -> Sizing:
    """Rank the hardware options for `load`; raises with the nearest feasible option when none fits."""
    w = load.workload()
    by_name = HardwareByName(prices)
    devices = [by_name[n] for n in hardware or list(prices.gpus)]
    cal = calibrate(from_loadtest, name, config, by_name, measured_on) if from_loadtest else None
    if cal is not None and cal.hardware not in {d.name for d in devices}:
        devices.append(by_name[cal.hardware])  # the calibrated hardware is always among the options
    sizing = size(name, config, w, devices, prices, max_utilization=max_utilization, calibration=cal, provider=provider)
    if not sizing.options:
        raise DeploykitError(
            f"No hardware option serves {name} at {w.rps:g} requests/s within the SLO.",
            nearest_feasible_hint(sizing),
        )
    used: list[Sourced] = [o.price for o in sizing.options if o.price is not None]
    sizing.warnings += stale_summary(used, today or dt.date.today())
    return sizing


def cost_model(
    name: str,
    config: ModelConfig,
    load: Load,
    prices: Prices,
    compare_with: list[str],
    utilization: float,
    *,
    today: dt.date | None = None,
    **size_options: Any,
) -> tuple[CostReport, list[ServicePrice | Provisioned]]:
    """Self-hosting sized for the load's peaks (the mean over `utilization`) against each managed offer at
    the mean load."""
    offers = [prices.offer(n) for n in compare_with]  # an unknown name fails before any work
    if not 0 < utilization <= 1:
        raise UsageError(f"--utilization {utilization} is not in (0, 1].", "For example --utilization 0.5.")
    mean = load.workload()
    peak = replace(load, rps=mean.rps / utilization, tokens_per_day=None)
    sizing = size_model(name, config, peak, prices, max_utilization=1.0, today=today, **size_options)
    report = compare(sizing, prices, offers, utilization, mean)
    used: list[Sourced] = [*offers, *([prices.power] if prices.power else [])]
    for s in report.self_hosted:
        used += [p for p in (s.option.price, *prices.prices_for(s.option.hardware.name, "buy")[:1]) if p]
    report.warnings = stale_summary(used, today or dt.date.today())
    return report, offers
