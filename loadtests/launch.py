"""Start the load generator in a process of its own (see __main__) and read back its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from deploykit.errors import DeploykitError, UsageError
from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.metrics import Distribution, parse_slos, summarize
from deploykit.loadtests.report import LoadTestReport, records_from_json


class LoadTestError(DeploykitError):
    exit_code = 6


def run_in_own_process(config: LoadTestConfig, out: Path, csv: Path | None = None) -> dict[str, object]:
    """Run the load test in `config.processes` load-generator processes at once and merge their records
    into one report (exactly: every process stamps with the same monotonic clock). Returns the report
    without its per-request records (they are in `out`)."""
    out.unlink(missing_ok=True)
    parts = [out.with_name(f"{out.stem}.part{i}{out.suffix}") for i in range(config.processes)]
    children = [
        subprocess.Popen([sys.executable, "-m", "deploykit.loadtests", part_config.model_dump_json(), str(path)])
        for part_config, path in zip(config.split(), parts, strict=True)
    ]
    codes = [child.wait() for child in children]
    if any(codes) or not all(p.exists() for p in parts):
        raise LoadTestError(f"The load generator failed (exit {max(codes)}).", "Its output is above.")
    merged = _merge(config, [json.loads(p.read_text()) for p in parts])
    merged.write(out, csv)
    for p in parts:
        p.unlink()
    return merged.to_json(with_records=False)


def _merge(config: LoadTestConfig, reports: list[dict[str, Any]]) -> LoadTestReport:
    records = sorted((r for rep in reports for r in records_from_json(rep["records"])), key=lambda r: r.scheduled)
    started = max(float(rep["started"]) for rep in reports)
    ended = min(float(rep["ended"]) for rep in reports)
    window = (started + config.warmup_s, ended - config.cooldown_s)
    lags = [rep["schedule_lag"] for rep in reports if rep["schedule_lag"]]
    return LoadTestReport(
        config=config,
        summary=summarize(records, window, parse_slos(config.slos)),
        records=records,
        schedule_lag=Distribution(**max(lags, key=lambda d: d["p99"])) if lags else None,  # the worst process
        generator_cpu_percent=sum(float(rep["generator_cpu_percent"]) for rep in reports),
        invalid_reasons=[reason for rep in reports for reason in rep["invalid_reasons"]],
        started=started,
        ended=ended,
    )


def run_level(config: LoadTestConfig, point: float, out: Path, csv: Path | None = None) -> dict[str, object]:
    """One run at a load level (concurrency for a closed loop, rate for an open one); its full report is
    written beside `out` (name-c4.json, name-r2.5.json)."""
    if config.rate is None:
        level, suffix = config.model_copy(update={"concurrency": int(point)}), f"c{int(point)}"
    else:
        level, suffix = config.model_copy(update={"rate": point}), f"r{point:g}"
    path = out.with_name(f"{out.stem}-{suffix}{out.suffix}")
    point_csv = csv.with_name(f"{csv.stem}-{suffix}{csv.suffix}") if csv else None
    return {"load": point, "report": str(path), **run_in_own_process(level, path, point_csv)}


def run_sweep(config: LoadTestConfig, points: list[float], out: Path, csv: Path | None = None) -> dict[str, object]:
    """One run per load level, in order; `out` holds the curve."""
    runs = [run_level(config, point, out, csv) for point in points]
    curve: dict[str, object] = {"sweep": _kind(config), "runs": runs}
    out.write_text(json.dumps(curve, indent=1))
    return curve


def find_max(config: LoadTestConfig, out: Path, csv: Path | None = None, limit: float = 512) -> dict[str, object]:
    """The highest load at which every SLO holds and nothing fails: from the configured level, double until
    a level fails, then bisect between the last pass and the first failure (to one user, or 10% of the
    rate). `out` holds every level tried (the curve that led there) and the answer."""
    if not parse_slos(config.slos):
        raise UsageError("--find-max needs at least one --slo.", "For example: --slo ttft_p95=1s,tpot_p95=50ms")
    runs: list[dict[str, object]] = []

    def passes(point: float) -> bool:
        run = run_level(config, point, out, csv)
        summary: dict[str, Any] = run["summary"]  # type: ignore[assignment]
        run["passed"] = bool(summary["ok"]) and not summary["errors"] and all(summary["slos_met"].values())
        runs.append(run)
        return bool(run["passed"])

    closed = config.rate is None
    level: float = float(config.concurrency if closed else config.rate)  # type: ignore[arg-type]
    best: float | None = None
    failed: float | None = None
    while level <= limit:
        if not passes(level):
            failed = level
            break
        best, level = level, level * 2
    while best is not None and failed is not None and (failed - best > 1 if closed else failed / best > 1.1):
        middle = (best + failed) // 2 if closed else (best + failed) / 2
        if passes(middle):
            best = middle
        else:
            failed = middle
    result: dict[str, object] = {
        "search": _kind(config),
        "best": best,
        "limit_reached": failed is None,
        "slos": config.slos,
        "runs": sorted(runs, key=lambda r: float(r["load"])),  # type: ignore[arg-type]
    }
    out.write_text(json.dumps(result, indent=1))
    return result


def _kind(config: LoadTestConfig) -> str:
    return "concurrency" if config.rate is None else "rate"
