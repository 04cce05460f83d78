"""Which hardware serves a model at a target load within its SLOs, and what it costs an hour: every
(hardware x tensor parallel) option, at the largest concurrency its KV cache and the SLOs allow, loaded to
at most `max_utilization`, ranked by price. Latencies are typical (median-like) values with an uncertainty
band; p95 SLOs are checked against the band's upper edge."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploykit.core.errors import DeploykitError, UsageError
from deploykit.models.config import ModelConfig
from deploykit.models.fit import GIB, tensor_parallel_sizes, weight_bytes
from deploykit.models.prices import GpuPrice, Prices, Sourced, stale_list, stale_summary
from deploykit.sizing.calibration import calibrate, engine_warning, installed_engine_version
from deploykit.sizing.hardware import Accelerator, HardwareByName, kv_tokens_on
from deploykit.sizing.load import HOURS_PER_MONTH, TargetLoad
from deploykit.sizing.performance import Calibration, Point, concurrency_for_rate, point

ANALYTIC_BAND = 0.25  # the analytic model's stated tolerance (docs/SIZING.md checks it against published data)


CALIBRATED_BAND = 0.15  # after a load test on the same hardware


MAX_NUM_SEQS = 256  # vLLM's default cap on sequences in flight per engine


@dataclass(frozen=True)
class Rental:
    """Rented instances holding the replicas: tensor parallelism runs inside one host, so an instance holds
    whole replicas (its GPU count a multiple of the replica's) and is paid whole, used or not."""

    price: GpuPrice  # per GPU-hour
    gpus: int  # per instance
    instances: int

    @property
    def usd_per_hour(self) -> float:
        return self.instances * self.gpus * self.price.usd

    @property
    def label(self) -> str:
        shape = self.price.instance or f"{self.gpus}-GPU instance"
        return f"{self.instances} x {shape} ({self.price.provider})"


def cheapest_rental(offers: Sequence[GpuPrice], tp: int, replicas: int) -> Rental | None:
    """The cheapest way to rent `replicas` replicas of `tp` GPUs each in instances of one size; None when no
    instance size in `offers` holds a replica (no provider in the data rents such a host)."""
    fits = [Rental(p, g, math.ceil(replicas / (g // tp))) for p in offers for g in p.gpus if g % tp == 0]
    return min(fits, key=lambda r: r.usd_per_hour, default=None)


@dataclass(frozen=True)
class Option:
    """One way to serve the workload: `replicas` engines, each on `tp` devices."""

    hardware: Accelerator
    tp: int
    replicas: int
    kv_cache_tokens: int  # per replica
    max_concurrency: int  # per replica: what the KV cache and the SLOs allow
    capacity_rps: float  # per replica, at max_concurrency
    at_load: Point  # per replica, at the target load
    band: float
    calibrated: bool
    offers: tuple[GpuPrice, ...]  # the rental prices of this hardware (at the chosen provider), any shape
    rental: Rental | None  # the cheapest of them for these replicas; None: no provider rents such a host

    @property
    def devices(self) -> int:
        return self.tp * self.replicas

    @property
    def usd_per_hour(self) -> float | None:
        return self.rental.usd_per_hour if self.rental else None

    @property
    def price(self) -> GpuPrice | None:
        """The rate it is priced at."""
        return self.rental.price if self.rental else None

    def rent_per_hour(self, replicas: int) -> float | None:
        """What `replicas` replicas cost an hour, rented (the cheapest shape for that many may differ)."""
        rental = cheapest_rental(self.offers, self.tp, replicas)
        return rental.usd_per_hour if rental else None

    def headroom(self, rps: float) -> float:
        return self.replicas * self.capacity_rps / rps - 1

    def to_json(self, w: TargetLoad) -> dict[str, object]:
        tokens = w.rps * (w.input_tokens + w.output_tokens) * 3600
        per_hour = self.usd_per_hour
        return {
            "hardware": self.hardware.name,
            "label": self.hardware.label,
            "bandwidth_gbps": self.hardware.bandwidth / 1e9,
            "tflops": self.hardware.flops / 1e12,
            "tensor_parallel": self.tp,
            "replicas": self.replicas,
            "devices": self.devices,
            "kv_cache_tokens_per_replica": self.kv_cache_tokens,
            "max_concurrency_per_replica": self.max_concurrency,
            "capacity_rps": self.replicas * self.capacity_rps,
            "output_tokens_per_s": w.rps * w.output_tokens,
            "concurrency_per_replica": self.at_load.concurrency,
            "ttft_s": self.at_load.ttft_s,
            "tpot_s": self.at_load.tpot_s,
            "e2e_s": self.at_load.e2e_s(w.output_tokens),
            "band": self.band,
            "source": "calibrated" if self.calibrated else "estimated",
            "headroom": self.headroom(w.rps),
            "usd_per_hour": per_hour,
            "usd_per_month": per_hour * HOURS_PER_MONTH if per_hour is not None else None,
            "usd_per_mtok": per_hour / tokens * 1e6 if per_hour is not None and tokens else None,
            "rented_as": self.rental.label if self.rental else None,
            "instances": self.rental.instances if self.rental else None,
            "price": self.price.model_dump(mode="json") if self.price else None,
        }


@dataclass(frozen=True)
class Infeasible:
    hardware: str
    tp: int
    reason: str
    shortfall: float  # how far off: predicted latency over the SLO, or tokens needed over tokens held


@dataclass
class Sizing:
    model: str
    load: TargetLoad
    options: list[Option]
    infeasible: list[Infeasible]
    calibration: Calibration | None
    warnings: list[str] = field(default_factory=list)
    stale_prices: list[dict[str, object]] = field(default_factory=list)  # the old prices the warnings count

    def to_json(self) -> dict[str, object]:
        w = self.load
        return {
            "model": self.model,
            "workload": {
                "rps": w.rps,
                "input_tokens": w.input_tokens,
                "output_tokens": w.output_tokens,
                "slos": [f"{s.metric}_p{s.pct}={s.limit}s" for s in w.slos],
            },
            "options": [o.to_json(w) for o in self.options],
            "infeasible": [i.__dict__ for i in self.infeasible],
            "calibration": self.calibration.__dict__ if self.calibration else None,
            "warnings": self.warnings,
            "stale_prices": self.stale_prices,
        }


def size_option(
    config: ModelConfig,
    dev: Accelerator,
    tp: int,
    w: TargetLoad,
    max_utilization: float,
    calibration: Calibration | None,
    offers: Sequence[GpuPrice] = (),
) -> Option | Infeasible:
    seq = w.input_tokens + w.output_tokens
    kv = kv_tokens_on(config, dev, tp)
    if kv < seq:
        weights = weight_bytes(config, dev.dtype(config)) / tp / GIB
        return Infeasible(
            dev.name,
            tp,
            f"holds {kv:,} KV tokens, not one {seq:,}-token request ({weights:.1f} GiB of weights per device of "
            f"{dev.memory_bytes / GIB:.0f} GiB)",
            seq / kv if kv > 0 else math.inf,
        )
    cal = calibration if calibration and calibration.applies_to(dev, tp) else None
    band = CALIBRATED_BAND if cal else ANALYTIC_BAND
    kv_cap = min(kv // seq, MAX_NUM_SEQS)

    def misses(c: int) -> tuple[str, float] | None:
        """The first SLO missed at concurrency c, and by how much (the band's upper edge over the limit)."""
        p = point(config, dev, tp, c, w.input_tokens, w.output_tokens, cal)
        for metric, value in (("ttft", p.ttft_s), ("tpot", p.tpot_s), ("e2e", p.e2e_s(w.output_tokens))):
            limit = w.limit(metric)
            if limit is not None and value * (1 + band) > limit:
                return f"{metric} {_ms(value)} (+{band:.0%}) > {_ms(limit)}", value * (1 + band) / limit
        return None

    if (miss := misses(1)) is not None:
        return Infeasible(dev.name, tp, f"misses the SLO even with one request in flight: {miss[0]}", miss[1])
    low, high = 1, kv_cap  # the largest concurrency meeting the SLOs (latency grows with concurrency)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if misses(mid) is None else (low, mid - 1)
    best = point(config, dev, tp, low, w.input_tokens, w.output_tokens, cal)
    capacity = best.rps(w.output_tokens)
    replicas = max(1, math.ceil(w.rps / (capacity * max_utilization)))
    at_load = point(
        config,
        dev,
        tp,
        concurrency_for_rate(config, dev, tp, w.rps / replicas, w, cal, low),
        w.input_tokens,
        w.output_tokens,
        cal,
    )
    rental = cheapest_rental(offers, tp, replicas)
    return Option(dev, tp, replicas, kv, low, capacity, at_load, band, cal is not None, tuple(offers), rental)


def size(
    name: str,
    config: ModelConfig,
    w: TargetLoad,
    hardware: list[Accelerator],
    prices: Prices,
    *,
    max_utilization: float = 0.8,
    calibration: Calibration | None = None,
    provider: str | None = None,
) -> Sizing:
    """Every (hardware x tensor parallel) option, feasible ones ranked by $/month then TPOT."""
    if w.rps <= 0 or w.input_tokens < 1 or w.output_tokens < 1:
        raise UsageError("The load needs a positive rate and at least one input and one output token.")
    if not 0 < max_utilization <= 1:
        raise UsageError(f"--max-utilization {max_utilization} is not in (0, 1].")
    options: list[Option] = []
    infeasible: list[Infeasible] = []
    for dev in hardware:
        offers = [p for p in prices.prices_for(dev.name, "rent") if provider is None or p.provider == provider]
        for tp in [1] if dev.is_cpu else tensor_parallel_sizes(config, 8):
            result = size_option(config, dev, tp, w, max_utilization, calibration, offers)
            (options if isinstance(result, Option) else infeasible).append(result)  # type: ignore[arg-type]
    options = _cheapest_tp_per_hardware(options)
    options.sort(key=lambda o: (o.usd_per_hour is None, o.usd_per_hour or 0, o.at_load.tpot_s))
    sizing = Sizing(name, w, options, infeasible, calibration)
    if calibration is not None:
        sizing.warnings += engine_warning(calibration.engine_version, installed_engine_version())
    if calibration is not None and not all(
        0.5 <= mine / theirs <= 2
        for mine, theirs in ((w.input_tokens, calibration.input_tokens), (w.output_tokens, calibration.output_tokens))
    ):
        sizing.warnings.append(
            f"The load test ran {calibration.input_tokens}/{calibration.output_tokens} tokens in/out, this load "
            f"{w.input_tokens}/{w.output_tokens}; its calibration is applied, but a run at these lengths is surer."
        )
    for o in options:
        if calibration is not None and o.calibrated and not 0.25 <= o.max_concurrency / calibration.concurrency <= 4:
            sizing.warnings.append(
                f"{o.hardware.name} runs up to {o.max_concurrency} streams per replica here, far from the "
                f"{calibration.concurrency} of the load test it is calibrated on; the ±{CALIBRATED_BAND:.0%} band "
                f"holds within 4x of it (docs/SIZING.md). Calibrate near {o.max_concurrency} streams, or cap "
                "them with --slo."
            )
    return sizing


def _cheapest_tp_per_hardware(options: list[Option]) -> list[Option]:
    """Per hardware, the tensor-parallel size that rents for least (a rented one before one no provider
    rents), then uses the fewest devices, then is the fastest."""

    def rank(o: Option) -> tuple[bool, float, int, float]:
        return (o.usd_per_hour is None, o.usd_per_hour or 0.0, o.devices, o.at_load.tpot_s)

    best: dict[str, Option] = {}
    for o in options:
        current = best.get(o.hardware.name)
        if current is None or rank(o) < rank(current):
            best[o.hardware.name] = o
    return list(best.values())


def nearest_feasible_hint(sizing: Sizing) -> str:
    """For a load nothing serves: the three options that come closest, and why each falls short."""
    closest = sorted(sizing.infeasible, key=lambda i: i.shortfall)[:3]
    reasons = "; ".join(f"{i.hardware} x{i.tp} {i.reason}" for i in closest)
    return f"Closest: {reasons}. Relax the SLO, shorten the requests, or pick a smaller model."


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms" if seconds < 10 else f"{seconds:.0f} s"


def size_model(
    name: str,
    config: ModelConfig,
    load: TargetLoad,
    prices: Prices,
    *,
    hardware: list[str] | None = None,
    from_loadtest: Path | None = None,
    measured_on: str | None = None,
    provider: str | None = None,
    max_utilization: float = 0.8,
    today: dt.date | None = None,
    price_warnings: bool = True,
) -> Sizing:
    """Rank the hardware options for `load`; raises with the nearest feasible option when none fits. With
    `price_warnings`, the warnings end with one about the rental prices used that are old."""
    w = load
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
    if price_warnings:
        used: list[Sourced] = [o.price for o in sizing.options if o.price is not None]
        day = today or dt.date.today()
        sizing.warnings += stale_summary(used, day)
        sizing.stale_prices = stale_list(used, day)
    return sizing
