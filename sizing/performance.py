"""The performance model, per engine replica on `tp` devices in tensor parallel:

- decode, one step for a batch of B sequences: bound by memory (weights plus the live KV cache read once)
  or by compute (2 x params FLOPs per token plus attention), whichever is slower, at an efficiency factor;
- prefill of I prompt tokens: bound by compute (or by reading the weights once, for tiny prompts);
- a sequence's time per output token at concurrency C: one decode step of batch C, plus its share of the
  prefills that run between steps (C prefills every O steps);
- Little's law: a replica keeping C sequences in flight completes C / e2e(C) requests a second.

A Calibration (calibration.py) adjusts it for hardware a load test ran on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from deploykit.models.config import ModelConfig
from deploykit.models.fit import kv_bytes_per_token, weight_bytes
from deploykit.models.prices import Measurement
from deploykit.sizing.hardware import Accelerator
from deploykit.sizing.load import TargetLoad


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
    config: ModelConfig, dev: Accelerator, tp: int, rate: float, w: TargetLoad, cal: Calibration | None, cap: float
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


UNSTATED_LENGTH = 128  # prompt and answer length assumed where a source does not state them


def predict_measurement(config: ModelConfig, dev: Accelerator, m: Measurement) -> float:
    """What the analytic model predicts for a published measurement, in the measurement's unit."""
    i = m.input_tokens or UNSTATED_LENGTH
    o = m.output_tokens or UNSTATED_LENGTH
    p = point(config, dev, 1, m.concurrency, i, o)
    if m.metric == "tpot_ms":
        return p.tpot_s * 1000
    if m.metric == "ttft_ms":
        return p.ttft_s * 1000
    if not m.input_tokens and m.concurrency == 1:  # a batch-1 "tokens/s" without lengths: the decode rate
        return 1 / p.tpot_s
    return m.concurrency * o / p.e2e_s(o)
