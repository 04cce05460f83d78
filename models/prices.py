"""The dated, sourced market data shipped with deploykit, plus the user's own: managed pay-as-you-go and
provisioned prices (prices.toml), GPU specs, GPU rental and purchase prices, vLLM's efficiency on them and
published measurements (gpus.toml), and the cost of power.

A user file ($DEPLOYKIT_HOME/prices.toml) adds entries or replaces them: services, provisioned offers and
GPUs by name, GPU prices by (gpu, provider), [power] and [efficiency] field by field. Its entries need no
source or date: they are the user's own, dated by the file.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploykit.core.errors import DeploykitError, NotFoundError

STALE_AFTER_DAYS = 90
_USER_HINT = (
    "Add your own to $DEPLOYKIT_HOME/prices.toml ([[service]], [[provisioned]], [[gpu]] or [[gpu_price]] entries, "
    "as in the shipped models/prices.toml and gpus.toml)."
)


class Sourced(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    as_of: dt.date
    source: str
    confidence: Literal["official", "third_party", "derived", "user"]

    def age_days(self, today: dt.date) -> int:
        return (today - self.as_of).days


class ServicePrice(Sourced):
    name: str
    provider: str
    input_per_mtok: float = Field(ge=0)  # USD per million prompt tokens
    output_per_mtok: float = Field(ge=0)  # USD per million completion tokens
    cached_input_per_mtok: float | None = Field(None, ge=0)  # prompt tokens read from the provider's prompt cache
    batch_discount: float = Field(0.0, ge=0, lt=1)  # off both prices through its batch API (answers within a day)

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6

    def rates(self, cached_share: float = 0.0, batch_share: float = 0.0) -> tuple[float, float]:
        """USD per million prompt and completion tokens when `cached_share` of the prompt tokens are read from the
        prompt cache (at the cached price, where the offer has one) and `batch_share` of the requests go through
        the batch API; the two discounts stack, as OpenAI's do."""
        cached = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        prompt = (1 - cached_share) * self.input_per_mtok + cached_share * cached
        keep = 1 - batch_share * self.batch_discount
        return prompt * keep, self.output_per_mtok * keep


class Provisioned(Sourced):
    """Capacity rented by the hour in units (Azure OpenAI PTUs), whatever the traffic."""

    name: str
    provider: str
    usd_per_unit_hour: float = Field(gt=0)
    min_units: int = Field(ge=1)
    unit_increment: int = Field(1, ge=1)  # a deployment grows from min_units in steps of this many units
    input_tpm_per_unit: float = Field(gt=0)  # prompt tokens a minute one unit carries
    output_weight: float = Field(gt=0)  # an output token costs this many prompt tokens of capacity
    note: str = ""


class Power(Sourced):
    usd_per_kwh: float = Field(ge=0)
    pue: float = Field(ge=1)  # facility power / IT power
    amortize_months: int = Field(ge=1)  # owned hardware is written off over this many months
    note: str = ""


class Hosting(Sourced):
    """What owned GPUs need beyond the cards: the servers they sit in, spare cards, and rack space."""

    gpus_per_server: int = Field(ge=1)  # a replica stays inside one server; replicas are packed whole
    pcie_server_usd: float = Field(ge=0)  # a server for PCIe cards, without them
    baseboard_server_usd: float = Field(ge=0)  # an 8-GPU baseboard (HGX) server's other parts
    pcie_server_w: float = Field(ge=0)  # what the server draws beyond its cards
    baseboard_server_w: float = Field(ge=0)
    spare_share: float = Field(ge=0)  # spare cards kept, as a share of those running
    colocation_usd_per_kw_month: float = Field(ge=0)  # rack space, cooling and power delivery per kW of IT load
    note: str = ""


class Operations(Sourced):
    """A person's time that self-hosting takes: upgrades, incidents, on-call (managed offers include it)."""

    hours_per_month: float = Field(ge=0)
    usd_per_hour: float = Field(ge=0)
    note: str = ""


class RentalExtras(Sourced):
    """What a cloud bill adds to the GPU instances: egress, storage, load balancing, monitoring."""

    share: float = Field(ge=0)  # of the instances' price
    note: str = ""


class GpuSpec(Sourced):
    name: str
    label: str
    memory_gib: float = Field(gt=0)  # as the driver reports it
    bandwidth_gbps: float = Field(gt=0)  # GB/s, 1e9 bytes
    tflops: float = Field(gt=0)  # dense 16-bit tensor throughput
    bf16: bool
    power_w: float = Field(gt=0)
    server: Literal["pcie", "baseboard"] = "pcie"  # the server it goes in when owned: PCIe cards, or SXM/OAM baseboards


class GpuPrice(Sourced):
    gpu: str
    provider: str
    kind: Literal["rent", "buy"]
    usd: float = Field(gt=0)  # rent: per GPU-hour; buy: per card
    # rent: the instance sizes (GPUs in one host) sold at this rate; tensor parallelism stays inside one host
    gpus: tuple[Annotated[int, Field(ge=1)], ...] = Field((1,), min_length=1)
    instance: str = ""  # rent: the provider's name for the instance, e.g. g5.12xlarge
    note: str = ""


class Efficiency(Sourced):
    bandwidth: float = Field(gt=0, le=1)  # share of peak memory bandwidth decode achieves
    compute: float = Field(gt=0, le=1)  # share of peak tensor throughput prefill achieves


class Measurement(Sourced):
    gpu: str
    model: str
    concurrency: int = Field(ge=1)
    input_tokens: int = Field(ge=0)  # 0: not stated
    output_tokens: int = Field(ge=0)
    metric: Literal["tpot_ms", "ttft_ms", "output_tps"]
    value: float = Field(gt=0)
    note: str = ""
    fitted: bool = False  # an efficiency factor was fitted on this point: a check of the fit, not of the model


class _DataFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    updated: dt.date | None = None
    service: list[ServicePrice] = []
    provisioned: list[Provisioned] = []
    power: Power | None = None
    hosting: Hosting | None = None
    operations: Operations | None = None
    rental_extras: RentalExtras | None = None
    gpu: list[GpuSpec] = []
    gpu_price: list[GpuPrice] = []
    efficiency: Efficiency | None = None
    measurement: list[Measurement] = []


@dataclass
class Prices:
    services: dict[str, ServicePrice] = field(default_factory=dict)
    provisioned: dict[str, Provisioned] = field(default_factory=dict)
    gpus: dict[str, GpuSpec] = field(default_factory=dict)
    gpu_prices: dict[tuple[str, str, str, str], GpuPrice] = field(default_factory=dict)  # gpu, provider, kind, instance
    measurements: list[Measurement] = field(default_factory=list)
    power: Power | None = None
    hosting: Hosting | None = None
    operations: Operations | None = None
    rental_extras: RentalExtras | None = None
    efficiency: Efficiency | None = None

    def find(self, name: str) -> ServicePrice:
        price = self.services.get(name)
        if price is None:
            raise NotFoundError(f"No price for '{name}'.", f"Known: {', '.join(sorted(self.services))}. {_USER_HINT}")
        return price

    def offer(self, name: str) -> ServicePrice | Provisioned:
        """A pay-as-you-go service or a provisioned offer, by name."""
        if name in self.provisioned:
            return self.provisioned[name]
        if name in self.services:
            return self.services[name]
        known = ", ".join(sorted([*self.services, *self.provisioned]))
        raise NotFoundError(f"No managed offer named '{name}'.", f"Known: {known}. {_USER_HINT}")

    def gpu(self, name: str) -> GpuSpec:
        spec = self.gpus.get(name.lower())
        if spec is None:
            raise NotFoundError(f"No GPU named '{name}'.", f"Known: {', '.join(self.gpus)}. {_USER_HINT}")
        return spec

    def prices_for(self, gpu: str, kind: Literal["rent", "buy"]) -> list[GpuPrice]:
        """This GPU's prices of one kind, cheapest first."""
        return sorted((p for p in self.gpu_prices.values() if p.gpu == gpu and p.kind == kind), key=lambda p: p.usd)


def stale_warnings(entries: Sequence[Sourced], today: dt.date) -> list[str]:
    """One line per entry older than STALE_AFTER_DAYS, naming it and where to check it. Pass prices: they
    change; a datasheet's specs do not."""
    return [
        f"The figure for {_label(e)} dates from {e.as_of} ({e.age_days(today)} days old, {e.confidence}); "
        f"check {e.source} or put a current one in $DEPLOYKIT_HOME/prices.toml."
        for e in _stale(entries, today)
    ]


def stale_summary(entries: Sequence[Sourced], today: dt.date) -> list[str]:
    """At most one short line for the old entries among `entries`: how many and the oldest (stale_list
    gives each, for --json)."""
    old = _stale(entries, today)
    if not old:
        return []
    oldest = min(old, key=lambda e: e.as_of)
    count = f"{len(old)} prices used are" if len(old) > 1 else "1 price used is"
    return [
        f"{count} older than {STALE_AFTER_DAYS} days (the oldest: {_label(oldest)} of {oldest.as_of}); --json "
        "lists each with its source. Put current ones in $DEPLOYKIT_HOME/prices.toml."
    ]


def stale_list(entries: Sequence[Sourced], today: dt.date) -> list[dict[str, object]]:
    """Each old entry among `entries`, with its date and source: what stale_summary counts."""
    return [
        {"price": _label(e), "as_of": e.as_of.isoformat(), "source": e.source, "confidence": e.confidence}
        for e in _stale(entries, today)
    ]


def _stale(entries: Sequence[Sourced], today: dt.date) -> list[Sourced]:
    return [e for e in dict.fromkeys(entries) if e.age_days(today) > STALE_AFTER_DAYS]


def _label(e: Sourced) -> str:
    kind = re.sub(r"(?<!^)(?=[A-Z])", " ", type(e).__name__).lower()  # RentalExtras: "rental extras"
    what = getattr(e, "name", None) or getattr(e, "gpu", None) or kind
    provider = getattr(e, "provider", None)
    return f"{what} ({provider})" if provider and provider != what else str(what)


def load_prices(user_file: Path | None = None) -> Prices:
    """The shipped data, with the user's file (if it exists) adding entries or replacing them."""
    prices = Prices()
    package = resources.files("deploykit.models")
    for name in ("prices.toml", "gpus.toml"):
        _merge(prices, _parse(_loads(package.joinpath(name).read_text(), name), f"the shipped {name}"))
    if user_file is not None and user_file.exists():
        raw = _loads(user_file.read_text(), str(user_file))
        _merge(prices, _parse(_with_user_defaults(raw, prices, user_file), str(user_file)))
    return prices


def _loads(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DeploykitError(f"The prices in {where} are invalid: {e}", "Fix the file, or move it away.") from e


def _parse(raw: dict[str, Any], where: str) -> _DataFile:
    try:
        return _DataFile.model_validate(raw)
    except ValidationError as e:
        raise DeploykitError(f"The prices in {where} are invalid: {e}", "Fix the file, or move it away.") from e


def _with_user_defaults(raw: dict[str, Any], shipped: Prices, path: Path) -> dict[str, Any]:
    """The user's entries are dated by their file and sourced to it; [power], [hosting], [operations],
    [rental_extras] and [efficiency] may give only the fields they change."""
    mine = {
        "as_of": dt.date.fromtimestamp(path.stat().st_mtime),
        "source": f"your file {path}",
        "confidence": "user",
    }
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, list):
            out[key] = [{**mine, **entry} if isinstance(entry, dict) else entry for entry in value]
        elif key in ("power", "hosting", "operations", "rental_extras", "efficiency") and isinstance(value, dict):
            base = getattr(shipped, key)
            out[key] = {**(base.model_dump() if base else {}), **mine, **value}
        else:
            out[key] = value
    return out


def _merge(prices: Prices, data: _DataFile) -> None:
    prices.services.update({s.name: s for s in data.service})
    prices.provisioned.update({p.name: p for p in data.provisioned})
    prices.gpus.update({g.name: g for g in data.gpu})
    prices.gpu_prices.update({(p.gpu, p.provider, p.kind, p.instance): p for p in data.gpu_price})
    prices.measurements += data.measurement
    prices.power = data.power or prices.power
    prices.hosting = data.hosting or prices.hosting
    prices.operations = data.operations or prices.operations
    prices.rental_extras = data.rental_extras or prices.rental_extras
    prices.efficiency = data.efficiency or prices.efficiency
