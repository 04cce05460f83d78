"""Self-hosting against managed offers at the same traffic: monthly cost, break-even volume, and the
utilization self-hosting needs to pay.

Self-hosting is sized by sizing.ranking for the traffic divided by the utilization (a deployment busy
`utilization` of the time on average must hold the rest as headroom). It costs either the rental of its GPUs
around the clock, or owning them: purchase (plus the host, as a share) written off over `amortize_months`,
and power at the facility's PUE. A managed pay-as-you-go offer costs its per-token prices; a provisioned one
(Azure PTUs) the units the peak needs, by the hour.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from deploykit.core.errors import UsageError
from deploykit.core.html import CHART_STYLE, page, paragraph, svg, table
from deploykit.models.config import ModelConfig
from deploykit.models.prices import (
    Hosting,
    Power,
    Prices,
    Provisioned,
    ServicePrice,
    Sourced,
    stale_list,
    stale_summary,
)
from deploykit.sizing.load import HOURS_PER_MONTH, TargetLoad
from deploykit.sizing.ranking import Option, Rental, Sizing, cheapest_rental, size_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Overheads:
    """What self-hosting costs beyond the GPUs that carry the load, each its own line of the comparison."""

    min_replicas: int = 1  # replicas kept running whatever the load (2: one can fail, restart or be upgraded)
    ops_hours: float = 0.0  # a person's time a month: upgrades, incidents, on-call
    ops_usd_per_hour: float = 0.0
    rental_extras: float = 0.0  # a cloud bill's egress, storage and management, as a share of the instances

    @property
    def ops_usd(self) -> float:
        return self.ops_hours * self.ops_usd_per_hour


@dataclass(frozen=True)
class CostLine:
    item: str
    usd: float  # a month


@dataclass(frozen=True)
class Discounts:
    """What a managed pay-as-you-go bill takes off where the offer has the discount: prompt tokens its prompt
    cache serves (`cached_input_share` of them) and requests that can wait for its batch API (`batch_share`)."""

    cached_input_share: float = 0.0
    batch_share: float = 0.0

    def __post_init__(self) -> None:
        for flag, share in (("--cached-input-share", self.cached_input_share), ("--batch-share", self.batch_share)):
            if not 0 <= share <= 1:
                raise UsageError(f"{flag} {share:g} is not a share between 0 and 1.", f"For example {flag} 0.3.")


@dataclass(frozen=True)
class Owning:
    """What owned replicas of `tp` GPUs cost a month: the cards and the servers they sit in written off, spare
    cards, the power the cards and servers draw at the facility's PUE, and the rack space (colocation)."""

    tp: int
    card_usd: float
    card_w: float
    server: str  # "pcie" or "baseboard"
    power: Power
    hosting: Hosting

    def servers(self, replicas: int) -> int:
        """Servers for `replicas` replicas: each replica inside one, as many whole replicas as one holds."""
        per_server = max(1, self.hosting.gpus_per_server // self.tp)
        return math.ceil(replicas / per_server)

    def cards_usd(self, replicas: int) -> float:
        return replicas * self.tp * self.card_usd / self.power.amortize_months

    def upkeep(self, replicas: int) -> list[CostLine]:
        """The lines beyond the cards themselves, for `replicas` replicas running."""
        h, p = self.hosting, self.power
        servers = self.servers(replicas)
        server_usd, server_w = (
            (h.baseboard_server_usd, h.baseboard_server_w)
            if self.server == "baseboard"
            else (h.pcie_server_usd, h.pcie_server_w)
        )
        kw = (replicas * self.tp * self.card_w + servers * server_w) / 1000
        return [
            CostLine(
                f"spare cards: {h.spare_share:.2%} of the {replicas * self.tp} running",
                h.spare_share * self.cards_usd(replicas),
            ),
            CostLine(
                f"{servers} {self.server} server{'s' if servers > 1 else ''} around them, written off",
                servers * server_usd / p.amortize_months,
            ),
            CostLine(
                f"power: {kw:.2f} kW at PUE {p.pue:g} and ${p.usd_per_kwh:g}/kWh",
                kw * p.pue * HOURS_PER_MONTH * p.usd_per_kwh,
            ),
            CostLine(
                f"colocation: {kw:.2f} kW at ${h.colocation_usd_per_kw_month:,.2f} per kW a month",
                kw * h.colocation_usd_per_kw_month,
            ),
        ]


@dataclass(frozen=True)
class SelfHosted:
    """One sized option, priced by rental and by ownership, per month at the given traffic, with the
    overheads: the replicas kept for availability and the operations time."""

    option: Option
    overheads: Overheads
    owning: Owning | None  # None: the data has no purchase price for its GPU

    @property
    def label(self) -> str:
        """Its GPUs, the replicas kept for availability included."""
        return _devices(self.option, self.replicas)

    @property
    def rental(self) -> Rental | None:
        """The instances its replicas (the availability ones included) rent as; None: nobody rents such a host."""
        return cheapest_rental(self.option.offers, self.option.tp, self.replicas)

    @property
    def rented_as(self) -> str:
        rental = self.rental
        return rental.label if rental else "-"

    @property
    def replicas(self) -> int:
        """The replicas it runs: what the load needs, and at least the availability minimum."""
        return max(self.option.replicas, self.overheads.min_replicas)

    def gpus_usd(self, way: str, replicas: int) -> float | None:
        """`replicas` replicas' GPUs a month, rented (whole instances) or owned (the cards written off); None: not
        priced that way."""
        if way == "rent":
            per_hour = self.option.rent_per_hour(replicas)
            return per_hour * HOURS_PER_MONTH if per_hour is not None else None
        return self.owning.cards_usd(replicas) if self.owning is not None else None

    def cost_for(self, way: str, replicas: int) -> float | None:
        """A month when the load needs `replicas` replicas, every line included; None: not priced this way."""
        lines = self.lines(way, replicas)
        return sum(line.usd for line in lines) if lines else None

    def lines(self, way: str, replicas: int | None = None) -> list[CostLine]:
        """What a month costs this way, line by line, when the load needs `replicas` replicas (default: the
        sized load's); none when it is not priced this way."""
        needed = self.option.replicas if replicas is None else replicas
        running = max(needed, self.overheads.min_replicas)
        gpus = self.gpus_usd(way, needed)
        if gpus is None:
            return []
        owning = self.owning if way == "own" else None
        verb = f"owned, written off over {owning.power.amortize_months} months" if owning else "rented"
        out = [CostLine(f"{_devices(self.option, needed)}, {verb}, for the load", gpus)]
        all_gpus = self.gpus_usd(way, running) or 0  # the availability replicas' too
        if running > needed:
            more = all_gpus - gpus
            extra, at_least = running - needed, f"at least {self.overheads.min_replicas} replicas"
            out.append(CostLine(f"{extra} more replica{'s' if extra > 1 else ''} for availability ({at_least})", more))
        if way == "rent" and (share := self.overheads.rental_extras):
            out.append(CostLine(f"egress, storage and management: {share:.0%} of the instances", all_gpus * share))
        if owning is not None:
            out += owning.upkeep(running)
        if self.overheads.ops_usd > 0:
            o = self.overheads
            out.append(CostLine(f"operations: {o.ops_hours:g} h a month at ${o.ops_usd_per_hour:,.2f}", o.ops_usd))
        return out

    def monthly(self, way: str) -> float | None:
        return self.cost_for(way, self.option.replicas)

    @property
    def rent_usd(self) -> float | None:
        return self.monthly("rent")

    @property
    def own_usd(self) -> float | None:
        return self.monthly("own")

    @property
    def best_usd(self) -> float | None:
        costs = [c for c in (self.rent_usd, self.own_usd) if c is not None]
        return min(costs) if costs else None


def _devices(o: Option, replicas: int) -> str:
    return f"{replicas * o.tp} x {o.hardware.name}" + (f" (tp {o.tp})" if o.tp > 1 else "")


@dataclass(frozen=True)
class BreakEven:
    """Against one managed offer, the cheapest self-hosting one way (renting or owning)."""

    way: str  # "rent" or "own"
    option: str
    tokens: float | None  # the monthly volume whose bill at the offer pays for self-hosting it; None: never
    utilization: float | None  # how busy that volume keeps the replicas; None: more than fully busy
    replicas: int = 0  # the replicas running at that volume (at least the availability minimum)


@dataclass(frozen=True)
class Managed:
    name: str
    provider: str
    monthly_usd: float
    break_even: tuple[BreakEven, ...]  # renting, owning (where the data prices them); pay-as-you-go offers only
    lines: tuple[CostLine, ...] = ()  # the bill at list prices, then each discount taken off


@dataclass
class CostReport:
    model: str
    load: TargetLoad
    utilization: float
    tokens_per_month: float
    self_hosted: list[SelfHosted]
    managed: list[Managed]
    verdict: str
    overheads: Overheads
    warnings: list[str] = field(default_factory=list)
    stale_prices: list[dict[str, object]] = field(default_factory=list)  # the old prices the warnings count
    basis: str = ""  # which offers were chosen, and why, when the user named none
    plot: list[Series] = field(default_factory=list)  # the cost chart's lines (plot_series)
    discounts: Discounts = Discounts()

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.model,
            "rps": self.load.rps,
            "input_tokens": self.load.input_tokens,
            "output_tokens": self.load.output_tokens,
            "utilization": self.utilization,
            "tokens_per_month": self.tokens_per_month,
            "overheads": {**self.overheads.__dict__, "ops_usd_per_month": self.overheads.ops_usd},
            "discounts": self.discounts.__dict__,
            "self_hosted": [
                {
                    "option": s.label,
                    "hardware": s.option.hardware.name,
                    "devices": s.option.devices,
                    "rented_as": s.rental.label if s.rental else None,
                    "replicas": s.replicas,
                    "rent_usd_per_month": s.rent_usd,
                    "own_usd_per_month": s.own_usd,
                    "lines": {way: [line.__dict__ for line in s.lines(way)] for way in ("rent", "own")},
                    "source": "calibrated" if s.option.calibrated else "estimated",
                }
                for s in self.self_hosted
            ],
            "managed": [
                {
                    **m.__dict__,
                    "break_even": [b.__dict__ for b in m.break_even],
                    "lines": [line.__dict__ for line in m.lines],
                }
                for m in self.managed
            ],
            "verdict": self.verdict,
            "default_offers": self.basis or None,  # which offers and why, when --compare named none
            "warnings": self.warnings,
            "stale_prices": self.stale_prices,
            "plot": [line.__dict__ for line in self.plot],
        }


def owning(prices: Prices, option: Option) -> Owning | None:
    """What owning this option's replicas costs, from the data: None where nobody sells its GPU in the data."""
    buy = prices.prices_for(option.hardware.name, "buy")
    if not buy or option.hardware.power_w <= 0 or option.hardware.is_cpu:
        return None
    if prices.power is None or prices.hosting is None:
        raise UsageError("The price data has no [power] or [hosting] table.", "Restore the shipped prices.toml.")
    server = prices.gpu(option.hardware.name).server
    return Owning(option.tp, buy[0].usd, option.hardware.power_w, server, prices.power, prices.hosting)


def managed_monthly_usd(
    offer: ServicePrice | Provisioned, w: TargetLoad, utilization: float, discounts: Discounts = Discounts()
) -> float:
    return sum(line.usd for line in managed_lines(offer, w, utilization, discounts))


def managed_lines(
    offer: ServicePrice | Provisioned, w: TargetLoad, utilization: float, discounts: Discounts = Discounts()
) -> list[CostLine]:
    """A managed offer's month at the load: the bill at list prices, then each discount it gives taken off."""
    prompt, completion = w.tokens_per_month
    if isinstance(offer, ServicePrice):
        listed = offer.cost(prompt, completion)
        lines = [CostLine(f"{offer.name} at list prices", listed)]
        c, b = discounts.cached_input_share, discounts.batch_share
        cached_in, _ = offer.rates(c, 0)
        if c and offer.cached_input_per_mtok is not None:
            saved = prompt * (offer.input_per_mtok - cached_in) / 1e6
            what = f"prompt cache: {c:.0%} of prompt tokens at ${offer.cached_input_per_mtok:g} per million"
            lines.append(CostLine(what, -saved))
        if b and offer.batch_discount:
            after_cache = (prompt * cached_in + completion * offer.output_per_mtok) / 1e6
            what = f"batch API: {b:.0%} of requests at {offer.batch_discount:.0%} off"
            lines.append(CostLine(what, -after_cache * b * offer.batch_discount))
        return lines
    per_minute_peak = w.rps / utilization * 60 * (w.input_tokens + w.output_tokens * offer.output_weight)
    needed = max(0, math.ceil(per_minute_peak / offer.input_tpm_per_unit) - offer.min_units)
    units = offer.min_units + math.ceil(needed / offer.unit_increment) * offer.unit_increment
    usd = units * offer.usd_per_unit_hour * HOURS_PER_MONTH
    return [CostLine(f"{offer.name}: {units} units around the clock", usd)]


def self_hosted(sizing: Sizing, prices: Prices, overheads: Overheads) -> list[SelfHosted]:
    out = []
    for o in sizing.options:
        hosted = SelfHosted(o, overheads, owning(prices, o))
        if hosted.best_usd is not None:
            out.append(hosted)
    out.sort(key=lambda s: s.best_usd or math.inf)
    return out


def monthly_tokens_capacity(s: SelfHosted, w: TargetLoad) -> float:
    """Tokens (prompt + completion) one replica serves a month at its SLO capacity."""
    return s.option.capacity_rps * (w.input_tokens + w.output_tokens) * 3600 * HOURS_PER_MONTH


def self_host_cost_at(s: SelfHosted, way: str, w: TargetLoad, tokens: float, utilization: float) -> float:
    """This option's monthly cost, renting or owning, at `tokens` a month: whole replicas, each loaded to
    `utilization` (rented in whole instances), at least the availability minimum, and the operations."""
    cost = s.cost_for(way, max(1, math.ceil(tokens / (monthly_tokens_capacity(s, w) * utilization))))
    assert cost is not None
    return cost


def cheapest(hosted: list[SelfHosted], way: str) -> SelfHosted | None:
    """The option that costs least this way (renting or owning), if the data prices any."""
    priced = [s for s in hosted if s.monthly(way) is not None]
    return min(priced, key=lambda s: s.monthly(way) or 0) if priced else None


def blended_price_per_token(offer: ServicePrice, w: TargetLoad, discounts: Discounts = Discounts()) -> float:
    total = w.input_tokens + w.output_tokens
    prompt, completion = offer.rates(discounts.cached_input_share, discounts.batch_share)
    return (w.input_tokens * prompt + w.output_tokens * completion) / total / 1e6


def compare(
    sizing: Sizing,
    prices: Prices,
    offers: list[ServicePrice | Provisioned],
    utilization: float,
    w: TargetLoad,
    overheads: Overheads = Overheads(),
    discounts: Discounts = Discounts(),
) -> CostReport:
    """`sizing` was made for the peak (the mean load `w` over `utilization`); the offers see the mean, with the
    discounts they give."""
    if not 0 < utilization <= 1:
        raise UsageError(f"--utilization {utilization} is not in (0, 1].", "For example --utilization 0.5.")
    hosted = self_hosted(sizing, prices, overheads)
    tokens = sum(w.tokens_per_month)
    managed = []
    for offer in offers:
        breaks: list[BreakEven] = []
        for way in ("rent", "own"):
            best = cheapest(hosted, way)
            if best is not None and isinstance(offer, ServicePrice):
                breaks.append(_break_even(best, way, offer, w, discounts))
        lines = tuple(managed_lines(offer, w, utilization, discounts))
        managed.append(Managed(offer.name, offer.provider, sum(x.usd for x in lines), tuple(breaks), lines))
    verdict = _verdict(hosted, managed, tokens)
    report = CostReport(sizing.model, w, utilization, tokens, hosted, managed, verdict, overheads, discounts=discounts)
    report.plot = plot_series(report, offers)
    return report


# Past this many replicas a break-even is reported as none: no single deployment runs that many.
_MAX_REPLICAS = 10_000


def _break_even(best: SelfHosted, way: str, offer: ServicePrice, w: TargetLoad, discounts: Discounts) -> BreakEven:
    """The smallest monthly volume whose bill at the offer pays for self-hosting it. While n replicas carry
    the load (n - 1 did not) the cost is flat, so the first n whose cost, billed at the offer's price, fits
    in n fully busy replicas gives it."""
    price = blended_price_per_token(offer, w, discounts)
    capacity = monthly_tokens_capacity(best, w)  # one replica, fully busy

    def volume(n: int) -> float:
        return (best.cost_for(way, n) or 0) / price

    if volume(_MAX_REPLICAS) > _MAX_REPLICAS * capacity:  # even that many, fully busy, cost more per token
        return BreakEven(way, best.label, None, None)
    n, tokens = next((n, v) for n in range(1, _MAX_REPLICAS + 1) if (v := volume(n)) <= n * capacity)
    running = max(n, best.overheads.min_replicas)
    return BreakEven(way, best.label, tokens, tokens / (running * capacity), running)


def _verdict(hosted: list[SelfHosted], managed: list[Managed], tokens: float) -> str:
    if not hosted:
        return "No priced hardware can serve this load; self-hosting cannot be compared."
    lines = []
    for way, verb in (("rent", "Renting"), ("own", "Owning")):
        best = cheapest(hosted, way)
        if best is None:
            continue
        cost = best.monthly(way) or 0
        if not managed:
            lines.append(f"{verb} {best.label} costs ${cost:,.0f}/month.")
            continue
        rival = min(managed, key=lambda m: m.monthly_usd)
        head = f"{verb} {best.label} costs ${cost:,.0f}/month against ${rival.monthly_usd:,.0f} for {rival.name}"
        above = _above(next((b for b in rival.break_even if b.way == way), None))
        if cost <= rival.monthly_usd:
            paid = f" (it does {above})" if above else ""
            lines.append(f"{head}: self-hosting pays at {tokens_text(tokens)} tokens a month{paid}.")
        elif above:
            now = tokens_text(tokens)
            lines.append(f"{head}: self-hosting does not pay at {now} tokens a month; it would {above}.")
        else:
            lines.append(f"{head}: self-hosting does not pay at any volume; fully busy replicas cost more per token.")
    return " ".join(lines)


def _above(b: BreakEven | None) -> str | None:
    """'above VOLUME, with its N replicas busy U% of the time' for a break-even there is, else None."""
    if b is None or b.tokens is None or b.utilization is None:
        return None
    return f"above {tokens_text(b.tokens)}, with {_replicas(b.replicas)} busy {_share(b.utilization)} of the time"


def _share(u: float) -> str:
    return f"{u:.0%}" if u >= 0.005 else "under 1%"


def _replicas(n: int) -> str:
    return "its replica" if n == 1 else f"its {n} replicas"


def tokens_text(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f}"


# --- the plot ---------------------------------------------------------------------------------------------


def volumes(around: float) -> list[float]:
    """Monthly token volumes from 1/1000 to 1000 x the given one, 8 a decade."""
    low = math.floor(math.log10(max(around, 1)) - 3)
    return [10 ** (low + i / 8) for i in range(6 * 8 + 1)]


@dataclass(frozen=True)
class Series:
    """One line of the cost plot: monthly cost at each monthly token volume."""

    label: str
    tokens: list[float]
    usd: list[float]
    managed: bool  # a managed offer (dashed) rather than self-hosting (a step: whole replicas)
    at_volume: float  # the monthly cost at the report's own volume


def plot_series(report: CostReport, offers: list[ServicePrice | Provisioned]) -> list[Series]:
    """What the cost plot draws: the cheapest self-hosting option each way, and each managed offer, from a
    thousandth to a thousand times the report's volume."""
    w, u = report.load, report.utilization
    xs = volumes(report.tokens_per_month)
    lines = []
    for way in ("rent", "own"):
        best = cheapest(report.self_hosted, way)
        if best is not None:
            hosted = [self_host_cost_at(best, way, w, x, u) for x in xs]
            here = self_host_cost_at(best, way, w, report.tokens_per_month, u)
            lines.append(Series(f"{way} {best.label} (whole replicas)", xs, hosted, False, here))
    d = report.discounts
    for offer in offers:
        scale = [x / report.tokens_per_month for x in xs]
        if isinstance(offer, ServicePrice):
            bills = [managed_monthly_usd(offer, w, u, d) * k for k in scale]
        else:
            bills = [managed_monthly_usd(offer, _scaled(w, k), u) for k in scale]
        lines.append(Series(offer.name, xs, bills, True, managed_monthly_usd(offer, w, u, d)))
    return lines


def plot_png(data: dict[str, Any]) -> bytes:
    """Monthly cost against monthly token volume, log-log: a report's plot (its JSON) drawn, its volume marked."""
    import matplotlib.pyplot as plt

    fig = cost_figure(data)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def cost_figure(data: dict[str, Any], hovers: dict[str, str] | None = None) -> Figure:
    """The figure plot_png draws (880 x 550 pixels) from a report's JSON: managed offers dashed, self-hosting
    as steps (whole replicas), a grey line at the report's volume. With `hovers`, each line gets a point at
    that volume, and `hovers` maps the point's gid to its monthly bill there (shown on hover in a page)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume = data["tokens_per_month"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for line in data["plot"]:
        if line["managed"]:
            (drawn,) = ax.plot(line["tokens"], line["usd"], linestyle="--", label=line["label"])
        else:
            (drawn,) = ax.step(line["tokens"], line["usd"], where="post", label=line["label"])
        if hovers is not None:
            gid = f"dk-cost-{len(hovers)}"
            ax.plot([volume], [line["at_volume"]], marker="o", color=drawn.get_color(), gid=gid)
            hovers[gid] = f"{line['label']}: {_usd(line['at_volume'])} a month at {tokens_text(volume)} tokens"
    ax.axvline(volume, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per month (prompt + completion)")
    ax.set_ylabel("USD per month")
    per_request = f"{data['input_tokens']} in / {data['output_tokens']} out per request"
    ax.set_title(f"{data['model']}: {per_request}, utilization {data['utilization']:.0%}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _scaled(w: TargetLoad, k: float) -> TargetLoad:
    return TargetLoad(w.rps * k, w.input_tokens, w.output_tokens, w.slos)


def report_html(data: dict[str, Any]) -> str:
    """The page in the kit's one report style, from a report's JSON (`cost --json` rebuilds it): what was
    priced, the verdict, the chart, the tables."""
    tested = [
        ["model", data["model"]],
        [
            "traffic",
            f"{data['rps']:g} req/s, {data['input_tokens']} tokens in and {data['output_tokens']} out per request",
        ],
        ["volume", f"{data['tokens_per_month']:,.0f} tokens a month, at {data['utilization']:.0%} utilization"],
    ]
    hosted = [["option", "rented as", "rent", "own", "basis"]] + [
        [s["option"], s["rented_as"] or "-", _usd(s["rent_usd_per_month"]), _usd(s["own_usd_per_month"]), s["source"]]
        for s in data["self_hosted"]
    ]
    managed = [["offer", "cost", "renting pays above", "owning pays above"]] + [
        [m["name"], _usd(m["monthly_usd"]), *break_even_cells(m)] for m in data["managed"]
    ]
    basis = [paragraph(data["default_offers"])] if data.get("default_offers") else []
    blocks = [table(tested), *basis, paragraph(data["verdict"]), plot_svg(data), "<h2>Self-hosting, per month</h2>"]
    blocks += [table(hosted, header=True), "<h2>The cheapest each way, line by line</h2>"]
    blocks += [table([["", "line", "per month"], *cost_line_cells(data)], header=True)]
    blocks += ["<h2>Managed, per month at the same traffic</h2>"]
    blocks += [table(managed, header=True)]
    if discounted := managed_line_cells(data):
        header = ["offer", "line", "per month"]
        blocks += ["<h2>Managed bills, line by line</h2>", table([header, *discounted], header=True)]
    blocks += [paragraph(x) for x in data["warnings"]]
    return page(f"deploykit cost: {data['model']}", blocks)


def plot_svg(data: dict[str, Any]) -> str:
    """The same figure as plot_png, as inline SVG for the HTML page, each line's bill at the volume on hover."""
    import matplotlib.pyplot as plt
    from matplotlib import rc_context

    hovers: dict[str, str] = {}
    with rc_context(CHART_STYLE):
        fig = cost_figure(data, hovers)
        text = svg(fig, hovers)
    plt.close(fig)
    return text


def cost_line_cells(data: dict[str, Any]) -> list[list[str]]:
    """[way, line, $/month] for the cheapest option each way (in a report's JSON), then its total: what drives
    the verdict."""
    rows = []
    for way, verb in (("rent", "renting"), ("own", "owning")):
        priced = [s for s in data["self_hosted"] if s[f"{way}_usd_per_month"] is not None]
        if not priced:
            continue
        best = min(priced, key=lambda s: s[f"{way}_usd_per_month"])  # the first of equals, as cheapest()
        rows += [[verb, line["item"], _usd(line["usd"])] for line in best["lines"][way]]
        rows.append([verb, "total", _usd(best[f"{way}_usd_per_month"])])
    return rows


def managed_line_cells(data: dict[str, Any]) -> list[list[str]]:
    """[offer, line, $/month] for each managed offer a discount applies to (in a report's JSON), then its total."""
    rows = []
    for m in data["managed"]:
        if len(m["lines"]) > 1:
            rows += [[m["name"], line["item"], _usd(line["usd"])] for line in m["lines"]]
            rows.append([m["name"], "total", _usd(m["monthly_usd"])])
    return rows


def break_even_cells(managed: dict[str, Any]) -> list[str]:
    """'tokens a month (replica busy %)' for renting and for owning, as table cells, from a managed offer's JSON."""
    cells = []
    for way in ("rent", "own"):
        b = next((b for b in managed["break_even"] if b["way"] == way), None)
        if b is None:
            cells.append("-")
        elif b["tokens"] is None or b["utilization"] is None:
            cells.append("never")
        else:
            cells.append(f"{tokens_text(b['tokens'])} ({b['utilization']:.0%} busy)")
    return cells


def _usd(value: float | None) -> str:
    return f"${value:,.0f}" if value is not None else "-"


def cost_model(
    name: str,
    config: ModelConfig,
    load: TargetLoad,
    prices: Prices,
    compare_with: list[str],
    utilization: float,
    *,
    today: dt.date | None = None,
    min_replicas: int = 2,
    ops_hours: float | None = None,
    discounts: Discounts = Discounts(),
    **size_options: Any,
) -> tuple[CostReport, list[ServicePrice | Provisioned]]:
    """Self-hosting sized for the load's peaks (the mean over `utilization`) against each managed offer at
    the mean load with its `discounts`, with at least `min_replicas` replicas and `ops_hours` of a person's
    time a month (default: the data's [operations] hours) at the data's rate."""
    basis = ""
    if not compare_with:
        compare_with, basis = default_offers(name, config, prices)
    offers = [prices.offer(n) for n in compare_with]  # an unknown name fails before any work
    if not 0 < utilization <= 1:
        raise UsageError(f"--utilization {utilization} is not in (0, 1].", "For example --utilization 0.5.")
    overheads = _overheads(prices, min_replicas, ops_hours)
    mean = load
    peak = replace(load, rps=mean.rps / utilization)
    sizing = size_model(name, config, peak, prices, max_utilization=1.0, price_warnings=False, **size_options)
    report = compare(sizing, prices, offers, utilization, mean, overheads, discounts)
    used: list[Sourced] = [*offers, *([prices.power] if prices.power else [])]
    if prices.hosting is not None and any(s.owning for s in report.self_hosted):
        used.append(prices.hosting)
    if prices.operations is not None and overheads.ops_usd > 0:
        used.append(prices.operations)
    if prices.rental_extras is not None and overheads.rental_extras > 0:
        used.append(prices.rental_extras)
    for s in report.self_hosted:
        used += [p for p in (s.option.price, *prices.prices_for(s.option.hardware.name, "buy")[:1]) if p]
    # the sizing's own (a calibration's), then one line for every price used that is old
    day = today or dt.date.today()
    report.warnings = [*sizing.warnings, *stale_summary(used, day)]
    report.stale_prices = stale_list(used, day)
    report.basis = basis
    return report, offers


def _overheads(prices: Prices, min_replicas: int, ops_hours: float | None) -> Overheads:
    if min_replicas < 1:
        raise UsageError(f"--min-replicas {min_replicas} is below 1.", "Use 2 to survive a replica's failure, or 1.")
    if ops_hours is not None and ops_hours < 0:
        raise UsageError(f"--ops-hours-per-month {ops_hours:g} is negative.", "Use 0 to leave operations out.")
    ops = prices.operations
    hours = ops_hours if ops_hours is not None else (ops.hours_per_month if ops else 0.0)
    extras = prices.rental_extras.share if prices.rental_extras else 0.0
    return Overheads(min_replicas, hours, ops.usd_per_hour if ops else 0.0, extras)


# With no --compare, a model is compared with OpenAI's small general-purpose API below this many
# parameters and with its flagship above: the APIs a model of that class is usually weighed against.
SMALL_API_BELOW_PARAMS = 30_000_000_000


def default_offers(name: str, config: ModelConfig, prices: Prices) -> tuple[list[str], str]:
    """The managed offers `cost` compares with when none are named: every pay-as-you-go offer of the same
    model (an offer `llama-3.1-8b@together` serves `llama-3.1-8b-instruct`: the alias less its -instruct,
    -chat or -it) and the general-purpose API nearest the model's size; and a sentence saying which and why."""
    base = re.sub(r"-(instruct|chat|it)$", "", name)
    same = sorted(n for n in prices.services if n.partition("@")[0] == base and "@" in n)
    small = config.params < SMALL_API_BELOW_PARAMS
    general = "gpt-4o-mini" if small else "gpt-4o"
    threshold = f"{SMALL_API_BELOW_PARAMS / 1e9:.0f} B"
    rule = f"under {threshold}: OpenAI's small model" if small else f"{threshold} or more: OpenAI's flagship"
    size = f"{config.params / 1e9:.3g} B parameters"
    why = f"{general}: the general-purpose API deploykit weighs a model of {size} against ({rule})"
    if same:
        why = f"{', '.join(same)}: the same model, managed; {why}"
    else:
        why = f"no managed offer of {name} in the price data; {why}"
    return [*same, general], f"No --compare given. Compared with {why}."
